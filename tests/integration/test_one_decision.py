"""Every writer of a slice's limits keeps a penalty in force: cgpolicyd, the login
hook, ``cgpolicyctl apply`` (through cgpolicyd, and without it) and ``selftest``.

ursula (a student) is put in penalty2 by Penalize; each writer then sets her
slice, and systemd must still show penalty2's limits, not her group's. The
policy is test_daemon.py's, with ursula among the students and penalty2 long
enough for the whole module.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_daemon import (
    POLICY,
    call,
    call_ok,
    diagnostics,
    get_user,
    keep_logged_in_unjudged,
    login,
    poll,
    root,
    slice_prop,
    wait_until_serving,
    write_policy,
)

# v2 only: nothing here differs on cgroup v1 (see conftest.py)
pytestmark = [pytest.mark.vm, pytest.mark.v2_only]

REPO = Path(__file__).resolve().parents[2]
USER, UID = "ursula", 2801
MiB = 1024**2
TIER = "penalty2"  # CPU 0.25 and memory 0.5 of the students' 50% and 512M
# What systemd shows on her slice: in the tier, and with her group's own limits.
IN_TIER = {"CPUQuotaPerSecUSec": "125ms", "MemoryMax": str(256 * MiB)}
GROUPS_OWN = {"CPUQuotaPerSecUSec": "500ms", "MemoryMax": str(512 * MiB)}

MAIN = POLICY["cgpolicy.toml"].replace("timeout = 60\n", "timeout = 900\n")
OUR_POLICY = {
    **POLICY,
    "cgpolicy.toml": MAIN,
    "groups.d/students.toml": POLICY["groups.d/students.toml"].replace(
        'users = ["bob", "wendy"]', f'users = ["bob", "wendy", "{USER}"]'
    ),
}


def shown(vm) -> dict[str, str]:
    return {name: slice_prop(vm, UID, name) for name in IN_TIER}


def slice_diagnostics(vm) -> str:
    info = call(vm, "GetUser", "s", USER)
    return f"{diagnostics(vm)}\n--- GetUser {USER} ---\n{info.stdout}{info.stderr}"


def assert_in_tier(vm, after: str) -> None:
    """The tier's limits now and over the next cycles: no writer put the group's back."""
    for _ in range(3):
        now = shown(vm)
        assert now == IN_TIER, (
            f"after {after}, user-{UID}.slice shows {now}, the tier's are {IN_TIER} "
            f"(the group's {GROUPS_OWN})\n{slice_diagnostics(vm)}"
        )
        root(vm, "sleep 1.5")


def hook_lines(vm) -> list[str]:
    out = root(vm, "journalctl -b -t cgpolicy-pam-hook -o cat --no-pager").stdout
    return [line for line in out.splitlines() if line.startswith(f"user={USER} ")]


@pytest.fixture(scope="module")
def node(vm) -> Iterator[Any]:
    from vmharness.install import install_cgpolicy

    install_cgpolicy(vm, REPO)
    vm.add_user(USER, UID)
    root(vm, "rm -f /etc/cgpolicy/groups.d/*.toml")
    write_policy(vm, OUR_POLICY)
    root(vm, "cgpolicyctl check")
    keep_logged_in_unjudged(vm, [USER])  # (re)starts cgpolicyd on this policy
    call_ok(vm, "Penalize", "ss", USER, TIER)
    assert get_user(vm, USER).get("tier") == TIER
    poll(
        f"user-{UID}.slice in {TIER}",
        lambda: shown(vm),
        lambda now: now == IN_TIER,
        20,
        lambda: slice_diagnostics(vm),
        every=1.0,
    )
    yield vm
    if vm.running:  # nobody penalized, the daemon running, for the modules after this one
        root(vm, "systemctl start cgpolicyd", check=False)
        wait_until_serving(vm)
        call(vm, "Release", "s", USER)


def test_apply_through_cgpolicyd_keeps_the_tier(node):
    done = root(node, f"cgpolicyctl apply {USER}", check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"tier={TIER} " in done.stdout and "CPUQuota=12.5%" in done.stdout, done.stdout
    assert_in_tier(node, "cgpolicyctl apply with cgpolicyd running")


def test_apply_without_cgpolicyd_keeps_the_tier(node):
    root(node, "systemctl stop cgpolicyd")
    try:
        done = root(node, f"cgpolicyctl apply {USER}", check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"tier={TIER} " in done.stdout, done.stdout
        assert_in_tier(node, "cgpolicyctl apply with cgpolicyd stopped")
    finally:
        root(node, "systemctl start cgpolicyd", check=False)
        wait_until_serving(node)
    assert get_user(node, USER).get("tier") == TIER


def test_the_hook_logs_the_tiers_limits_it_sets_at_login(node):
    # In the emulated guest a login's hook has run past its hook_timeout when
    # the guest was busy: it let the login through, as it must. Then one more login.
    for _ in range(3):
        before = len(hook_lines(node))
        login(node, USER, "true")
        lines = hook_lines(node)[before:]
        assert lines, "no hook line for the login"
        if "action=timeout" not in lines[-1]:
            break
    assert f"tier={TIER} " in lines[-1] and 'limits="CPUQuota=12.5% ' in lines[-1], lines
    assert "action=applied" in lines[-1], lines
    assert_in_tier(node, "a login")


def test_selftest_expects_the_tier_and_keeps_it(node):
    done = root(node, f"cgpolicyctl selftest {USER}", check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[ok] CPUQuotaPerSecUSec=125000" in done.stdout, done.stdout
    assert "selftest: ok" in done.stdout
    assert_in_tier(node, "cgpolicyctl selftest")
