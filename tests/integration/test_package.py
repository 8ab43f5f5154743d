"""The .deb's life on a login node: upgrade, remove and purge, with users logged in.

cgroup v2 node only (the .deb's node). It starts from the package of a previous
version (the same tree, built with a lower version), a penalty in force and a
user logged in. It ends with the tree's package installed again, as the
modules after it expect.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_daemon import get_user, main_pid, poll, slice_prop, wait_until_serving, write_policy
from vmharness.install import build_deb, install_cgpolicy, install_deb

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]
CURRENT = (REPO / "debian" / "changelog").read_text().split("(", 1)[1].split(")", 1)[0]
PREVIOUS = "0.0.9"  # any version below the changelog's

# Only files the package ships (conffiles), so that purge has all of them to remove.
POLICY = {
    "cgpolicy.toml": """
        [general]
        min_uid = 1000
        hook_timeout = 5.0
        interval = 5

        [status]
        order = ["admins", "students", "normal"]
        fallback = "normal"

        [penalty]
        order = ["penalty1"]

        [penalty.penalty1]
        timeout = 3600
        cpu_factor = 0.5
        memory_factor = 1.0
        """,
    "groups.d/admins.toml": """
        groups = ["pkgadmins"]
        exempt = true
        """,
    "groups.d/students.toml": """
        uids = ["3100-3199"]
        [limits]
        CPUQuota = "80%"
        MemoryMax = "1G"
        """,
    "groups.d/normal.toml": """
        [limits]
        CPUQuota = "100%"
        """,
}
PENALIZED, PENALIZED_UID = "pkgpat", 3101  # in penalty1 across the upgrade
VISITOR, VISITOR_UID = "pkgvic", 3102  # logs in while apt works
GROUP_CPU, PENALTY_CPU = "800ms", "400ms"  # CPUQuotaPerSecUSec: 80%, and half of it

PAM_LINE = "grep -rl cgpolicy-pam-hook /etc/pam.d || true"
PAM_SEEN = "grep -x cgpolicy /var/lib/pam/seen || true"  # pam-auth-update's memory


def root(vm: Any, cmd: str, check: bool = True, timeout: float = 300) -> Any:
    return vm.ssh(cmd, check=check, timeout=timeout)


def apt(vm: Any, *words: str) -> Any:
    return root(vm, "DEBIAN_FRONTEND=noninteractive apt-get -y -q " + " ".join(words))


class Logins:
    """VISITOR logs in over SSH again and again in a thread, while the body of ``with`` runs."""

    def __init__(self, vm: Any) -> None:
        self.vm = vm
        self.results: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            done = self.vm.ssh("echo in", user=VISITOR, check=False, timeout=60)
            self.results.append((done.returncode, done.stdout + done.stderr))

    def __enter__(self) -> Logins:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=90)

    def failures(self) -> list[str]:
        return [out for code, out in self.results if code != 0 or "in" not in out.split()]


def login_works(vm: Any) -> None:
    done = vm.ssh("echo in", user=VISITOR, check=False, timeout=60)
    assert done.returncode == 0 and done.stdout.split() == ["in"], done.stdout + done.stderr


@pytest.fixture(scope="module")
def old_node(vm_v2: Any) -> Iterator[Any]:
    """The previous version installed, PENALIZED logged in and in penalty1."""
    vm = vm_v2
    previous, current = build_deb(REPO, PREVIOUS), build_deb(REPO)
    assert previous != current
    # From nothing: no cgpolicy, and no policy other modules left.
    root(
        vm,
        "dpkg -s cgpolicy >/dev/null 2>&1 && "
        "DEBIAN_FRONTEND=noninteractive apt-get -y -q purge cgpolicy; "
        "rm -rf /etc/cgpolicy /var/lib/cgpolicy",
    )
    install_deb(vm, previous)
    write_policy(vm, POLICY)
    root(vm, "getent group pkgadmins >/dev/null || groupadd pkgadmins")
    vm.add_user(PENALIZED, PENALIZED_UID)
    vm.add_user(VISITOR, VISITOR_UID)
    root(vm, "cgpolicyctl check && systemctl restart cgpolicyd")
    wait_until_serving(vm)
    vm.ssh("nohup sleep 100000 >/dev/null 2>&1 &", user=PENALIZED)
    root(vm, f"cgpolicyctl penalize {PENALIZED} penalty1")
    yield vm
    if vm.running:
        # Nobody left in a slice this module limited; the tree's package back.
        root(vm, f"pkill -u {PENALIZED}; pkill -u {VISITOR}", check=False)
        install_cgpolicy(vm, REPO)


def test_upgrade_keeps_the_penalty_restarts_the_daemon_and_lets_logins_in(old_node):
    vm = old_node
    before = get_user(vm, PENALIZED)
    assert before.get("tier") == "penalty1", before
    assert slice_prop(vm, PENALIZED_UID, "CPUQuotaPerSecUSec") == PENALTY_CPU
    old_pid = main_pid(vm)

    with Logins(vm) as logins:
        time.sleep(2)  # a login under way as apt starts
        install_deb(vm, build_deb(REPO))
        time.sleep(2)
    assert len(logins.results) >= 2, logins.results
    assert not logins.failures(), logins.failures()

    assert root(vm, "dpkg-query -W -f '${Version}' cgpolicy").stdout == CURRENT
    new_pid = wait_until_serving(vm, other_than=old_pid)
    assert new_pid != old_pid
    after = get_user(vm, PENALIZED)
    assert after.get("tier") == "penalty1", after
    assert after["tier_expiry"] == pytest.approx(before["tier_expiry"], abs=1e-3)
    assert slice_prop(vm, PENALIZED_UID, "CPUQuotaPerSecUSec") == PENALTY_CPU
    # A new login of the penalized user keeps the penalty's limit.
    vm.ssh("true", user=PENALIZED)
    assert slice_prop(vm, PENALIZED_UID, "CPUQuotaPerSecUSec") == PENALTY_CPU


def test_remove_takes_the_pam_line_first_and_logins_still_work(old_node):
    vm = old_node
    with Logins(vm) as logins:
        apt(vm, "remove", "cgpolicy")
    assert not logins.failures(), logins.failures()
    assert root(vm, PAM_LINE).stdout.strip() == ""
    # Forgotten, so that installing again enables the profile again.
    assert root(vm, PAM_SEEN).stdout.strip() == ""
    assert root(vm, "test -e /usr/sbin/cgpolicy-pam-hook", check=False).returncode != 0
    state = root(vm, "systemctl is-active cgpolicyd", check=False).stdout.strip()
    assert state != "active"
    login_works(vm)
    # The policy and the penalties' record stay until purge.
    assert root(vm, "stat -c '%a %U' /var/lib/cgpolicy /etc/cgpolicy/cgpolicy.toml").stdout.split(
        "\n"
    )[:2] == ["700 root", "644 root"]


def test_purge_leaves_nothing_of_cgpolicy_behind(old_node):
    vm = old_node
    apt(vm, "purge", "cgpolicy")
    status = root(vm, "dpkg-query -W -f '${Status}' cgpolicy", check=False).stdout
    assert "installed" not in status.replace("not-installed", ""), status
    leftovers = root(
        vm,
        "ls -d /etc/cgpolicy /var/lib/cgpolicy /usr/sbin/cgpolicy* "
        "/usr/lib/python3/dist-packages/pam_cgpolicy /usr/share/pam-configs/cgpolicy "
        "/etc/systemd/system/*/cgpolicyd.service /etc/systemd/system/dbus-org.cgpolicy1.service "
        "/lib/systemd/system/cgpolicyd.service /usr/share/cgpolicy "
        "/usr/share/dbus-1/*/org.cgpolicy1* "
        "/etc/pam.d/cgpolicy-selftest /usr/share/bash-completion/completions/cgpolicyctl "
        "/usr/share/man/man*/cgpolicy* 2>/dev/null",
        check=False,
    ).stdout.split()
    assert leftovers == []
    assert root(vm, PAM_LINE).stdout.strip() == ""
    assert root(vm, PAM_SEEN).stdout.strip() == ""
    units = root(vm, "systemctl list-unit-files 'cgpolicyd*' --no-legend", check=False)
    assert units.stdout.strip() == ""  # (and exit 1: no unit matches)
    login_works(vm)
    poll(
        "cgpolicyd gone from the bus",
        lambda: root(vm, "busctl status org.cgpolicy1", check=False).returncode,
        lambda code: code != 0,
        30,
        lambda: root(vm, "systemctl status cgpolicyd", check=False).stdout,
    )
