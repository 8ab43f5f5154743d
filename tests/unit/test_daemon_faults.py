"""cgpolicyd under node-wide faults: a state database it cannot write (locked by another
process, or full) and busctl gone. Cycles go on, nothing unrecorded is acted on, and
each fault is logged once when it starts and once when it ends, not every cycle."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator

import pytest
from test_daemon_cycle import BOB, CAROL, T0, Node, run_cycles

from pam_cgpolicy import daemon as daemon_mod
from pam_cgpolicy.badness import UserScore
from pam_cgpolicy.errors import StateError, SystemdError, UnknownUser
from pam_cgpolicy.setprops import NO_BUSCTL
from pam_cgpolicy.state import StateStore


@pytest.fixture
def node(tmp_path, monkeypatch) -> Iterator[Node]:
    node = Node(tmp_path, monkeypatch)
    monkeypatch.setattr(daemon_mod, "boot_clock", node.clock)  # no clock step meanwhile
    node.store.close()  # a lock is waited for a moment, not the node's 5 s
    node.store = StateStore.open(tmp_path / "state.db", timeout=0.05)
    yield node
    node.store.close()


def lock(node: Node) -> sqlite3.Connection:
    """Another process's write lock on the state database, held until closed."""
    other = sqlite3.connect(node.store.path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    return other


def said(lines: list[str], event: str) -> int:
    return sum(f"event={event}" in line for line in lines)


def busy_until_penalized(daemon: daemon_mod.Daemon, node: Node, cycles: int) -> None:
    node.sampler.cores[BOB] = 1.0  # all of students' 100%, over its 0.8 threshold
    for _ in range(cycles):
        run_cycles(daemon, node, 1)
        if node.store.get(BOB) and node.store.get(BOB).tier:
            return


def test_a_locked_state_database_fails_no_cycle_and_is_said_once_each_way(node):
    daemon = node.daemon()
    other = lock(node)
    node.sampler.cores = {CAROL: 0.0}
    busy_until_penalized(daemon, node, 60)  # would have been penalized by now
    assert node.store.get(BOB) is None  # nothing recorded...
    assert daemon.service.tiers == []  # ...so nothing acted on or told
    assert {uid for uid, _ in node.writer.sent} == {BOB, CAROL}  # new slices got their limits
    assert said(node.errors, "cycle-failed") == 0
    assert said(node.errors, "state-unwritable") == 1
    assert daemon.engine.memory_stepping() == {}  # no MemoryMax kept that was never sent
    other.close()
    busy_until_penalized(daemon, node, 60)
    assert node.store.get(BOB).tier == "penalty1"
    assert daemon.service.tiers == [("bob", None, "penalty1")]
    assert said(node.infos, "state-writable") == 1
    run_cycles(daemon, node, 2)
    assert said(node.errors, "state-unwritable") == 1 and said(node.infos, "state-writable") == 1


def test_a_full_state_database_ends_an_expired_penalty_once_there_is_room(node, monkeypatch):
    node.store.record(
        BOB, "bob", UserScore(tier="penalty1", tier_expiry=T0 + 5, occurrences=1), None
    )
    daemon = node.daemon()
    record_many = node.store.record_many

    def full(*_args, **_kwargs) -> None:
        raise StateError(f"{node.store.path}: cannot record uid {BOB}: database or disk is full")

    monkeypatch.setattr(node.store, "record_many", full)
    run_cycles(daemon, node, 3)
    assert node.store.get(BOB).tier == "penalty1"  # the release is not recorded...
    assert daemon.service.tiers == []  # ...nor acted on
    assert said(node.errors, "cycle-failed") == 0 and said(node.errors, "state-unwritable") == 1
    assert any("full" in line for line in node.errors if "state-unwritable" in line)
    monkeypatch.setattr(node.store, "record_many", record_many)
    run_cycles(daemon, node, 2)
    assert node.store.get(BOB).tier is None
    assert daemon.service.tiers == [("bob", "penalty1", None)]  # told once, not once a cycle
    assert node.writer.last(BOB) == node.group_props(daemon, BOB)
    assert said(node.infos, "state-writable") == 1


class NoBusctl:
    """The writer on a node whose busctl is gone, until ``back``."""

    def __init__(self, writer) -> None:
        self.writer = writer
        self.gone = True
        self.tries = 0

    def __call__(self, uid, props) -> None:
        self.tries += 1
        if self.gone:
            raise SystemdError(NO_BUSCTL, "busctl not found: is systemd installed?")
        self.writer(uid, props)


def test_busctl_gone_is_said_once_retried_every_cycle_and_its_return_said_once(node):
    daemon = node.daemon()
    daemon.write = writer = NoBusctl(node.writer)
    node.sampler.cores = {BOB: 0.0, CAROL: 0.0}
    run_cycles(daemon, node, 4)
    assert writer.tries == 2 * 4  # each pending user, every cycle
    assert asyncio.run(daemon.status())["pending"] == ["bob", "carol"]
    assert said(node.errors, "busctl-missing") == 1
    assert sum("retry=next-cycle" in e for e in node.errors) == 0  # not a line per user a cycle
    asyncio.run(daemon.penalize("bob", "penalty1", "admin"))  # an admin's change is still said
    assert any("event=penalized" in line and "user=bob" in line for line in node.infos)
    writer.gone = False
    run_cycles(daemon, node, 2)
    assert {uid for uid, _ in node.writer.sent} == {BOB, CAROL}
    assert ("CPUQuotaPerSecUSec", "t", 800_000) in node.writer.last(BOB)  # the tier's
    assert asyncio.run(daemon.status())["pending"] is None
    assert said(node.infos, "busctl-found") == 1 and said(node.errors, "busctl-missing") == 1


def test_a_user_refused_by_systemd_is_still_said_each_time(node):
    daemon = node.daemon()
    node.writer.failing = {BOB}
    node.sampler.cores = {BOB: 0.0}
    run_cycles(daemon, node, 2)
    assert sum("retry=next-cycle" in e for e in node.errors) == 2
    assert said(node.errors, "busctl-missing") == 0


def test_a_clock_step_not_yet_recorded_ends_no_penalty(node, monkeypatch):
    node.store.record(
        BOB, "bob", UserScore(tier="penalty1", tier_expiry=T0 + 600, occurrences=1), None
    )
    daemon = node.daemon()
    run_cycles(daemon, node, 1)  # both clocks looked at
    day = 86_400.0
    node.clock.now += day  # the wall clock set a day forward; the boot clock goes on
    monkeypatch.setattr(daemon_mod, "boot_clock", lambda: node.clock.now - day)
    shift_times = node.store.shift_times

    def locked(_step: float) -> int:
        raise StateError(f"{node.store.path}: cannot shift the recorded times: database is locked")

    monkeypatch.setattr(node.store, "shift_times", locked)
    run_cycles(daemon, node, 2)  # a day ahead, the times not moved yet
    assert node.store.get(BOB).tier == "penalty1" and daemon.service.tiers == []
    assert said(node.errors, "state-unwritable") == 1
    monkeypatch.setattr(node.store, "shift_times", shift_times)
    run_cycles(daemon, node, 1)
    assert node.store.get(BOB).tier_expiry == T0 + 600 + day
    assert daemon.service.tiers == []


def test_a_standing_that_cannot_be_read_is_sent_at_a_later_cycle(node, monkeypatch):
    daemon = node.daemon()
    get = node.store.get

    def unreadable(uid: int):
        raise StateError(f"{node.store.path}: cannot read: disk I/O error")

    monkeypatch.setattr(node.store, "get", unreadable)
    node.sampler.cores = {BOB: 0.0}
    run_cycles(daemon, node, 2)
    assert node.writer.sent == []  # nothing sent without the standing...
    assert any("uid=2002" in line and "retry=next-cycle" in line for line in node.errors)
    monkeypatch.setattr(node.store, "get", get)
    run_cycles(daemon, node, 1)
    assert node.writer.last(BOB) == node.group_props(daemon, BOB)  # ...but once it reads


def test_an_account_gone_is_not_retried(node, monkeypatch):
    daemon = node.daemon()
    node.writer.failing.add(BOB)
    node.sampler.cores = {BOB: 0.0}
    run_cycles(daemon, node, 1)
    assert daemon.pending == {BOB}
    node.writer.failing.clear()
    monkeypatch.setattr(daemon, "_account", lambda uid: (_ for _ in ()).throw(UnknownUser(uid)))
    run_cycles(daemon, node, 1)
    assert daemon.pending == set()
