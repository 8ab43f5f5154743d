"""Freezing a user holds what arrives later too, on cgroup v2 and v1 alike.

fred is frozen while logged in; then he logs in again over ssh and starts a
counter, and a process is started in his slice without a login (as cron or a
timer would). Neither may run until the thaw, and both run after it. On cgroup
v2 the kernel does this by itself (a frozen slice freezes what enters it); on
v1 cgpolicy does it: the login hook holds a frozen user's new login, and
cgpolicyd sweeps what enters the slice into the frozen group at each cycle.

Every wait polls against a deadline; "does not advance" is watched for a few of
cgpolicyd's intervals (2 s here) after the task is seen held.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_daemon import poll, root, write_policy

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]
USER, UID = "fred", 2010
OTHER = "gina"  # not an admin: may not learn who is frozen
POLICY = {
    "cgpolicy.toml": """
        [general]
        interval = 2  # cgpolicyd's sweep on cgroup v1
        hook_timeout = 5.0

        [status]
        order = ["normal"]
        fallback = "normal"
        """,
    "groups.d/normal.toml": """
        [limits]
        TasksMax = 512
        """,
}
WATCH = 3 * 2 + 1  # seconds a held counter must stay still: three intervals and some
FREEZER = "/sys/fs/cgroup/freezer"
# A counter: a number written to a file five times a second.
COUNT = "i=0; while :; do i=$((i+1)); echo $i > {file}; sleep 0.2; done"


def count(vm, file: str) -> int | None:
    text = root(vm, f"cat {file} 2>/dev/null", check=False).stdout.strip()
    return int(text) if text.isdigit() else None


def diagnostics(vm) -> str:
    return root(
        vm,
        f"cgpolicyctl status {USER}; systemd-cgls --no-pager /user.slice/user-{UID}.slice; "
        f"ps -o pid,stat,cgroup:200,args -u {USER}; "
        "journalctl -q --no-pager -n 30 -t cgpolicyd -t cgpolicy-pam-hook",
        check=False,
    ).stdout


def status(vm) -> str:
    out = root(vm, f"cgpolicyctl status {USER} --json", check=False).stdout
    found = re.search(r'"freezer":\s*"(\w+)"', out)
    return found[1] if found else out


def still(vm, file: str) -> int | None:
    """The counter's value, after checking it does not move for WATCH seconds."""
    first = count(vm, file)
    deadline = time.monotonic() + WATCH
    while time.monotonic() < deadline:
        now = count(vm, file)
        assert now == first, f"{file} went from {first} to {now} while {USER} was frozen"
        time.sleep(1.0)
    return first


def advances(vm, file: str, since: int | None) -> None:
    poll(
        f"{file} advancing after the thaw",
        lambda: count(vm, file),
        lambda value: value is not None and value > (since or 0),
        30.0,
        lambda: diagnostics(vm),
    )


def sessions(vm) -> int:
    """How many session scopes fred's slice has: one more once a new login has its own."""
    top = "/sys/fs/cgroup" if vm.cgroup == "v2" else "/sys/fs/cgroup/systemd"
    found = root(vm, f"ls -d {top}/user.slice/user-{UID}.slice/session-*.scope", check=False)
    return len(found.stdout.split())


def hook_lines(vm) -> list[str]:
    """The login hook's log lines about fred, oldest first."""
    out = root(vm, "journalctl -q -o cat -t cgpolicy-pam-hook", check=False).stdout
    return [line for line in out.splitlines() if USER in line]


def freezer_group(vm, pid: int) -> str:
    cgroups = root(vm, f"cat /proc/{pid}/cgroup").stdout
    return re.search(r"^\d+:freezer:(.*)$", cgroups, re.MULTILINE)[1]  # type: ignore[index]


@pytest.fixture(scope="module")
def node(vm) -> Iterator[Any]:
    from vmharness.install import install_cgpolicy

    install_cgpolicy(vm, REPO)
    vm.add_user(USER, UID)
    vm.add_user(OTHER, UID + 1)
    root(vm, "rm -f /etc/cgpolicy/groups.d/*.toml")
    write_policy(vm, POLICY)
    root(vm, "cgpolicyctl check && systemctl restart cgpolicyd")
    vm.ssh("nohup sleep 100000 >/dev/null 2>&1 &", user=USER)  # his slice stays
    yield vm
    if vm.running:
        root(vm, f"cgpolicyctl thaw {USER}; pkill -u {USER}", check=False)


@pytest.fixture
def frozen(node) -> Iterator[Any]:
    root(node, f"cgpolicyctl thaw {USER}; rm -f /tmp/fred-*", check=False)
    root(node, f"cgpolicyctl freeze {USER}")
    assert status(node) == "frozen", diagnostics(node)
    try:
        yield node
    finally:
        root(node, f"systemctl kill -s SIGCONT cgpolicyd; cgpolicyctl thaw {USER}", check=False)


@pytest.mark.parametrize("daemon", ["running", "paused"])
def test_a_frozen_users_new_login_waits_for_the_thaw(frozen, daemon):
    """His new ssh login and the counter it starts run only after the thaw.

    On v1 with cgpolicyd running, its sweep may hold the login before the hook
    does; with cgpolicyd paused (SIGSTOP) the hook alone must.
    """
    file = "/tmp/fred-login"
    if daemon == "paused":
        root(frozen, "systemctl kill -s SIGSTOP cgpolicyd")
    done: dict[str, Any] = {}

    def log_in() -> None:
        try:
            done["result"] = frozen.ssh(
                f"nohup sh -c '{COUNT.format(file=file)}' >/dev/null 2>&1 & echo started",
                user=USER,
                timeout=180,
            )
        except Exception as err:  # reported by the test thread
            done["error"] = err

    before, before_hook = sessions(frozen), len(hook_lines(frozen))
    login = threading.Thread(target=log_in, daemon=True)
    login.start()
    poll(
        "fred's new login's session scope in his slice",
        lambda: sessions(frozen),
        lambda now: now > before,
        60.0,
        lambda: diagnostics(frozen),
    )
    value = still(frozen, file)
    assert login.is_alive(), f"the login went through while {USER} was frozen: {done}"
    # Where the login waits: on v2 the kernel froze sshd's session process as it
    # entered the slice, before it ran the hook; on v1 the hook ran and held it.
    hook = hook_lines(frozen)[before_hook:]
    if frozen.cgroup == "v2":
        assert hook == [], f"the hook ran for a login frozen before it: {hook}"
    elif daemon == "paused":
        assert len(hook) == 1 and "frozen=held" in hook[0], hook
    else:
        assert all("frozen=held" in line for line in hook), hook
    root(frozen, "systemctl kill -s SIGCONT cgpolicyd")
    assert status(frozen) == "frozen", diagnostics(frozen)
    root(frozen, f"cgpolicyctl thaw {USER}")
    login.join(120)
    assert not login.is_alive(), "the login still hangs after the thaw\n" + diagnostics(frozen)
    assert "error" not in done and "started" in done["result"].stdout, done
    advances(frozen, file, value)
    root(frozen, f"pkill -u {USER} -f {file}", check=False)


def test_a_process_started_later_in_the_slice_is_frozen_too(frozen):
    """A unit started in his slice without a login (cron, a timer) is held until the thaw."""
    file = "/tmp/fred-later"
    root(
        frozen,
        f"systemd-run --quiet --uid={USER} --slice=user-{UID}.slice --unit=fred-later "
        f"--collect /bin/sh -c '{COUNT.format(file=file)}'",
    )
    try:
        pid = int(root(frozen, "systemctl show -P MainPID fred-later").stdout)
        assert pid, diagnostics(frozen)
        if frozen.cgroup == "v1":
            poll(
                "the later process swept into the frozen group",
                lambda: freezer_group(frozen, pid),
                lambda group: group == f"/cgpolicy/user-{UID}.slice",
                30.0,
                lambda: diagnostics(frozen),
            )
        value = still(frozen, file)
        assert status(frozen) == "frozen", diagnostics(frozen)
        root(frozen, f"cgpolicyctl thaw {USER}")
        advances(frozen, file, value)
    finally:
        root(frozen, "systemctl stop fred-later", check=False)


def test_v1_thaw_puts_every_task_back_in_its_freezer_group(node):
    """A task that was in a freezer group of its own goes back there, the rest to the root;
    and other users cannot list cgpolicy's freezer groups to learn who is frozen."""
    if node.cgroup != "v1":
        pytest.skip("the v1 freezer hierarchy exists on cgroup v1 only")
    root(node, f"cgpolicyctl thaw {USER}; mkdir -p {FREEZER}/elsewhere", check=False)
    pid = int(
        node.ssh("nohup sleep 100000 >/dev/null 2>&1 & echo $!", user=USER).stdout.split()[-1]
    )
    root(node, f"echo {pid} > {FREEZER}/elsewhere/cgroup.procs")
    others = [int(p) for p in root(node, f"pgrep -u {USER}").stdout.split() if int(p) != pid]
    root(node, f"cgpolicyctl freeze {USER}")
    try:
        assert freezer_group(node, pid) == f"/cgpolicy/user-{UID}.slice"
        listing = node.ssh(f"ls {FREEZER}/cgpolicy 2>&1; true", user=OTHER).stdout
        assert "Permission denied" in listing, f"{OTHER} may list who is frozen: {listing}"
    finally:
        root(node, f"cgpolicyctl thaw {USER}")
    assert freezer_group(node, pid) == "/elsewhere"
    for other in others:
        group = root(node, f"grep freezer /proc/{other}/cgroup", check=False).stdout.strip()
        assert group.endswith(":freezer:/") or not group, f"task {other} left in {group}"
    root(node, f"kill {pid}; rmdir {FREEZER}/elsewhere", check=False)
