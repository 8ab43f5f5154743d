"""The harness itself works: the guest boots in the asked cgroup mode and logins get slices."""

from __future__ import annotations

import time

import pytest
from vmharness.machine import VM

pytestmark = pytest.mark.vm

SMOKE_USER, SMOKE_UID = "smoke", 4201


def test_cgroup_mode_is_the_one_asked_for(vm: VM) -> None:
    assert vm.cgroup_mode() == vm.cgroup


def test_systemd_is_up(vm: VM) -> None:
    state = vm.system_state()
    if state == "degraded":
        print(vm.ssh("systemctl --failed --no-legend --plain", check=False).stdout)
    assert state in ("running", "degraded")


@pytest.mark.v2_only  # nothing here differs on cgroup v1
def test_guest_network_is_configured_by_networkd(vm: VM) -> None:
    links = vm.ssh("networkctl list --no-legend").stdout
    assert "routable" in links, links


def test_user_login_gets_a_user_slice(vm: VM) -> None:
    vm.add_user(SMOKE_USER, SMOKE_UID, groups=("smokers",))
    login = vm.ssh("id -Gn; cat /proc/self/cgroup", user=SMOKE_USER)
    assert "smokers" in login.stdout.split("\n", 1)[0]
    assert f"/user.slice/user-{SMOKE_UID}.slice/" in login.stdout
    shown = vm.ssh(f"systemctl show -p ControlGroup --value user-{SMOKE_UID}.slice").stdout
    assert shown.strip() == f"/user.slice/user-{SMOKE_UID}.slice"


@pytest.mark.v2_only  # nothing here differs on cgroup v1
def test_each_user_call_is_a_new_pam_session(vm: VM) -> None:
    vm.add_user(SMOKE_USER, SMOKE_UID)
    first = vm.ssh("echo $XDG_SESSION_ID", user=SMOKE_USER).stdout.strip()
    second = vm.ssh("echo $XDG_SESSION_ID", user=SMOKE_USER).stdout.strip()
    assert first and second and first != second


@pytest.mark.v2_only  # nothing here differs on cgroup v1
def test_root_reuses_one_session_unless_asked_for_a_new_login(vm: VM) -> None:
    def session() -> str:
        return vm.ssh("echo $XDG_SESSION_ID").stdout.strip()

    def new_session() -> str:
        return vm.ssh("echo $XDG_SESSION_ID", new_login=True).stdout.strip()

    assert session() == session()
    fresh = {new_session(), new_session()}
    assert len(fresh) == 2 and session() not in fresh


def test_busctl_reaches_systemd(vm: VM) -> None:
    version = vm.ssh(
        "busctl get-property org.freedesktop.systemd1 /org/freedesktop/systemd1 "
        "org.freedesktop.systemd1.Manager Version"
    ).stdout
    assert version.startswith("s ")


@pytest.mark.v2_only  # nothing here differs on cgroup v1
def test_round_trip_times(vm: VM) -> None:
    """Not a benchmark: catches a lost ControlMaster, which makes every call ~1 s slower."""
    vm.add_user(SMOKE_USER, SMOKE_UID)
    started = time.monotonic()
    for _ in range(5):
        vm.ssh("true")
    root = (time.monotonic() - started) / 5
    started = time.monotonic()
    vm.ssh("true", user=SMOKE_USER)
    login = time.monotonic() - started
    print(f"cgroup {vm.cgroup}: root (multiplexed) {root:.3f}s, fresh user login {login:.3f}s")
    assert root < login
