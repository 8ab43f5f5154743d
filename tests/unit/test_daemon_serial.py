"""cgpolicyd: sends for one user never interleave, an admin's action is never undone,
and what it sends is what the hook and cgpolicyctl apply would send from its copy."""

import asyncio
import threading
import time

import pytest
from fakeslices import DictAccounts, NoSlices, NoSliceUnits
from policyfiles import DAEMON_SECTIONS, MAIN, write_policy

from pam_cgpolicy import daemon as daemon_mod
from pam_cgpolicy.accounts import Account
from pam_cgpolicy.compiled import read_penalty
from pam_cgpolicy.engine import Action
from pam_cgpolicy.policy import load_policy
from pam_cgpolicy.slicelimits import slice_limits
from pam_cgpolicy.state import StateStore

ACCOUNTS = {
    2002: Account("bob", 2002, frozenset({2002})),  # students
    5000: Account("carol", 5000, frozenset({5000})),  # normal
}


@pytest.fixture
def daemon(tmp_path, monkeypatch):
    root = write_policy(tmp_path / "etc", main=MAIN + DAEMON_SECTIONS)
    monkeypatch.setattr(daemon_mod.log, "info", lambda _kind, _text, **_who: None)
    store = StateStore.open(tmp_path / "state.db")
    yield daemon_mod.Daemon(
        load_policy(root),
        store,
        NoSliceUnits(),
        None,
        accounts=DictAccounts(ACCOUNTS),
        config=str(root),
        penalties=str(tmp_path / "penalties"),
        last_good=str(tmp_path / "policy.compiled"),
        memory=8 * 1024**3,
    )
    store.close()


def hook_would_send(daemon, standing):
    """What the hook sends from the daemon's copy: slice_limits on the compiled policy."""
    assert standing is not None
    compiled = daemon.engine.compiled
    return slice_limits(compiled, ACCOUNTS[2002], standing, daemon.engine.memory_total).properties


def test_an_admin_penalty_landing_during_a_cycle_send_is_not_undone(daemon, monkeypatch, tmp_path):
    sent: dict[int, tuple] = {}
    entered, gate = threading.Event(), threading.Event()

    def fake_send(uid, props):
        if uid == 5000 and not gate.is_set():
            entered.set()
            assert gate.wait(10)
        if uid == 2002:  # the hook's copy is written before the limits are sent
            in_copy = read_penalty(str(tmp_path / "penalties"), 2002, time.time())
            assert props == plain or props == hook_would_send(daemon, in_copy)
        sent[uid] = props

    monkeypatch.setattr(daemon, "write", fake_send)
    plain = daemon.engine.limits(ACCOUNTS[2002], None).properties
    cycle = [Action(5000, "carol", (), None), Action(2002, "bob", plain, None)]

    async def scenario():
        in_flight = asyncio.create_task(daemon.apply(cycle))
        assert await asyncio.to_thread(entered.wait, 10)
        admin = asyncio.create_task(daemon.penalize("bob", "penalty1", "admin"))
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(in_flight, admin)

    asyncio.run(scenario())
    penalized = daemon.engine.limits(ACCOUNTS[2002], daemon.store.get(2002)).properties
    assert penalized != plain and sent[2002] == penalized


def test_a_failed_send_is_logged_does_not_stop_the_others_and_is_retried(daemon, monkeypatch):
    from pam_cgpolicy.errors import SystemdError

    errors: list[str] = []
    monkeypatch.setattr(daemon_mod.log, "error", lambda _kind, text, **_who: errors.append(text))
    daemon.sampler = NoSlices()
    sent: list[int] = []
    failing = {5000}

    def fake_send(uid, props):
        if uid in failing:
            raise SystemdError("org.cgpolicy1.Error.NoResources", "cannot run busctl: EAGAIN")
        sent.append(uid)

    monkeypatch.setattr(daemon, "write", fake_send)
    asyncio.run(daemon.apply([Action(5000, "carol", (), None), Action(2002, "bob", (), None)]))
    assert sent == [2002] and len(errors) == 1 and "retry=next-cycle" in errors[0]
    asyncio.run(daemon.cycle())  # systemd still refuses: retried, said again
    assert sent == [2002] and len(errors) == 2
    failing.clear()
    asyncio.run(daemon.cycle())
    asyncio.run(daemon.cycle())  # once systemd has it, no more retries
    assert sent == [2002, 5000] and len(errors) == 2


def test_every_writer_sends_the_tier_while_memory_steps_down(daemon, monkeypatch, tmp_path):
    """The daemon, the hook's copy and cgpolicyctl apply (Apply) agree on one penalty."""
    GiB = 1024**3
    sent: list[tuple] = []
    monkeypatch.setattr(daemon_mod, "set_slice_properties", lambda uid, p, t, b: sent.append(p))

    async def holding(_uid):
        return 3 * GiB // 2  # bob's slice holds 1.5 GiB: penalty1's 1.6 GiB would be too near

    monkeypatch.setattr(daemon, "_memory_current", holding)
    asyncio.run(daemon.penalize("bob", "penalty1", "admin"))
    by_daemon = dict((name, value) for name, _, value in sent[-1])
    assert by_daemon["MemoryMax"] == 3 * GiB // 2 + 2 * GiB // 10  # above usage, not the target
    assert by_daemon["CPUQuotaPerSecUSec"] == 800_000
    in_copy = read_penalty(str(tmp_path / "penalties"), 2002, time.time())
    assert hook_would_send(daemon, in_copy) == sent[-1]
    line = asyncio.run(daemon.apply_user("bob", "uid 0 (root)"))
    assert sent[-1] == sent[-2]  # Apply keeps the penalty, and its MemoryMax step
    assert "tier=penalty1" in line and "CPUQuota=80%" in line and "memory_target=1.6G" in line


def test_apply_sets_the_groups_limits_without_a_penalty_and_reports_a_refusal(daemon, monkeypatch):
    from pam_cgpolicy.errors import SystemdError

    def refuse(uid, props, timeout, bus):
        raise SystemdError("org.freedesktop.DBus.Error.AccessDenied", "refused")

    monkeypatch.setattr(daemon_mod, "set_slice_properties", refuse)
    monkeypatch.setattr(daemon_mod.log, "error", lambda _kind, _text, **_who: None)
    with pytest.raises(SystemdError, match="refused"):
        asyncio.run(daemon.apply_user("carol", "uid 0 (root)"))
    assert daemon.pending == {5000}  # retried at the next cycle
    monkeypatch.setattr(daemon_mod, "set_slice_properties", lambda uid, p, t, b: None)
    line = asyncio.run(daemon.apply_user("carol", "uid 0 (root)"))
    assert 'limits="CPUQuota=200% MemoryMax=4G"' in line and "tier=" not in line
    assert daemon.pending == set()
