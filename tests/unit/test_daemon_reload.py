"""cgpolicyd's reload: any failure keeps the policy in force, is said once, and is retried."""

import asyncio
from unittest import mock

import pytest
from fakeslices import NoSlices
from policyfiles import GROUPS, write_policy

from pam_cgpolicy import daemon as daemon_mod
from pam_cgpolicy.policy import load_policy
from pam_cgpolicy.state import StateStore


@pytest.fixture
def node(tmp_path, monkeypatch):
    root = write_policy(tmp_path / "etc")
    monkeypatch.setattr(daemon_mod, "config_dir", lambda: str(root))
    monkeypatch.setattr(daemon_mod, "penalties_file", lambda: str(tmp_path / "penalties"))
    errors: list[str] = []
    monkeypatch.setattr(daemon_mod.log, "error", errors.append)
    monkeypatch.setattr(daemon_mod.log, "info", lambda _line: None)
    store = StateStore.open(tmp_path / "state.db")
    daemon = daemon_mod.Daemon(load_policy(root), store, None, NoSlices())
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


def test_start_with_a_policy_that_raises_is_a_logged_refusal(node, monkeypatch):
    root, _, errors = node
    monkeypatch.setattr(daemon_mod.log, "open_log", lambda _ident: None)
    with mock.patch.object(daemon_mod, "load_policy", side_effect=KeyError("../cgpolicy")):
        assert asyncio.run(daemon_mod.serve_forever()) == 1
    assert errors == [
        f"cannot start, the policy is invalid: {root}/cgpolicy.toml: cannot be loaded: "
        "KeyError: '../cgpolicy'"
    ]


def test_group_membership_is_looked_up_again_at_each_cycle(node, monkeypatch):
    """A user moved between groups is classified by the new membership next cycle."""
    from pam_cgpolicy.accounts import Account

    _, daemon, _ = node
    groups = {"now": frozenset({5000})}
    monkeypatch.setattr(daemon_mod, "lookup_uid", lambda uid: Account("carol", uid, groups["now"]))
    assert daemon._account(5000).gids == frozenset({5000})
    groups["now"] = frozenset({5000, 4242})
    asyncio.run(daemon.cycle())
    assert daemon._account(5000).gids == frozenset({5000, 4242})
