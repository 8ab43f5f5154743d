"""cgpolicyd on a real login node: badness, penalty tiers, restarts, reboots and access.

Runs once on cgroup v2 and once on cgroup v1, in file order: the tests share one
VM and build on each other's state (bob's penalties go penalty1, released,
penalty2; the restart and reboot tests need a penalty in force). The daemon is
asked over the system bus with busctl, as an admin would; limits are read back
from systemd and from the kernel's cgroup files, events from the journal.

Timings are short for an emulated guest: the daemon samples every 2 s, a busy
user reaches badness 100 in about three samples, penalty1 lasts 40 s and
penalty2 60 s. Every wait polls against a deadline.

The users' uids agree with test_login_node.py (bob 2002, carol 2003), so both
modules can share a session's VM.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
from test_login_node import HOOK_TIMEOUT

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]
MiB = 1024**2

BUS = "org.cgpolicy1"
OBJECT = "/org/cgpolicy1"
IFACE = "org.cgpolicy1.Manager"
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
METHODS = (
    "GetUser",
    "ListUsers",
    "FreezeUser",
    "ThawUser",
    "Penalize",
    "Release",
    "Apply",
    "Reload",
    "Status",
)

POLICY = {
    "cgpolicy.toml": f"""
        [general]
        min_uid = 1000
        hook_timeout = {HOOK_TIMEOUT}
        interval = 2
        admin_group = "cgadmins"

        [status]
        order = ["admins", "students", "normal"]
        fallback = "normal"

        [badness]
        cpu_threshold = 0.5
        memory_threshold = 0.5
        time_to_max_bad = 10
        time_to_min_bad = 20

        [processes]
        whitelist = ["sshd", "scp", "sftp-server", "rsync"]

        [penalty]
        order = ["penalty1", "penalty2"]
        occurrence_timeout = 3600

        [penalty.penalty1]
        timeout = 40
        cpu_factor = 0.5
        memory_factor = 0.8

        [penalty.penalty2]
        timeout = 60
        cpu_factor = 0.25
        memory_factor = 0.5
        """,
    "groups.d/admins.toml": """
        groups = ["cgadmins"]
        exempt = true
        """,
    "groups.d/students.toml": """
        users = ["bob", "wendy"]
        [limits]
        CPUQuota = "50%"
        MemoryMax = "512M"
        TasksMax = 128
        """,
    "groups.d/normal.toml": """
        [limits]
        CPUQuota = "100%"
        MemoryMax = "1G"
        """,
}

# name: (uid, supplementary groups). bob and carol have the uids test_login_node.py
# gives them; wendy and ann take uids no other module uses.
USERS = {
    "bob": (2002, []),  # students
    "carol": (2003, []),  # normal (fallback)
    "wendy": (2004, []),  # students, runs a whitelisted process
    "ann": (2006, ["cgadmins"]),  # admins: exempt, may call everything
}

TIMEOUT = {"penalty1": 40.0, "penalty2": 60.0}
# CPUQuotaPerSecUSec as systemctl shows it, per group and tier.
CPU_SHOWN = {
    "students": {None: "500ms", "penalty1": "250ms", "penalty2": "125ms"},
    "normal": {None: "1s", "penalty1": "500ms", "penalty2": "250ms"},
}
# The same in the kernel's terms: microseconds of CPU per 100 ms period.
CPU_KERNEL = {
    "students": {None: 50000, "penalty1": 25000, "penalty2": 12500},
    "normal": {None: 100000, "penalty1": 50000, "penalty2": 25000},
}
STUDENT_MEMORY = {
    None: str(512 * MiB),
    "penalty1": str(int(512 * MiB * 0.8)),
    "penalty2": str(int(512 * MiB * 0.5)),
}

HOG = "for i in 1 2; do nohup sh -c 'while :; do :; done' >/dev/null 2>&1 & done"
HOG_PATTERN = "while :; do :; done"
# Run as wendy in her slice, as a unit of its own so it is easy to stop.
IN_WENDYS_SLICE = (
    "systemd-run --quiet --uid=wendy --slice=user-2004.slice --unit=wendy-rsync --collect "
    "-p StandardOutput=null -p WorkingDirectory=/home/wendy "
)
# The real rsync, busy: it checksums two equal sparse files of 1 TiB.
RSYNC = (
    "runuser -u wendy -- truncate -s 1T /home/wendy/big /home/wendy/big2 && "
    + IN_WENDYS_SLICE
    + "/usr/bin/rsync --checksum --dry-run /home/wendy/big /home/wendy/big2"
)
# CPU burners that only call themselves rsync: the name is all any user can set.
IMPOSTORS = {
    # argv[0] by exec -a, the process name by prctl (perl's $0 sets both)
    "exec -a": "echo '$0 = q(rsync); 1 while 1;' > /home/wendy/burn.pl && "
    + IN_WENDYS_SLICE
    + "/bin/bash -c 'exec -a rsync perl /home/wendy/burn.pl'",
    # the process name is the link's: rsync; the program is /usr/bin/yes
    "symlink": "runuser -u wendy -- ln -sf /usr/bin/yes /home/wendy/rsync && "
    + IN_WENDYS_SLICE
    + "/home/wendy/rsync",
}

T = TypeVar("T")


# --- talking to the guest -------------------------------------------------


def root(vm, cmd: str, check: bool = True, timeout: float = 120):
    return vm.ssh(cmd, check=check, timeout=timeout)


def login(vm, user: str, cmd: str = "true", check: bool = True):
    """A real SSH login: sshd, PAM, pam_systemd, then the cgpolicy hook."""
    return vm.ssh(cmd, user=user, check=check)


def keep_logged_in(vm, user: str) -> None:
    """Leave a process behind so the user's slice stays active after logout."""
    login(vm, user, "nohup sleep 100000 >/dev/null 2>&1 &")


def keep_logged_in_unjudged(vm, users) -> None:
    """keep_logged_in, with cgpolicyd stopped meanwhile, then (re)started.

    Under emulation a login costs its slice seconds of CPU (sshd, bash, the
    Python hook), and a student's login runs at the 50% quota for all of it:
    enough for badness 100, a penalty nobody asked for. Logins that only set
    the stage are made while nobody judges them, all at once: a first login
    mostly waits for the user's manager to start.
    """
    root(vm, "systemctl stop cgpolicyd")
    try:
        with ThreadPoolExecutor(len(users) or 1) as pool:
            list(pool.map(lambda user: keep_logged_in(vm, user), users))
    finally:
        root(vm, "systemctl start cgpolicyd", check=False)
    wait_until_serving(vm)


def write_policy(vm, files: dict[str, str]) -> None:
    for name, text in files.items():
        vm.put_bytes(textwrap.dedent(text).lstrip().encode(), f"/etc/cgpolicy/{name}", mode=0o644)


def guest_now(vm) -> float:
    return float(root(vm, "date +%s.%N").stdout)


def busctl(method: str, signature: str = "", *args: str, json_out: bool = True) -> str:
    """A busctl command line calling cgpolicyd."""
    words = ["busctl", *(["--json=short"] if json_out else []), "call", BUS, OBJECT, IFACE, method]
    if signature:
        words += [signature, *args]
    return shlex.join(words)


def dbus_send(method: str, *args: str) -> str:
    """The same call with dbus-send, which prints the D-Bus error's name."""
    typed = [f"string:{a}" for a in args]
    head = ["dbus-send", "--system", "--print-reply", f"--dest={BUS}", OBJECT]
    return shlex.join([*head, f"{IFACE}.{method}", *typed])


def unwrap(value: Any) -> Any:
    """busctl --json=short wraps variants as {"type": ..., "data": ...}."""
    if isinstance(value, dict) and set(value) == {"type", "data"}:
        return unwrap(value["data"])
    return value


def get_user_raw(vm, user: str, as_user: str = "root"):
    cmd = busctl("GetUser", "s", user)
    if as_user == "root":
        return root(vm, cmd, check=False)
    return login(vm, as_user, cmd, check=False)


def get_user(vm, user: str, as_user: str = "root") -> dict[str, Any]:
    done = get_user_raw(vm, user, as_user)
    if done.returncode != 0:
        raise AssertionError(
            f"GetUser {user} as {as_user} failed (exit {done.returncode}): "
            f"{done.stdout}{done.stderr}\n{diagnostics(vm)}"
        )
    (info,) = json.loads(done.stdout)["data"]
    return {key: unwrap(value) for key, value in info.items()}


def call(vm, method: str, signature: str = "", *args: str, as_user: str = "root"):
    cmd = busctl(method, signature, *args, json_out=False)
    if as_user == "root":
        return root(vm, cmd, check=False)
    return login(vm, as_user, cmd, check=False)


def call_ok(vm, method: str, signature: str = "", *args: str, as_user: str = "root") -> str:
    done = call(vm, method, signature, *args, as_user=as_user)
    assert done.returncode == 0, (
        f"{method} {' '.join(args)} as {as_user} failed (exit {done.returncode}): "
        f"{done.stdout}{done.stderr}\n{diagnostics(vm)}"
    )
    return done.stdout


def slice_prop(vm, uid: int, name: str) -> str:
    return root(vm, f"systemctl show -p {name} --value user-{uid}.slice").stdout.strip()


def cpu_kernel(vm, uid: int) -> int | None:
    """The slice's CPU quota from the cgroup file, in microseconds per 100 ms period."""
    if vm.cgroup_mode() == "v2":
        path = f"/sys/fs/cgroup/user.slice/user-{uid}.slice/cpu.max"
    else:
        path = f"/sys/fs/cgroup/cpu,cpuacct/user.slice/user-{uid}.slice/cpu.cfs_quota_us"
    text = root(vm, f"cat {path}").stdout.split()
    if vm.cgroup_mode() == "v2":
        assert text[1] == "100000", f"{path}: period {text[1]}, expected 100000"
        return None if text[0] == "max" else int(text[0])
    return None if text[0] == "-1" else int(text[0])


def main_pid(vm) -> int:
    return int(root(vm, "systemctl show -p MainPID --value cgpolicyd").stdout.strip() or 0)


def name_owner_pid(vm) -> int | None:
    """The pid owning org.cgpolicy1 on the bus; asking the bus itself never activates it."""
    done = root(
        vm,
        "busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus "
        f"GetConnectionUnixProcessID s {BUS}",
        check=False,
    )
    if done.returncode != 0:
        return None
    return int(done.stdout.split()[1])  # "u 1234"


# --- the journal --------------------------------------------------------


def daemon_log(vm, after: int = 0) -> list[str]:
    """cgpolicyd's journal lines of this boot, from line ``after`` on (see log_mark)."""
    cmd = "journalctl -b -t cgpolicyd -o cat --no-pager"
    return root(vm, cmd, check=False).stdout.splitlines()[after:]


def log_mark(vm) -> int:
    """Where cgpolicyd's log of this boot ends now."""
    return len(daemon_log(vm))


def events(lines: list[str], user: str, event: str) -> list[str]:
    return [line for line in lines if line.startswith(f"user={user} ") and f"event={event}" in line]


def logged(vm, user: str, event: str, after: int = 0) -> list[str]:
    """The user's lines of this event, waited for: the daemon records a change (which
    GetUser shows at once) before it sets the limits and logs it."""
    return poll(
        f"a cgpolicyd line user={user} ... event={event}",
        lambda: events(daemon_log(vm, after), user, event),
        bool,
        30,
        lambda: diagnostics(vm, user),
        every=1.0,
    )


def diagnostics(vm, *users: str) -> str:
    """What to show when a check fails: the daemon's state, log and the users' standing."""
    parts = []
    status = root(vm, "systemctl status cgpolicyd --no-pager -n 0 2>&1", check=False)
    parts.append("--- systemctl status cgpolicyd ---\n" + status.stdout.strip())
    tail = root(vm, "journalctl -u cgpolicyd -o short-precise -n 40 --no-pager", check=False)
    parts.append("--- cgpolicyd journal (tail) ---\n" + tail.stdout.strip())
    for user in users:
        done = get_user_raw(vm, user)
        parts.append(f"--- GetUser {user} ---\n{done.stdout.strip()}{done.stderr.strip()}")
        uid = root(vm, f"id -u {user}", check=False).stdout.strip()  # any module's user
        props = root(
            vm,
            f"systemctl show user-{uid}.slice -p CPUQuotaPerSecUSec -p MemoryMax -p MemoryHigh "
            "-p ActiveState",
            check=False,
        )
        parts.append(f"--- user-{uid}.slice ---\n{props.stdout.strip()}")
    return "\n".join(parts)


# --- waiting ------------------------------------------------------------


def poll(
    what: str,
    probe: Callable[[], T],
    done: Callable[[T], bool],
    timeout: float,
    diag: Callable[[], str],
    every: float = 1.5,
) -> T:
    """probe() until done(value), every ``every`` seconds, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what}: not within {timeout:.0f}s; last seen: {value!r}\n{diag()}"
            )
        time.sleep(every)


def wait_until_serving(vm, timeout: float = 90.0, other_than: int = 0) -> int:
    """The daemon is active and its main process owns org.cgpolicy1; returns its pid."""

    def probe() -> tuple[str, int, int | None]:
        state = root(vm, "systemctl is-active cgpolicyd", check=False).stdout.strip()
        return state, main_pid(vm), name_owner_pid(vm)

    _, pid, _ = poll(
        "cgpolicyd active and owning org.cgpolicy1",
        probe,
        lambda v: v[0] == "active" and v[1] not in (0, other_than) and v[2] == v[1],
        timeout,
        lambda: diagnostics(vm),
    )
    return pid


def wait_for_tier(vm, user: str, tier: str | None, timeout: float) -> dict[str, Any]:
    return poll(
        f"{user} in tier {tier}",
        lambda: get_user(vm, user),
        lambda info: info.get("tier") == tier,
        timeout,
        lambda: diagnostics(vm, user),
    )


def wait_for_cpu(vm, user: str, group: str, tier: str | None, timeout: float = 20.0) -> None:
    """systemd and the kernel both show the tier's (or the group's) CPU quota."""
    uid = USERS[user][0]
    poll(
        f"user-{uid}.slice CPUQuotaPerSecUSec for {tier or 'no tier'}",
        lambda: slice_prop(vm, uid, "CPUQuotaPerSecUSec"),
        lambda shown: shown == CPU_SHOWN[group][tier],
        timeout,
        lambda: diagnostics(vm, user),
        every=1.0,
    )
    kernel = cpu_kernel(vm, uid)
    assert kernel == CPU_KERNEL[group][tier], (
        f"cgroup file of user-{uid}.slice has quota {kernel}, expected "
        f"{CPU_KERNEL[group][tier]}\n{diagnostics(vm, user)}"
    )


def ensure_penalty(vm, user: str, tier: str = "penalty2", min_left: float = 30.0) -> dict[str, Any]:
    """The user in some tier with at least ``min_left`` seconds to go; Penalize if not."""
    info = get_user(vm, user)
    if info.get("tier") and info["tier_expiry"] - guest_now(vm) >= min_left:
        return info
    call_ok(vm, "Penalize", "ss", user, tier)
    info = get_user(vm, user)
    assert info.get("tier") == tier, f"Penalize {user} {tier} did not take: {info}"
    return info


def kill_hog(vm, user: str = "bob") -> None:
    root(vm, f"pkill -u {user} -f {shlex.quote(HOG_PATTERN)}", check=False)


# --- the node -----------------------------------------------------------


SAVED_POLICY = "/root/cgpolicy-before-test-daemon"


@pytest.fixture(scope="module")
def node(vm) -> Iterator[Any]:
    from vmharness.install import install_cgpolicy

    install_cgpolicy(vm, REPO)
    for name, (uid, groups) in USERS.items():
        vm.add_user(name, uid, groups=groups)
    root(vm, f"rm -rf {SAVED_POLICY} && cp -a /etc/cgpolicy {SAVED_POLICY}")
    root(vm, "rm -f /etc/cgpolicy/groups.d/*.toml")
    write_policy(vm, POLICY)
    root(vm, "cgpolicyctl check")
    # install.sh started the daemon with the default policy: this starts it on this one.
    keep_logged_in_unjudged(vm, USERS)
    for name in USERS:
        info = get_user(vm, name)
        assert info.get("tier") is None, f"{name} penalized before any test: {info}"
    yield vm
    # Leave nobody in a penalty and nothing burning CPU, for the modules after this one.
    if vm.running:
        kill_hog(vm)
        root(vm, "systemctl stop wendy-rsync", check=False)
        for name in USERS:
            call(vm, "Release", "s", name)
        # The policy found, back: this one's badness of 10 s would penalize the next
        # modules' users for the CPU their logins cost under emulation.
        root(vm, f"rm -rf /etc/cgpolicy && mv {SAVED_POLICY} /etc/cgpolicy")
        root(vm, "systemctl restart cgpolicyd")


# --- the tests ----------------------------------------------------------


@pytest.mark.v2_only  # nothing here differs on cgroup v1
def test_daemon_is_active_owns_its_name_and_serves_the_interface(node):
    assert root(node, "systemctl is-active cgpolicyd", check=False).stdout.strip() == "active", (
        diagnostics(node)
    )
    pid = main_pid(node)
    assert pid and name_owner_pid(node) == pid, (
        f"org.cgpolicy1 owned by pid {name_owner_pid(node)}, cgpolicyd's MainPID is {pid}\n"
        + diagnostics(node)
    )
    unit = root(node, "systemctl show cgpolicyd -p Type -p BusName -p Restart -p UnitFileState")
    props = dict(line.split("=", 1) for line in unit.stdout.splitlines() if "=" in line)
    assert props == {
        "Type": "dbus",
        "BusName": BUS,
        "Restart": "always",
        "UnitFileState": "enabled",
    }, unit.stdout
    intro = root(node, f"busctl introspect {BUS} {OBJECT}").stdout
    for method in METHODS:
        assert re.search(rf"^\.{method}\s+method\s", intro, re.M), f"{method} missing:\n{intro}"
    assert re.search(r"^\.UserTierChanged\s+signal\s+ssss\s", intro, re.M), intro
    started = [line for line in daemon_log(node) if line.startswith("started:")]
    assert started and "interval 2s" in started[-1], (
        f"no start-up line with this policy's interval: {started}\n{diagnostics(node)}"
    )


def test_cpu_hog_is_penalized_then_released(node):
    """Two busy loops at bob's 50% quota: badness rises, penalty1 halves it, expiry ends it."""
    mark = log_mark(node)
    wait_for_cpu(node, "bob", "students", None)
    login(node, "bob", HOG)
    try:
        seen: list[float] = []

        def probe() -> dict[str, Any]:
            info = get_user(node, "bob")
            seen.append(float(info.get("cpu_badness", 0.0)))
            return info

        info = poll(
            "bob penalized for his CPU hog",
            probe,
            lambda i: i.get("tier") is not None,
            90,
            lambda: diagnostics(node, "bob"),
            every=1.0,
        )
        assert info["tier"] == "penalty1", f"first violation put bob in {info['tier']}: {info}"
        assert info.get("occurrences") == 1, info
        penalized = logged(node, "bob", "penalized", mark)
        assert len(penalized) == 1 and "tier=penalty1 " in penalized[0], (
            f"penalized lines: {penalized}\n{diagnostics(node, 'bob')}"
        )
        # GetUser showed badness rising before the penalty; should the polls have
        # missed the few seconds it took, the penalty's logged reason shows it.
        reason = re.search(r"cpu ([\d.]+), memory ([\d.]+)", penalized[0])
        assert any(b > 0 for b in seen) or (reason and float(reason.group(1)) > 0), (
            f"cpu_badness never seen above 0 ({seen}), nor in {penalized[0]}"
        )
        expiry = info["tier_expiry"]
        in_line = re.search(r" expiry=([\d.]+) ", penalized[0])
        assert in_line and abs(float(in_line.group(1)) - expiry) < 0.1, (penalized[0], expiry)
        left = expiry - guest_now(node)
        assert TIMEOUT["penalty1"] - 15 < left <= TIMEOUT["penalty1"], (
            f"penalty1 ends in {left:.1f}s, its timeout is {TIMEOUT['penalty1']:.0f}s"
        )
        wait_for_cpu(node, "bob", "students", "penalty1")
        assert slice_prop(node, 2002, "MemoryMax") == STUDENT_MEMORY["penalty1"], diagnostics(
            node, "bob"
        )
    finally:
        kill_hog(node)

    info = wait_for_tier(node, "bob", None, expiry - guest_now(node) + 30)
    now = guest_now(node)
    assert now >= expiry, f"bob released at {now:.1f}, before his expiry {expiry:.1f}"
    released = logged(node, "bob", "released", mark)
    assert len(released) == 1, f"released lines: {released}\n{diagnostics(node, 'bob')}"
    assert info.get("occurrences") == 1, f"occurrences after release: {info}"
    wait_for_cpu(node, "bob", "students", None)
    assert slice_prop(node, 2002, "MemoryMax") == STUDENT_MEMORY[None], diagnostics(node, "bob")


@pytest.mark.v2_only  # nothing here differs on cgroup v1
def test_second_violation_goes_to_the_next_tier(node):
    mark = log_mark(node)
    login(node, "bob", HOG)
    try:
        info = wait_for_tier(node, "bob", "penalty2", 90)
        assert info.get("occurrences") == 2, info
        wait_for_cpu(node, "bob", "students", "penalty2")
        assert slice_prop(node, 2002, "MemoryMax") == STUDENT_MEMORY["penalty2"]
        penalized = logged(node, "bob", "penalized", mark)
        assert len(penalized) == 1 and "tier=penalty2 " in penalized[0], (
            f"penalized lines: {penalized}\n{diagnostics(node, 'bob')}"
        )
    finally:
        kill_hog(node)


def test_login_during_a_penalty_keeps_the_penalty_limit(node):
    info = ensure_penalty(node, "bob", min_left=25)
    tier = info["tier"]
    wait_for_cpu(node, "bob", "students", tier)
    login(node, "bob", "true")
    hook = root(node, "journalctl -t cgpolicy-pam-hook -o cat --no-pager -n 20").stdout
    hook_line = ([line for line in hook.splitlines() if line.startswith("user=bob ")] or ["-"])[-1]
    # Right after the login, and over the next cycles: the hook did not restore 500ms.
    for _ in range(3):
        shown = slice_prop(node, 2002, "CPUQuotaPerSecUSec")
        assert shown == CPU_SHOWN["students"][tier], (
            f"after a new login in {tier} bob's slice shows {shown}; hook: {hook_line}\n"
            + diagnostics(node, "bob")
        )
        time.sleep(1.5)
    assert cpu_kernel(node, 2002) == CPU_KERNEL["students"][tier]
    assert get_user(node, "bob").get("tier") == tier


@pytest.mark.v2_only  # nothing here differs on cgroup v1
def test_sigkilled_daemon_restarts_and_keeps_the_penalty(node):
    info = ensure_penalty(node, "bob", min_left=30)
    tier, expiry = info["tier"], info["tier_expiry"]
    old_pid = main_pid(node)
    restarts = int(root(node, "systemctl show -p NRestarts --value cgpolicyd").stdout)
    mark = log_mark(node)
    root(node, "systemctl kill -s KILL cgpolicyd")
    new_pid = wait_until_serving(node, timeout=60, other_than=old_pid)
    assert new_pid != old_pid
    assert int(root(node, "systemctl show -p NRestarts --value cgpolicyd").stdout) > restarts
    after = get_user(node, "bob")
    assert after.get("tier") == tier and abs(after["tier_expiry"] - expiry) < 1.0, (
        f"before SIGKILL: {tier} until {expiry}; after: {after}\n{diagnostics(node, 'bob')}"
    )
    wait_for_cpu(node, "bob", "students", tier, timeout=10)
    logged(node, "bob", "reapplied", mark)
    lines = daemon_log(node, mark)
    assert any(line.startswith("started:") for line in lines), lines


def reload_ok(vm) -> None:
    done = root(vm, busctl("Reload"))
    assert json.loads(done.stdout)["data"] == [[]], f"Reload refused the policy: {done.stdout}"


@pytest.mark.v2_only  # nothing here differs on cgroup v1
def test_reboot_keeps_the_penalty_with_its_recorded_expiry(node):
    """A penalty in force comes back after a reboot, with the expiry it had.

    A TCG reboot takes 30 to 60 s, as long as penalty2 itself: bob is penalized
    under a policy whose penalty2 lasts 600 s, and the test policy (60 s) is
    back on disk and in force before the reboot. The recorded expiry is
    absolute, so the longer one stands.
    """
    long_tier = POLICY["cgpolicy.toml"].replace("timeout = 60\n", "timeout = 600\n")
    assert long_tier != POLICY["cgpolicy.toml"]
    write_policy(node, {"cgpolicy.toml": long_tier})
    try:
        reload_ok(node)
        done = root(node, "cgpolicyctl penalize bob penalty2", check=False)
        assert done.returncode == 0, f"cgpolicyctl penalize: {done.stdout}{done.stderr}"
    finally:
        write_policy(node, {"cgpolicy.toml": POLICY["cgpolicy.toml"]})
    reload_ok(node)
    info = get_user(node, "bob")
    expiry = info["tier_expiry"]
    assert info.get("tier") == "penalty2" and expiry - guest_now(node) > 500, info
    wait_for_cpu(node, "bob", "students", "penalty2")

    # the harness's reboot (the one test that reboots checks it too): a new boot of
    # the same disk, a root-only file kept with its mode, the same cgroup mode
    node.put_bytes(b"survives\n", "/var/lib/cgpolicy-test/marker", mode=0o600)
    boot_id = root(node, "cat /proc/sys/kernel/random/boot_id").stdout
    started = time.monotonic()
    node.reboot()
    wait_until_serving(node, timeout=120)
    took = time.monotonic() - started
    assert root(node, "cat /proc/sys/kernel/random/boot_id").stdout != boot_id
    kept = root(node, "stat -c %a /var/lib/cgpolicy-test/marker; cat /var/lib/cgpolicy-test/marker")
    assert kept.stdout == "600\nsurvives\n"
    assert node.cgroup_mode() == node.cgroup
    after = get_user(node, "bob")
    assert after.get("tier") == "penalty2" and abs(after["tier_expiry"] - expiry) < 1.0, (
        f"before the reboot: penalty2 until {expiry}; after ({took:.0f}s later): {after}\n"
        + diagnostics(node, "bob")
    )
    logged(node, "bob", "reapplied")
    keep_logged_in(node, "bob")  # in a penalty, a login accrues no badness
    shown = slice_prop(node, 2002, "CPUQuotaPerSecUSec")
    kernel = cpu_kernel(node, 2002)
    assert (shown, kernel) == (
        CPU_SHOWN["students"]["penalty2"],
        CPU_KERNEL["students"]["penalty2"],
    ), f"after the reboot bob's new login got {shown} ({kernel})\n{diagnostics(node, 'bob')}"
    call_ok(node, "Release", "s", "bob")
    wait_for_cpu(node, "bob", "students", None)
    keep_logged_in_unjudged(node, [name for name in USERS if name != "bob"])


def badness_until_zero(vm, user: str, timeout: float = 60) -> list[float]:
    """Poll the user's cpu_badness until it has been 0 three times running, two
    intervals after the call at the soonest; the values seen. Never in a tier."""
    seen: list[float] = []
    time.sleep(2 * 2)  # what happened just before shows in the next samples

    def probe() -> list[float]:
        info = get_user(vm, user)
        assert info.get("tier") is None, (
            f"{user} penalized; cpu_badness seen: {seen}: {info}\n{diagnostics(vm, user)}"
        )
        seen.append(float(info.get("cpu_badness", 0.0)))
        return seen[-3:]

    poll(
        f"{user}'s cpu_badness back at 0",
        probe,
        lambda last: len(last) == 3 and not any(last),
        timeout,
        lambda: diagnostics(vm, user),
    )
    return seen


def test_whitelisted_process_raises_no_badness(node):
    """The real rsync (/usr/bin/rsync), busy, is not held against wendy.

    It runs as wendy in her slice, started without a login of hers: a login's
    own CPU (bash, the PAM hook; only sshd is whitelisted) is charged to her, and
    under emulation it has once reached a penalty by itself. From rsync's first
    interval on, her badness must stay 0.
    """
    uid = USERS["wendy"][0]
    mark = log_mark(node)
    badness_until_zero(node, "wendy")
    root(node, RSYNC)
    try:
        pid = root(node, "pgrep -u wendy -x rsync", check=False).stdout.split()
        assert pid, "wendy's rsync is not running"
        cgroup = root(node, f"cat /proc/{pid[0]}/cgroup").stdout
        assert f"/user.slice/user-{uid}.slice/" in cgroup, cgroup
        cpu_before = int(slice_prop(node, uid, "CPUUsageNSec"))
        clock_before = time.monotonic()
        badness: list[Any] = []
        deadline = time.monotonic() + 10 * 2 + 2  # ten intervals, from its first
        while time.monotonic() < deadline:
            info = get_user(node, "wendy")
            badness.append(info.get("cpu_badness"))
            assert info.get("tier") is None, (
                f"wendy penalized; cpu_badness seen: {badness}: {info}\n"
                + diagnostics(node, "wendy")
            )
            time.sleep(1.5)
        cores = (
            (int(slice_prop(node, uid, "CPUUsageNSec")) - cpu_before)
            / 1e9
            / (time.monotonic() - clock_before)
        )
        still = root(node, "systemctl is-active wendy-rsync", check=False).stdout.strip()
    finally:
        root(node, "systemctl stop wendy-rsync", check=False)
    print(f"wendy's cpu_badness with rsync at {cores:.2f} cores: {badness}")
    assert still == "active", "wendy's rsync ended before the test did: it proves nothing"
    # The control: without the whitelist this is above the threshold (0.5 of 0.5 cores).
    assert cores > 0.3, f"wendy's rsync used only {cores:.2f} cores: the test proves nothing"
    assert badness and all(b is not None for b in badness), (
        f"GetUser wendy never reported cpu_badness: {badness}\n{diagnostics(node, 'wendy')}"
    )
    assert all(b == 0 for b in badness), (
        f"wendy's cpu_badness while only rsync ran ({cores:.2f} cores): {badness}\n"
        + diagnostics(node, "wendy")
    )
    assert not events(daemon_log(node, mark), "wendy", "penalized")


@pytest.mark.v2_only  # nothing here differs on cgroup v1
@pytest.mark.parametrize("how", IMPOSTORS)
def test_a_burner_only_named_rsync_is_charged_and_penalized(node, how):
    """The whitelist cannot be bought with a name: a burner that calls itself rsync
    is charged to wendy like any other, and she is penalized for it."""
    call(node, "Release", "s", "wendy")  # refused (NotPenalized) when she is in no tier
    badness_until_zero(node, "wendy")
    mark = log_mark(node)
    root(node, IMPOSTORS[how])
    try:
        poll(
            f"wendy's burner ({how}) running under the name rsync",
            lambda: root(node, "pgrep -u wendy -x rsync", check=False).stdout.split(),
            bool,
            20.0,
            lambda: diagnostics(node, "wendy"),
        )
        info = poll(
            f"wendy penalized for a burner named rsync ({how})",
            lambda: get_user(node, "wendy"),
            lambda info: info.get("tier") is not None,
            60.0,
            lambda: diagnostics(node, "wendy"),
        )
    finally:
        root(node, "systemctl stop wendy-rsync", check=False)
        call(node, "Release", "s", "wendy")
    assert info["tier"] in TIMEOUT, info
    assert events(daemon_log(node, mark), "wendy", "penalized")


def calls_in_one_login(vm, user: str, calls: list[tuple[str, ...]]) -> list[dict[str, Any]]:
    """Each call (method, signature, args...) made as ``user`` with busctl and with
    dbus-send, all in one login (each login costs the user's slice CPU): per call
    busctl's exit code and output, and the D-Bus error name dbus-send printed."""
    script = []
    for i, (method, signature, *args) in enumerate(calls):
        script += [
            f"echo '@@call {i}'",
            f'out=$({busctl(method, signature, *args)} 2>&1); echo "@@rc $?"',
            'printf "%s\\n" "$out"',
            "echo '@@dbus-send'",
            f"{dbus_send(method, *args)} 2>&1",
        ]
    done = login(vm, user, "\n".join(script), check=False)
    results = []
    for chunk in done.stdout.split("@@call ")[1:]:
        head, _, sent = chunk.partition("@@dbus-send\n")
        rc_line = re.search(r"^@@rc (\d+)$", head, re.M)
        assert rc_line, f"no exit code in: {chunk!r}"
        out = head[rc_line.end() :].strip()
        error = re.search(r"^Error (\S+):", sent, re.M)
        results.append({"rc": int(rc_line.group(1)), "out": out, "error": error and error[1]})
    assert len(results) == len(calls), f"as {user}: {done.stdout}{done.stderr}"
    return results


@pytest.mark.v2_only  # nothing here differs on cgroup v1
def test_access_ordinary_users_only_read_themselves_admins_do_everything(node):
    denied = [
        ("FreezeUser", "s", "bob"),
        ("Penalize", "ss", "bob", "penalty1"),
        ("Release", "s", "bob"),
        ("GetUser", "s", "bob"),
        ("Reload", ""),
    ]
    bob_before = get_user(node, "bob")
    *refused, mine = calls_in_one_login(node, "carol", [*denied, ("GetUser", "s", "carol")])
    for (method, _, *args), got in zip(denied, refused, strict=True):
        assert got["rc"] != 0 and got["error"] == ACCESS_DENIED, (
            f"carol's {method} {args}: busctl exited {got['rc']} saying {got['out']!r}; "
            f"dbus-send's error: {got['error']!r}\n{diagnostics(node)}"
        )
    bob_after = get_user(node, "bob")
    assert bob_after.get("frozen") is not True and bob_after.get("tier") == bob_before.get(
        "tier"
    ), f"carol's refused calls changed bob: {bob_before} -> {bob_after}"

    assert mine["rc"] == 0 and mine["error"] is None, f"carol's GetUser on herself: {mine}"
    (info,) = json.loads(mine["out"])["data"]
    info = {key: unwrap(value) for key, value in info.items()}
    assert info["user"] == "carol" and info["uid"] == 2003 and info["group"] == "normal", info

    mark = log_mark(node)
    call_ok(node, "Penalize", "ss", "carol", "penalty1", as_user="ann")
    assert get_user(node, "carol", as_user="ann").get("tier") == "penalty1"
    wait_for_cpu(node, "carol", "normal", "penalty1")
    call_ok(node, "Release", "s", "carol", as_user="ann")
    assert get_user(node, "carol").get("tier") is None
    wait_for_cpu(node, "carol", "normal", None)
    for event in ("penalized", "released"):
        found = logged(node, "carol", event, mark)
        assert "ann" in found[-1], f"the {event} line does not name ann as the actor: {found}"


@pytest.mark.v2_only  # nothing here differs on cgroup v1
def test_cgpolicyctl_penalize_status_history_release(node):
    out = root(node, "cgpolicyctl penalize carol penalty2", check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    wait_for_cpu(node, "carol", "normal", "penalty2")
    status = json.loads(root(node, "cgpolicyctl status --json carol").stdout)
    assert status.get("tier") == "penalty2", status
    for key in ("tier_expiry", "occurrences", "cpu_badness", "memory_badness"):
        assert key in status, f"status --json has no {key}: {status}"
    assert abs(status["tier_expiry"] - get_user(node, "carol")["tier_expiry"]) < 1.0
    out = root(node, "cgpolicyctl release carol", check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    wait_for_cpu(node, "carol", "normal", None)
    history = root(node, "cgpolicyctl history carol --json", check=False)
    assert history.returncode == 0, history.stdout + history.stderr
    entries = json.loads(history.stdout)
    assert isinstance(entries, list) and entries, history.stdout
    text = [json.dumps(entry) for entry in entries]
    assert any("penalized" in t and "penalty2" in t for t in text), history.stdout
    assert any("released" in t for t in text), history.stdout
    assert all("carol" in t or "2003" in t for t in text), history.stdout
    table = root(node, "cgpolicyctl history", check=False)
    assert table.returncode == 0 and "bob" in table.stdout and "carol" in table.stdout, (
        table.stdout + table.stderr
    )


BROKEN = re.compile(r"students\.toml:\d+: limits\.CPUQuota: ")


def refusals(vm, after: int) -> list[str]:
    return [line for line in daemon_log(vm, after) if "refused" in line]


@contextlib.contextmanager
def broken_policy(vm) -> Iterator[None]:
    """students.toml invalid; normal.toml validly changed, to see which policy is used.

    cgpolicyd follows edits of the policy files by itself, at its next cycle: that
    refusal is waited for first, so that any refusal after it is the test's own.
    """
    d = "/etc/cgpolicy/groups.d"
    root(vm, f"cp {d}/students.toml /root/students.good && cp {d}/normal.toml /root/normal.good")
    try:
        mark = log_mark(vm)
        root(vm, f'sed -i \'s/CPUQuota = "50%"/CPUQuota = "lots"/\' {d}/students.toml')
        root(vm, f'sed -i \'s/CPUQuota = "100%"/CPUQuota = "200%"/\' {d}/normal.toml')
        assert root(vm, "cgpolicyctl check", check=False).returncode == 1
        own = poll(
            "cgpolicyd refusing the edited files by itself",
            lambda: refusals(vm, mark),
            bool,
            20,
            lambda: diagnostics(vm),
        )
        assert BROKEN.search(own[-1]), own
        yield
    finally:
        root(vm, f"cp /root/students.good {d}/students.toml")
        root(vm, f"cp /root/normal.good {d}/normal.toml")


@pytest.mark.v2_only  # nothing here differs on cgroup v1
def test_reload_of_a_broken_policy_is_refused_and_the_old_one_kept(node):
    pid = main_pid(node)
    with broken_policy(node):
        mark = log_mark(node)
        done = root(node, busctl("Reload"), check=False)
        assert done.returncode == 0, f"Reload: {done.stdout}{done.stderr}\n{diagnostics(node)}"
        (problems,) = json.loads(done.stdout)["data"]
        assert any(BROKEN.search(p) for p in problems), f"Reload's problems: {problems}"
        refused = refusals(node, mark)
        assert refused and BROKEN.search(refused[-1]), daemon_log(node, mark)
        assert main_pid(node) == pid and name_owner_pid(node) == pid, diagnostics(node)
        # The old policy judges: normal's 100% halved, not the new file's 200%.
        call_ok(node, "Penalize", "ss", "carol", "penalty1")
        wait_for_cpu(node, "carol", "normal", "penalty1")
        call_ok(node, "Release", "s", "carol")
        wait_for_cpu(node, "carol", "normal", None)
    done = root(node, busctl("Reload"))
    assert json.loads(done.stdout)["data"] == [[]], f"restored policy refused: {done.stdout}"


@pytest.mark.v2_only  # nothing here differs on cgroup v1
def test_systemctl_reload_and_cgpolicyctl_reload_refuse_a_broken_policy(node):
    pid = main_pid(node)
    with broken_policy(node):
        mark = log_mark(node)
        done = root(node, "systemctl reload cgpolicyd", check=False)
        assert done.returncode == 0, f"systemctl reload: {done.stderr}"
        refused = poll(
            "SIGHUP reload refused in the log",
            lambda: refusals(node, mark),
            bool,
            20,
            lambda: diagnostics(node),
        )
        assert BROKEN.search(refused[-1]), refused
        cli = root(node, "cgpolicyctl reload", check=False)
        assert cli.returncode == 1, f"cgpolicyctl reload exited {cli.returncode}: {cli.stdout}"
        assert BROKEN.search(cli.stdout + cli.stderr), cli.stdout + cli.stderr
        state = root(node, "systemctl is-active cgpolicyd", check=False).stdout.strip()
        assert state == "active" and main_pid(node) == pid, diagnostics(node)
    cli = root(node, "cgpolicyctl reload", check=False)
    assert cli.returncode == 0, cli.stdout + cli.stderr


def status(vm) -> dict[str, Any]:
    """cgpolicyd's Status, plain values."""
    done = root(vm, busctl("Status"), check=False)
    assert done.returncode == 0, f"Status: {done.stdout}{done.stderr}\n{diagnostics(vm)}"
    (info,) = json.loads(done.stdout)["data"]
    return {key: unwrap(value) for key, value in info.items()}


def restarts(vm) -> int:
    return int(root(vm, "systemctl show -p NRestarts --value cgpolicyd").stdout.strip())


@pytest.mark.v2_only  # nothing here differs on cgroup v1
def test_a_start_on_a_broken_policy_runs_the_last_good_one_until_it_is_mended(node):
    """No restart loop: cgpolicyd starts degraded, says so on the bus and in doctor."""
    with broken_policy(node):
        pid, mark, before = main_pid(node), log_mark(node), restarts(node)
        root(node, "systemctl restart cgpolicyd")
        pid = wait_until_serving(node, other_than=pid)
        degraded = [line for line in daemon_log(node, mark) if "event=start-degraded" in line]
        assert degraded and BROKEN.search(degraded[0]), daemon_log(node, mark)
        assert 'policy="last good"' in degraded[0], degraded
        info = status(node)
        assert info["policy"] == "last good", info
        assert any(BROKEN.search(p) for p in info["problems"]), info
        doctor = root(node, "cgpolicyctl doctor", check=False).stdout
        assert re.search(r"^\[warn\] cgpolicyd: degraded since .*last good policy", doctor, re.M), (
            doctor
        )
        # The last good policy judges, tiers included: normal's 100% halved, not 200%.
        call_ok(node, "Penalize", "ss", "carol", "penalty1")
        wait_for_cpu(node, "carol", "normal", "penalty1")
        call_ok(node, "Release", "s", "carol")
        wait_for_cpu(node, "carol", "normal", None)
        assert main_pid(node) == pid and restarts(node) == before, diagnostics(node)
    # Mended: the next cycle takes the files again, with no restart.
    poll(
        "cgpolicyd back on the policy files",
        lambda: status(node)["policy"],
        lambda policy: policy == "files",
        20,
        lambda: diagnostics(node),
    )
    assert "problems" not in status(node)
    doctor = root(node, "cgpolicyctl doctor", check=False).stdout
    assert re.search(r"^\[  ok\] cgpolicyd: running since .* on the policy files", doctor, re.M), (
        doctor
    )
    assert main_pid(node) == pid, diagnostics(node)


PARALLEL = f"""
set -u
call() {{ busctl call {BUS} {OBJECT} {IFACE} "$@" 2>&1 || echo "FAILED: $*"; }}
for round in 1 2 3 4 5; do
    call Penalize ss carol penalty1 & call Penalize ss wendy penalty1 & wait
    call Release s carol & call Release s wendy & wait
done
"""


@pytest.mark.v2_only  # nothing here differs on cgroup v1
def test_concurrent_admin_calls_all_succeed(node):
    """Two admins' calls at once: each sets a slice's limits, at the same time."""
    mark = log_mark(node)
    done = root(node, PARALLEL, check=False)
    failed = [line for line in done.stdout.splitlines() if line.strip()]
    assert not failed, (
        "calls that failed when made two at a time:\n"
        + "\n".join(failed)
        + "\n--- cgpolicyd's log meanwhile ---\n"
        + "\n".join(daemon_log(node, mark))
    )
    for user in ("carol", "wendy"):
        assert get_user(node, user).get("tier") is None
    wait_for_cpu(node, "carol", "normal", None)
    wait_for_cpu(node, "wendy", "students", None)


def test_no_tier_limit_outlives_the_tier(node):
    """A tier lowers MemoryHigh too; once it ends, the group's (none: infinity) is back."""
    uid = USERS["carol"][0]
    names = ("MemoryMax", "MemoryHigh")
    before = {n: slice_prop(node, uid, n) for n in names}
    call_ok(node, "Penalize", "ss", "carol", "penalty1")
    wait_for_cpu(node, "carol", "normal", "penalty1")
    lowered = {n: slice_prop(node, uid, n) for n in names}
    assert lowered == dict.fromkeys(names, str(int(1024 * MiB * 0.8))), lowered
    call_ok(node, "Release", "s", "carol")
    wait_for_cpu(node, "carol", "normal", None)
    back = {n: slice_prop(node, uid, n) for n in names}
    assert back == {"MemoryMax": str(1024 * MiB), "MemoryHigh": "infinity"}, (
        f"carol's slice after her penalty1 was released: {back}; in penalty1: {lowered}; "
        f"before it: {before}. The normal group sets MemoryMax=1G and no MemoryHigh.\n"
        + diagnostics(node, "carol")
    )


# Touches every page of HELD_MIB, says so, holds it until asked to free it, then lives on.
# The fill is one C loop: a page-by-page Python loop burns a core for a minute under
# emulation, and cgpolicyd would penalize carol for that CPU before the test does.
HOLDER = """
import os, time
held = bytearray(b"\\x01") * ({size} << 20)
open("/home/carol/held", "w").close()
while not os.path.exists("/home/carol/free"):
    time.sleep(0.2)
del held
open("/home/carol/freed", "w").close()
while True:
    time.sleep(60)
"""
HELD_MIB = 800  # of carol's 1G; penalty2 targets 512M


@contextlib.contextmanager
def judged_slowly(vm) -> Iterator[None]:
    """Badness takes an hour to reach 100 meanwhile: only the test penalizes.

    Filling memory under emulation keeps a core busy for many seconds, and
    holding it is over the memory threshold: with the module's 10 s
    time_to_max_bad cgpolicyd would penalize the user itself mid-fill, and the
    tier's MemoryHigh would then throttle the fill to a crawl.
    """
    slow = POLICY["cgpolicy.toml"].replace("time_to_max_bad = 10", "time_to_max_bad = 3600")
    assert slow != POLICY["cgpolicy.toml"]
    write_policy(vm, {"cgpolicy.toml": slow})
    reload_ok(vm)
    try:
        yield
    finally:
        write_policy(vm, {"cgpolicy.toml": POLICY["cgpolicy.toml"]})
        reload_ok(vm)


def kernel_kills(vm) -> int:
    out = root(vm, "journalctl -k -q --no-pager -g 'Killed process|oom-kill'", check=False)
    return len([line for line in out.stdout.splitlines() if line.strip()])


def test_a_penalty_never_oom_kills_and_memory_max_reaches_the_target_as_usage_falls(node):
    uid = USERS["carol"][0]
    kills = kernel_kills(node)
    node.put_bytes(HOLDER.format(size=HELD_MIB).encode(), "/home/carol/holder.py", mode=0o644)
    root(node, "rm -f /home/carol/held /home/carol/free /home/carol/freed")
    with judged_slowly(node):
        holds_memory_until_freed(node, uid, kills)


def holds_memory_until_freed(node, uid: int, kills: int) -> None:
    login(node, "carol", "nohup python3 /home/carol/holder.py >/dev/null 2>&1 &")
    try:
        poll(
            "carol's holder has touched its memory",
            lambda: root(node, "test -e /home/carol/held", check=False).returncode,
            lambda rc: rc == 0,
            120,
            lambda: diagnostics(node, "carol"),
        )
        holder = root(node, "pgrep -u carol -f holder.py").stdout.split()
        held = int(slice_prop(node, uid, "MemoryCurrent"))
        assert held > HELD_MIB * MiB, held
        call_ok(node, "Penalize", "ss", "carol", "penalty2")
        limit = int(slice_prop(node, uid, "MemoryMax"))
        assert limit >= held + 1024 * MiB // 10 - 16 * MiB, (limit, held)
        info = get_user(node, "carol")
        assert info.get("memory_max_target") == 512 * MiB, info
        if root(node, "stat -fc %T /sys/fs/cgroup").stdout.strip() == "cgroup2fs":
            assert slice_prop(node, uid, "MemoryHigh") == str(512 * MiB)  # pressure meanwhile
        root(node, "touch /home/carol/free")
        poll(
            "carol's MemoryMax at penalty2's 512M",
            lambda: slice_prop(node, uid, "MemoryMax"),
            lambda shown: shown == str(512 * MiB),
            60,
            lambda: diagnostics(node, "carol"),
        )
        assert root(node, "pgrep -u carol -f holder.py").stdout.split() == holder
        assert kernel_kills(node) == kills, root(node, "journalctl -k -q --no-pager | tail -40")
        assert logged(node, "carol", "memory-step"), daemon_log(node)
    finally:
        root(node, "pkill -u carol -f holder.py", check=False)
        call(node, "Release", "s", "carol")
