"""cgpolicyd built from parts, without a system: cycles, start-up, Status and ListUsers.

The clock, systemd (reader and writer), NSS, the usage sampler, the policy
directory and the state files are the test's own; the daemon's code is real.
"""

from __future__ import annotations

import asyncio
import marshal
from pathlib import Path

import pytest
from fakeslices import DictAccounts
from policyfiles import DAEMON_SECTIONS, GROUPS, MAIN, write_policy

from pam_cgpolicy import daemon as daemon_mod
from pam_cgpolicy.accounts import Account
from pam_cgpolicy.badness import UserScore
from pam_cgpolicy.compiled import read_last_good, read_penalty, save_penalties
from pam_cgpolicy.errors import CgpolicyError, SystemdError
from pam_cgpolicy.policy import Policy
from pam_cgpolicy.slicelimits import slice_limits
from pam_cgpolicy.state import StateStore
from pam_cgpolicy.usage import Sample

GiB = 1024**3
T0 = 1_800_000_000.0
BOB, CAROL, ROOT2 = 2002, 5000, 5001  # students, normal (fallback), admins (exempt, wheel)
WHEEL = 10
ACCOUNTS = {
    BOB: Account("bob", BOB, frozenset({BOB})),
    CAROL: Account("carol", CAROL, frozenset({CAROL})),
    ROOT2: Account("root2", ROOT2, frozenset({ROOT2, WHEEL}), frozenset({"root2", "wheel"})),
}
ADMINS = MAIN.replace("hook_timeout = 1.5", 'hook_timeout = 1.5\nadmin_group = "wheel"')


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class Sampler:
    """Slices logged in and their CPU, in cores, as the test sets them."""

    mode = "unified"

    def __init__(self) -> None:
        self.cores: dict[int, float] = {}
        self.seen: set[int] = set()

    def active_uids(self, min_uid: int) -> list[int]:
        return sorted(uid for uid in self.cores if uid >= min_uid)

    def sample(self, uids, whitelists, now):
        samples = {}
        for uid in uids:
            first = uid not in self.seen
            self.seen.add(uid)
            cores = self.cores[uid]
            samples[uid] = Sample(uid, None if first else cores, 0, 0, 0.0, None if first else 10.0)
        return samples


class Systemd:
    """systemd's reader: the slices of the users logged in, and each call asked of it."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler
        self.calls: list[tuple[str, ...]] = []

    def _path(self, uid: int) -> str:
        return f"/org/freedesktop/systemd1/unit/user_2d{uid}_2eslice"

    async def user_slice_paths(self):
        self.calls.append(("ListUnitsByPatterns",))
        return {uid: self._path(uid) for uid in self.sampler.cores}

    async def unit_path(self, unit):
        self.calls.append(("GetUnit", unit))
        uid = int(unit.removeprefix("user-").removesuffix(".slice"))
        return self._path(uid) if uid in self.sampler.cores else None

    async def properties(self, path, interface):
        self.calls.append(("GetAll", path, interface))
        if interface.endswith(".Unit"):
            return {"ActiveState": "active", "FreezerState": "running"}
        return {"CPUQuotaPerSecUSec": 1_000_000, "MemoryMax": 2 * GiB, "MemoryCurrent": 1024}


class Writer:
    """systemd's writer: records each send, with the hook's copy as it was at that moment."""

    def __init__(self, penalties: Path, clock: Clock) -> None:
        self.penalties = penalties
        self.clock = clock
        self.sent: list[tuple[int, tuple]] = []
        self.copy_at_send: list[tuple | None] = []
        self.failing: set[int] = set()

    def __call__(self, uid, props) -> None:
        if uid in self.failing:
            raise SystemdError("org.freedesktop.systemd1.NoSuchUnit", "refused")
        self.copy_at_send.append(read_penalty(str(self.penalties), uid, self.clock()))
        self.sent.append((uid, tuple(props)))

    def last(self, uid: int) -> tuple | None:
        return next((props for sent, props in reversed(self.sent) if sent == uid), None)


class Signals:
    def __init__(self) -> None:
        self.tiers: list[tuple[str, str | None, str | None]] = []

    async def emit_tier_changed(self, user, old, new, reason) -> None:
        self.tiers.append((user, old, new))


class Node:
    """A login node's parts in a temporary directory, and the daemon built from them."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.errors: list[str] = []
        self.infos: list[str] = []
        monkeypatch.setattr(
            daemon_mod.log, "error", lambda _kind, text, **_who: self.errors.append(text)
        )
        monkeypatch.setattr(
            daemon_mod.log, "info", lambda _kind, text, **_who: self.infos.append(text)
        )
        self.config = write_policy(tmp / "etc", ADMINS + DAEMON_SECTIONS)
        self.state = tmp / "state"
        self.state.mkdir(mode=0o700)
        self.penalties = self.state / "penalties.compiled"
        self.last_good = self.state / "policy.compiled"
        self.clock = Clock()
        self.sampler = Sampler()
        self.systemd = Systemd(self.sampler)
        self.writer = Writer(self.penalties, self.clock)
        self.accounts = DictAccounts(dict(ACCOUNTS))
        self.store = StateStore.open(tmp / "state.db")

    def daemon(self, start: bool = True) -> daemon_mod.Daemon:
        policy, problems = daemon_mod.starting_policy(str(self.config), str(self.last_good))
        daemon = daemon_mod.Daemon(
            policy,
            self.store,
            self.systemd,  # type: ignore[arg-type]
            self.sampler,  # type: ignore[arg-type]
            refused=problems,
            write=self.writer,
            clock=self.clock,
            ticks=self.clock,
            accounts=self.accounts,  # type: ignore[arg-type]
            memory=16 * GiB,
            config=str(self.config),
            penalties=str(self.penalties),
            last_good=str(self.last_good),
        )
        daemon.service = Signals()
        if start:
            asyncio.run(daemon.start())
        return daemon

    def group_props(self, daemon: daemon_mod.Daemon, uid: int) -> tuple:
        return daemon.engine.limits(ACCOUNTS[uid], None).properties

    def hook_sends(self, daemon: daemon_mod.Daemon, uid: int, standing) -> tuple:
        """What the login hook sends from a standing in its copy."""
        assert standing is not None
        memory = daemon.engine.memory_total
        return slice_limits(daemon.engine.compiled, ACCOUNTS[uid], standing, memory).properties

    def break_policy(self) -> None:
        (self.config / "groups.d" / "students.toml").write_text('[limits]\nCPUQuota = "lots"\n')

    def mend_policy(self) -> None:
        (self.config / "groups.d" / "students.toml").write_text(GROUPS["students"])


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    node = Node(tmp_path, monkeypatch)
    yield node
    node.store.close()


def run_cycles(daemon: daemon_mod.Daemon, node: Node, count: int) -> None:
    for _ in range(count):
        node.clock.now += 10
        asyncio.run(daemon.cycle())


# A cycle


def test_a_new_slice_gets_its_groups_limits_at_the_next_cycle(node):
    daemon = node.daemon()
    assert node.writer.sent == []
    node.sampler.cores = {BOB: 0.0, CAROL: 0.0}
    run_cycles(daemon, node, 1)
    assert dict(node.writer.sent) == {
        BOB: node.group_props(daemon, BOB),
        CAROL: node.group_props(daemon, CAROL),
    }
    assert ("CPUQuotaPerSecUSec", "t", 1_000_000) in node.writer.last(BOB)
    run_cycles(daemon, node, 2)  # known slices are not sent again
    assert len(node.writer.sent) == 2


def test_a_busy_user_is_penalized_the_hooks_copy_first_then_the_limits_and_a_signal(node):
    daemon = node.daemon()
    node.sampler.cores = {BOB: 1.0}  # all of students' 100%, over its 0.8 threshold
    for _ in range(100):
        run_cycles(daemon, node, 1)
        if node.store.get(BOB) and node.store.get(BOB).tier:
            break
    assert node.store.get(BOB).tier == "penalty1"
    tiered = node.writer.last(BOB)
    assert tiered != node.group_props(daemon, BOB)
    assert ("CPUQuotaPerSecUSec", "t", 800_000) in tiered  # penalty1 keeps 0.8 of 100%
    # the hook knew it before systemd did
    assert node.hook_sends(daemon, BOB, node.writer.copy_at_send[-1]) == tiered
    assert daemon.service.tiers == [("bob", None, "penalty1")]
    assert any("event=penalized" in line and "user=bob" in line for line in node.infos)


def test_an_expired_tier_is_released_with_its_signal(node):
    daemon = node.daemon()
    node.store.record(
        BOB, "bob", UserScore(tier="penalty1", tier_expiry=T0 + 5, occurrences=1), None
    )
    run_cycles(daemon, node, 1)
    assert node.store.get(BOB).tier is None
    assert node.writer.last(BOB) == node.group_props(daemon, BOB)
    assert read_penalty(str(node.penalties), BOB, node.clock()) is None
    assert daemon.service.tiers == [("bob", "penalty1", None)]


# Reload


def test_an_edited_policy_is_in_force_at_the_next_cycle_and_saved_as_last_good(node):
    daemon = node.daemon()
    node.sampler.cores = {CAROL: 0.0}
    run_cycles(daemon, node, 1)
    normal = node.config / "groups.d" / "normal.toml"
    normal.write_text(GROUPS["normal"].replace("200%", "300%"))
    run_cycles(daemon, node, 1)
    assert ("CPUQuotaPerSecUSec", "t", 3_000_000) in node.writer.last(CAROL)
    saved = read_last_good(str(node.last_good))
    assert Policy.from_data(saved["policy"]) == daemon.policy
    assert asyncio.run(daemon.status())["policy"] == "files"


def test_a_broken_edit_keeps_the_old_policy_then_a_mend_takes_effect(node):
    daemon = node.daemon()
    good = daemon.policy
    node.break_policy()
    run_cycles(daemon, node, 2)
    assert daemon.policy is good
    status = asyncio.run(daemon.status())
    assert status["policy"] == "last good"
    assert any("students.toml" in p and "CPUQuota" in p for p in status["problems"])
    assert sum("event=reload-refused" in e for e in node.errors) == 1  # said once
    node.mend_policy()
    run_cycles(daemon, node, 1)
    assert asyncio.run(daemon.status())["policy"] == "files"
    assert "problems" not in {k for k, v in asyncio.run(daemon.status()).items() if v}


def test_reload_answers_the_problems_and_an_empty_list_once_valid(node):
    daemon = node.daemon()
    node.break_policy()
    problems = asyncio.run(daemon.reload("uid 0 (root)"))
    assert problems and all("students.toml" in p for p in problems)
    node.mend_policy()
    assert asyncio.run(daemon.reload("uid 0 (root)")) == []


# Start-up


def test_start_on_broken_files_runs_the_last_good_policy_daemon_sections_included(node):
    first = node.daemon()  # a start on valid files saves them as the last good policy
    assert node.last_good.exists()
    node.break_policy()
    (node.config / "cgpolicy.toml").write_text("[penalty]\norder = [")  # and the main file
    daemon = node.daemon()
    assert daemon.policy == first.policy and daemon.policy.penalty is not None
    status = asyncio.run(daemon.status())
    assert status["policy"] == "last good" and len(status["problems"]) >= 1
    asyncio.run(daemon.penalize("bob", "penalty2", "admin"))  # its tiers are in force
    assert ("CPUQuotaPerSecUSec", "t", 500_000) in node.writer.last(BOB)
    node.mend_policy()
    (node.config / "cgpolicy.toml").write_text(ADMINS + DAEMON_SECTIONS)
    run_cycles(daemon, node, 1)
    assert asyncio.run(daemon.status())["policy"] == "files"


def test_start_with_no_valid_policy_ever_limits_nobody_and_recovers(node):
    node.break_policy()
    daemon = node.daemon()
    assert daemon.policy is daemon_mod.NO_POLICY and not node.last_good.exists()
    assert asyncio.run(daemon.status())["policy"] == "none"
    node.sampler.cores = {BOB: 5.0, CAROL: 5.0}
    run_cycles(daemon, node, 5)
    assert node.writer.sent == [] and node.store.get(BOB) is None
    node.mend_policy()
    run_cycles(daemon, node, 1)
    assert asyncio.run(daemon.status())["policy"] == "files"
    assert {uid for uid, _ in node.writer.sent} == {BOB, CAROL}


def test_a_bug_while_loading_at_start_is_a_refusal_not_an_exit(node, monkeypatch):
    node.daemon()
    monkeypatch.setattr(daemon_mod, "load_policy", lambda _dir: 1 / 0)
    policy, problems = daemon_mod.starting_policy(str(node.config), str(node.last_good))
    assert policy is not None and policy.penalty is not None
    assert problems == [
        f"{node.config}/cgpolicy.toml: cannot be loaded: ZeroDivisionError: division by zero"
    ]


def test_an_unusable_last_good_copy_is_as_none_and_said(node):
    node.last_good.write_bytes(marshal.dumps({"format": "old", "policy": {}}))
    node.break_policy()
    policy, problems = daemon_mod.starting_policy(str(node.config), str(node.last_good))
    assert policy is None and problems
    node.last_good.chmod(0o666)  # writable by anyone: never trusted
    policy, _ = daemon_mod.starting_policy(str(node.config), str(node.last_good))
    assert policy is None and any("cannot be used" in e for e in node.errors)


def test_start_reapplies_penalties_in_force_and_ends_expired_ones(node):
    node.store.record(
        BOB, "bob", UserScore(tier="penalty2", tier_expiry=T0 + 600, occurrences=2), None
    )
    node.store.record(
        CAROL, "carol", UserScore(tier="penalty1", tier_expiry=T0 - 1, occurrences=1), None
    )
    daemon = node.daemon()
    assert node.writer.last(CAROL) == node.group_props(daemon, CAROL)
    assert node.store.get(CAROL).tier is None
    bob = node.writer.last(BOB)
    assert ("CPUQuotaPerSecUSec", "t", 500_000) in bob
    assert node.hook_sends(daemon, BOB, read_penalty(str(node.penalties), BOB, node.clock())) == bob
    assert daemon.service.tiers == [("carol", "penalty1", None)]


def test_a_restart_goes_on_stepping_memory_max_from_where_it_had_reached(node):
    # bob in penalty2 (students' 2G halved: 1G), stepped down to 1.5G before the restart
    node.store.record(
        BOB, "bob", UserScore(tier="penalty2", tier_expiry=T0 + 600, occurrences=2), None
    )
    save_penalties(str(node.penalties), {BOB: (T0 + 600, "penalty2", 3 * GiB // 2)})
    daemon = node.daemon()
    assert ("MemoryMax", "t", 3 * GiB // 2) in node.writer.last(BOB)  # not the group's 2G
    assert daemon.engine.memory_stepping() == {BOB: (3 * GiB // 2, GiB)}
    assert read_penalty(str(node.penalties), BOB, node.clock()).memory_max == 3 * GiB // 2
    node.sampler.cores = {BOB: 0.0}  # the slice now holds 1024 bytes: the step reaches 1G
    run_cycles(daemon, node, 2)
    assert ("MemoryMax", "t", GiB) in node.writer.last(BOB)
    assert daemon.engine.memory_stepping() == {}


def test_a_copy_of_another_tier_does_not_carry_its_memory_max(node):
    node.store.record(
        BOB, "bob", UserScore(tier="penalty2", tier_expiry=T0 + 600, occurrences=2), None
    )
    save_penalties(str(node.penalties), {BOB: (T0 + 600, "penalty1", 3 * GiB // 2)})
    node.daemon()
    assert ("MemoryMax", "t", 2 * GiB) in node.writer.last(BOB)  # from the top again


def test_an_unreadable_copy_at_start_is_said_and_the_steps_start_from_the_top(node):
    node.store.record(
        BOB, "bob", UserScore(tier="penalty2", tier_expiry=T0 + 600, occurrences=2), None
    )
    node.penalties.write_bytes(b"not a copy")
    node.penalties.chmod(0o600)
    node.daemon()
    assert ("MemoryMax", "t", 2 * GiB) in node.writer.last(BOB)
    assert any(f"cannot read {node.penalties}" in line for line in node.errors), node.errors


# Failures and admins


def test_a_refused_send_stays_pending_in_status_and_is_retried_until_systemd_has_it(node):
    daemon = node.daemon()
    node.writer.failing = {BOB}
    node.sampler.cores = {BOB: 0.0, CAROL: 0.0}
    run_cycles(daemon, node, 1)
    assert [uid for uid, _ in node.writer.sent] == [CAROL]
    assert asyncio.run(daemon.status())["pending"] == ["bob"]
    run_cycles(daemon, node, 1)
    assert sum("retry=next-cycle" in e for e in node.errors) == 2
    node.writer.failing = set()
    run_cycles(daemon, node, 2)
    assert [uid for uid, _ in node.writer.sent] == [CAROL, BOB]
    assert asyncio.run(daemon.status()).get("pending") is None


def test_admin_rights_follow_the_group_at_each_call(node):
    daemon = node.daemon()
    assert asyncio.run(daemon.is_admin(ROOT2)) and not asyncio.run(daemon.is_admin(BOB))
    node.accounts.accounts[ROOT2] = Account("root2", ROOT2, frozenset({ROOT2}), frozenset())
    assert not asyncio.run(daemon.is_admin(ROOT2))  # no reload, no new cycle needed
    assert not asyncio.run(daemon.is_admin(4242))  # unknown to NSS


# ListUsers and Status


def test_list_users_lists_slices_in_one_call_and_reads_only_the_loaded_ones(node):
    daemon = node.daemon()
    for uid in range(10_000, 10_200):  # stored users, none logged in
        account = Account(f"u{uid}", uid, frozenset({uid}))
        node.accounts.accounts[uid] = account
        node.store.record(uid, account.name, UserScore(cpu_badness=1.0), None)
    node.sampler.cores = {BOB: 0.0}
    node.systemd.calls.clear()
    users = asyncio.run(daemon.list_users())
    assert len(users) == 201 and users[0]["user"] == "bob" and users[0]["limits"]
    assert all("limits" not in user for user in users[1:])
    assert [c[0] for c in node.systemd.calls].count("ListUnitsByPatterns") == 1
    assert [c[0] for c in node.systemd.calls].count("GetAll") == 2  # bob's Unit and Slice
    assert "GetUnit" not in [c[0] for c in node.systemd.calls]
    assert node.accounts.asked.count("many") == 1  # NSS in one pass, not per user
    assert users[0] == asyncio.run(daemon.get_user("bob"))


def test_status_says_when_it_started_and_what_was_salvaged(node):
    node.clock.now = T0 - 60
    daemon = node.daemon()
    daemon.salvage = "moved_to=/x/state.db.corrupt-1 users=3"
    node.store.record(BOB, "bob", UserScore(), None)
    status = asyncio.run(daemon.status())
    assert status == {
        "policy": "files",
        "problems": None,
        "started": T0 - 60,
        "pending": None,
        "salvage": "moved_to=/x/state.db.corrupt-1 users=3",
        "users": 1,
    }


# Metrics


def test_each_cycle_publishes_one_exposition_to_the_file_and_the_bus(node, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    textfile = tmp_path / "textfile"
    textfile.mkdir(mode=0o755)
    main = ADMINS + DAEMON_SECTIONS + f'\n[metrics]\ntextfile_dir = "{textfile}"\n'
    (node.config / "cgpolicy.toml").write_text(main)
    daemon = node.daemon()
    with pytest.raises(CgpolicyError, match="first cycle"):
        asyncio.run(daemon.metrics())
    node.sampler.cores = {BOB: 0.0, CAROL: 0.0}
    asyncio.run(daemon.penalize("bob", "penalty1", "admin"))
    node.break_policy()
    asyncio.run(daemon.reload("admin"))
    node.mend_policy()
    asyncio.run(daemon.reload("admin"))

    async def first_cycle() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        while daemon.exposition is None:
            await asyncio.sleep(0.01)
        stop.set()
        await task

    asyncio.run(first_cycle())
    text = (textfile / "cgpolicy.prom").read_text()
    assert asyncio.run(daemon.metrics()) == text
    found = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    bob = (("group", "students"), ("tier", "penalty1"), ("uid", str(BOB)), ("user", "bob"))
    assert found["cgpolicy_user_tier", bob] == 1
    carol = (("group", "normal"), ("tier", ""), ("uid", str(CAROL)), ("user", "carol"))
    assert found["cgpolicy_user_tier", carol] == 0
    assert found["cgpolicy_penalties", (("tier", "penalty1"),)] == 1
    assert found["cgpolicy_policy_reloads_total", ()] == 1
    assert found["cgpolicy_policy_reload_errors_total", ()] == 1
    assert ("cgpolicy_cycle_duration_seconds", ()) in found


def test_metrics_that_cannot_be_written_never_fail_a_cycle(node, tmp_path):
    main = ADMINS + DAEMON_SECTIONS + f'\n[metrics]\ntextfile_dir = "{tmp_path / "none"}"\n'
    (node.config / "cgpolicy.toml").write_text(main)
    daemon = node.daemon()
    node.sampler.cores = {BOB: 0.0}
    for _ in range(3):
        run_cycles(daemon, node, 1)
        asyncio.run(daemon.publish_metrics(0.1))
    assert b'user="bob"' in (daemon.exposition or b"")
    assert sum("event=metrics-not-written" in line for line in node.errors) == 1
