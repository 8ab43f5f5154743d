"""cgpolicyd's reload: any failure keeps the policy in force, is said once, and is retried."""

import asyncio
import errno
from unittest import mock

import pytest
from fakeslices import DictAccounts, NoSlices
from policyfiles import GROUPS, MAIN, write_policy

from pam_cgpolicy import daemon as daemon_mod
from pam_cgpolicy import network
from pam_cgpolicy.policy import load_policy
from pam_cgpolicy.state import StateStore


@pytest.fixture
def node(tmp_path, monkeypatch):
    root = write_policy(tmp_path / "etc")
    errors: list[str] = []
    monkeypatch.setattr(daemon_mod.log, "error", lambda _kind, text, **_who: errors.append(text))
    monkeypatch.setattr(daemon_mod.log, "info", lambda _kind, _text, **_who: None)
    store = StateStore.open(tmp_path / "state.db")
    daemon = daemon_mod.Daemon(
        load_policy(root),
        store,
        None,
        NoSlices(),
        accounts=DictAccounts({}),
        config=str(root),
        penalties=str(tmp_path / "penalties"),
        last_good=str(tmp_path / "policy.compiled"),
        memory=8 * 1024**3,
        # as under the unit as shipped, without the network drop-in
        tcp_refused=lambda: OSError(errno.EAFNOSUPPORT, "Address family not supported"),
    )
    yield root, daemon, errors
    store.close()


def test_a_bug_while_loading_keeps_the_old_policy_says_it_once_and_retries(node):
    root, daemon, errors = node
    good = daemon.policy
    (root / "groups.d" / "normal.toml").write_text('[limits]\nCPUQuota = "300%"\n')
    failing = mock.patch.object(daemon_mod, "load_policy", side_effect=OverflowError("too big"))
    with failing as load:
        for _ in range(3):  # the edit's cycle, then two more with the files unchanged
            asyncio.run(daemon.cycle())
        assert load.call_count == 3  # retried at each cycle
        assert daemon.refused == [f"{root}/cgpolicy.toml: cannot be loaded: OverflowError: too big"]
        assert daemon.policy is good
        assert (
            len(errors) == 1 and "event=reload-refused" in errors[0] and "policy=old" in errors[0]
        )
        asyncio.run(daemon.reload("SIGHUP"))  # an admin's own reload is always answered
    assert len(errors) == 2 and errors[1].startswith("event=reload-refused actor=SIGHUP")
    asyncio.run(daemon.cycle())  # the cause is gone: the edit takes effect
    assert daemon.refused == []
    assert daemon.policy.groups["normal"].limits == {"CPUQuota": "300%"}


def test_a_policy_that_fails_to_compile_changes_nothing(node):
    root, daemon, _ = node
    good, compiled = daemon.policy, daemon.engine.compiled
    (root / "groups.d" / "normal.toml").write_text(GROUPS["normal"].replace("200%", "250%"))
    with mock.patch("pam_cgpolicy.policy.Policy.compile", side_effect=RuntimeError("a bug")):
        problems = asyncio.run(daemon.reload("SIGHUP"))
    assert problems == [f"{root}/cgpolicy.toml: cannot be loaded: RuntimeError: a bug"]
    assert daemon.policy is good and daemon.engine.compiled is compiled


def test_group_membership_is_looked_up_again_at_each_cycle(node, monkeypatch):
    """A user moved between groups is classified by the new membership next cycle."""
    from pam_cgpolicy.accounts import Account

    _, daemon, _ = node
    daemon.accounts.accounts[5000] = Account("carol", 5000, frozenset({5000}))
    assert daemon._account(5000).gids == frozenset({5000})
    daemon.accounts.accounts[5000] = Account("carol", 5000, frozenset({5000, 4242}))
    assert daemon._account(5000).gids == frozenset({5000})  # within the cycle: the same
    asyncio.run(daemon.cycle())
    assert daemon._account(5000).gids == frozenset({5000, 4242})


def test_a_policy_that_needs_tcp_the_unit_refuses_is_told_at_start_and_each_reload(node):
    root, daemon, errors = node
    asyncio.run(daemon.start())
    asyncio.run(daemon.reload("SIGHUP"))
    assert errors == []  # no [notify] nor [sync]: no need of TCP
    notify = '[notify]\nhost = "localhost"\nfrom = "a@example.org"\nuser_address = "{user}@x.org"\n'
    (root / "cgpolicy.toml").write_text(MAIN + notify)
    asyncio.run(daemon.reload("SIGHUP"))
    (line,) = errors
    assert line.startswith("event=network-denied error=") and "Address family" in line
    assert all(command in line for command in network.ENABLE)
    asyncio.run(daemon.cycle())  # not at every cycle
    asyncio.run(daemon.start())
    assert len(errors) == 2
    daemon.tcp_refused = lambda: None  # the drop-in in place
    asyncio.run(daemon.reload("SIGHUP"))
    assert len(errors) == 2
