"""Two login nodes sharing their penalties through a real PostgreSQL server ([sync]).

Node A is the VM; node B is a systemd-nspawn container booted inside it, on an
overlay of the VM's own root (so the same cgpolicy, policy and users), with its
own systemd, system bus, sshd (on port 2222: the network is the VM's) and
cgpolicyd, and an empty /var/lib/cgpolicy. Users log in to B over ssh from the
VM, so B's PAM hook runs. Both reach the VM's PostgreSQL on 127.0.0.1. The
policy has no node key: each node is named after its host name. cgroup v2 only
(a container's own systemd needs the unified hierarchy).

One setup for the module; the tests run in order and each starts from where the
last one left off: a penalty on A reaches B's slice within two intervals; a user
penalized on A who then logs in on B gets the tier from B's hook; a release on B
ends it on A; with the database stopped both keep enforcing and a penalty made
on A meanwhile reaches B once it is back; A SIGKILLed while its exchange waits
on the database loses nothing; B with a wrong password logs a clear error and
keeps enforcing locally.
"""

from __future__ import annotations

import ast
import shlex
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_daemon import poll, root, wait_until_serving

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]
USER, UID = "syncu", 5711
HOG, HOG_UID = "synch", 5712  # burns CPU on A: penalized by the model, not by an admin
LATE, LATE_UID = "syncl", 5713  # penalized on A before their first login on B
INTERVAL = 2
PASSWORD = "sync-pw-5711"
BACKUP = "/root/cgpolicy-before-test-sync"
B = "/srv/cgpolicy-nodeb"  # lower (the VM's /), rw (tmpfs: upper, work), mnt (B's root)
MACHINE = "nodeb"
B_PORT = 2222  # B's sshd: A's has port 22 of the shared network
KEY = "/root/.ssh/cgpolicy-nodeb"  # root's key in the VM for the users' logins on B
QUOTA = {None: "1s", "penalty1": "500ms", "penalty2": "250ms"}

POLICY = {
    "cgpolicy.toml": f"""
        [general]
        min_uid = 1000
        interval = {INTERVAL}

        [status]
        order = ["hogs", "synced"]
        fallback = "others"

        [badness]
        time_to_max_bad = 20

        [penalty]
        order = ["penalty1", "penalty2"]

        [penalty.penalty1]
        timeout = 900
        cpu_factor = 0.5
        memory_factor = 0.5

        [penalty.penalty2]
        timeout = 900
        cpu_factor = 0.25
        memory_factor = 0.5

        [sync]
        host = "127.0.0.1"
        database = "cgsync"
        user = "cgsync"
        password_file = "/etc/cgpolicy/sync-password"
        group = "vmtest"
        # The database's answers, and libpq's start, take seconds in the stream's one
        # emulated vCPU: at 2 s, B gave up connecting ("timeout expired") and never
        # logged the refused password, nor adopted the hog's penalty in 30 s.
        timeout = 10
        """,
    # The hog is held to a fifth of a CPU: both nodes and the database share the
    # stream's one emulated vCPU with it (at half a CPU, their cycles fell behind).
    "groups.d/hogs.toml": f"""
        users = ["{HOG}"]
        [limits]
        CPUQuota = "20%"
        """,
    "groups.d/synced.toml": f"""
        users = ["{USER}", "{LATE}"]
        [limits]
        CPUQuota = "100%"
        """,
    "groups.d/others.toml": """
        [limits]
        CPUQuota = "200%"
        """,
}

CONTAINER_UP = f"""
set -e
mkdir -p {B}/lower {B}/rw {B}/mnt
mountpoint -q {B}/lower || mount --bind / {B}/lower
mountpoint -q {B}/rw || mount -t tmpfs -o mode=0755 tmpfs {B}/rw
mkdir -p {B}/rw/upper/var/lib/cgpolicy {B}/rw/upper/etc/systemd/system {B}/rw/work
chmod 0700 {B}/rw/upper/var/lib/cgpolicy
python3 -c "import os; os.setxattr('{B}/rw/upper/var/lib/cgpolicy', 'trusted.overlay.opaque', b'y')"
echo {MACHINE} > {B}/rw/upper/etc/hostname  # its node name: the VM's is taken
mkdir -p {B}/rw/upper/etc/ssh/sshd_config.d
echo 'Port {B_PORT}' > {B}/rw/upper/etc/ssh/sshd_config.d/20-nodeb.conf
ln -sf /dev/null {B}/rw/upper/etc/systemd/system/postgresql.service
mountpoint -q {B}/mnt || mount -t overlay overlay \
    -o lowerdir={B}/lower,upperdir={B}/rw/upper,workdir={B}/rw/work {B}/mnt
systemd-run --unit=cgpolicy-{MACHINE} -p Delegate=yes \
    systemd-nspawn --keep-unit --quiet --boot -D {B}/mnt -M {MACHINE}
"""

CONTAINER_DOWN = f"""
machinectl terminate {MACHINE} 2>/dev/null
systemctl stop cgpolicy-{MACHINE} 2>/dev/null
for i in $(seq 30); do machinectl status {MACHINE} >/dev/null 2>&1 || break; sleep 1; done
systemctl reset-failed cgpolicy-{MACHINE} 2>/dev/null
umount {B}/mnt 2>/dev/null; umount {B}/rw 2>/dev/null; umount {B}/lower 2>/dev/null
rmdir {B}/mnt {B}/rw {B}/lower {B} 2>/dev/null
true
"""


def on_b(vm, cmd: str, check: bool = True, timeout: float = 120):
    """A command run by B's own systemd, its output and status brought back."""
    inner = shlex.quote(cmd)
    return root(
        vm,
        f"systemd-run -M {MACHINE} --wait --pipe --quiet -- /bin/sh -c {inner}",
        check=check,
        timeout=timeout,
    )


def login_b(vm, user: str, cmd: str = "nohup sleep 100000 >/dev/null 2>&1 &"):
    """A real login on B: B's sshd, PAM, pam_systemd and cgpolicy hook."""
    ssh = (
        f"ssh -n -i {KEY} -p {B_PORT} -o BatchMode=yes -o StrictHostKeyChecking=no "
        "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
    )
    return root(vm, f"{ssh} {user}@127.0.0.1 {shlex.quote(cmd)}")


def quota(vm, node: str, uid: int = UID) -> str:
    cmd = f"systemctl show user-{uid}.slice -p CPUQuotaPerSecUSec --value"
    out = on_b(vm, cmd, check=False) if node == "b" else root(vm, cmd, check=False)
    return out.stdout.strip()


def events(vm, node: str, uid: int = UID) -> list[tuple[float, str, str | None, str | None]]:
    """(time, kind, new tier, actor) of the user's events in the node's state.db."""
    script = (
        "import sqlite3; db = sqlite3.connect('file:/var/lib/cgpolicy/state.db?mode=ro', "
        f"uri=True); print(db.execute('SELECT time, kind, new_tier, actor FROM events "
        f"WHERE uid = {uid} ORDER BY id').fetchall())"
    )
    cmd = f"python3 -c {shlex.quote(script)}"
    out = (on_b if node == "b" else root)(vm, cmd)
    return list(ast.literal_eval(out.stdout.strip()))


def log_lines(vm, node: str, what: str) -> list[str]:
    cmd = "journalctl -b -t cgpolicyd -o cat --no-pager"
    out = (on_b if node == "b" else root)(vm, cmd, check=False).stdout
    return [line for line in out.splitlines() if what in line]


def diagnostics(vm) -> str:
    parts = []
    for node in ("a", "b"):
        run = on_b if node == "b" else root
        tail = run(vm, "journalctl -u cgpolicyd -o short-precise -n 25 --no-pager", check=False)
        parts.append(f"--- node {node}: cgpolicyd journal ---\n{tail.stdout}{tail.stderr}")
        parts.append(f"--- node {node}: quota {quota(vm, node)!r}")
    return "\n".join(parts)


def wait_quota(
    vm, node: str, tier: str | None, timeout: float = 30, uid: int = UID, shown: str = ""
) -> float:
    """Seconds until the node's slice has the tier's CPU quota (or ``shown``)."""
    start = time.monotonic()
    want = shown or QUOTA[tier]
    poll(
        f"node {node}: user-{uid}.slice at {want} ({tier})",
        lambda: quota(vm, node, uid),
        lambda now: now == want,
        timeout,
        lambda: diagnostics(vm),
        every=0.5,
    )
    return time.monotonic() - start


def converged(vm, origin: str, other: str, kind: str, uid: int = UID) -> float:
    """Seconds between the origin's last event of ``kind`` and the other node's adoption
    of it, from the two nodes' own records (one kernel clock)."""
    made = [
        e for e in events(vm, origin, uid) if e[1] == kind and not (e[3] or "").startswith("sync:")
    ]
    taken = poll(
        f"node {other} adopts the {kind}",
        lambda: [
            e for e in events(vm, other, uid) if e[1] == kind and (e[3] or "").startswith("sync:")
        ],
        lambda found: bool(found) and found[-1][0] >= made[-1][0],
        30,
        lambda: diagnostics(vm),
    )
    return float(taken[-1][0] - made[-1][0])


@pytest.fixture(scope="module")
def nodes(vm_v2) -> Iterator[Any]:
    from vmharness.install import allow_network, forbid_network, install_cgpolicy

    vm = vm_v2
    install_cgpolicy(vm, REPO)
    vm.add_user(USER, UID)
    vm.add_user(HOG, HOG_UID)
    vm.add_user(LATE, LATE_UID)
    root(vm, f"rm -f {KEY} {KEY}.pub && ssh-keygen -q -t ed25519 -N '' -f {KEY}")
    for user in (USER, HOG, LATE):
        root(vm, f"cat {KEY}.pub >> ~{user}/.ssh/authorized_keys")
    root(vm, CONTAINER_DOWN, check=False)  # a run killed half way
    root(vm, f"rm -rf {BACKUP} && cp -a /etc/cgpolicy {BACKUP}")
    root(vm, "systemctl start postgresql")
    for statement in (
        "DROP DATABASE IF EXISTS cgsync",
        "DROP ROLE IF EXISTS cgsync",
        f"CREATE ROLE cgsync LOGIN PASSWORD '{PASSWORD}'",
        "CREATE DATABASE cgsync OWNER cgsync",
    ):
        root(vm, f"runuser -u postgres -- psql -q -c {shlex.quote(statement)}")
    vm.put_bytes(PASSWORD.encode() + b"\n", "/etc/cgpolicy/sync-password", mode=0o600)
    # Stopped before the policy changes: running without the network drop-in, it would
    # follow the edit and log a sync-down of its own.
    root(vm, "systemctl stop cgpolicyd && rm -f /etc/cgpolicy/groups.d/*.toml")
    for name, text in POLICY.items():
        vm.put_bytes(textwrap.dedent(text).lstrip().encode(), f"/etc/cgpolicy/{name}", mode=0o644)
    root(vm, "cgpolicyctl check")
    # a login costs CPU under emulation: made while nobody judges it
    vm.ssh("nohup sleep 100000 >/dev/null 2>&1 &", user=USER)
    allow_network(vm)  # the database over TCP; starts cgpolicyd, and B inherits the drop-in
    wait_until_serving(vm)
    root(vm, CONTAINER_UP)
    poll(
        "node B booted",
        lambda: on_b(vm, "systemctl is-system-running", check=False).stdout.strip(),
        lambda state: state in ("running", "degraded"),
        180,
        lambda: root(vm, f"systemctl status cgpolicy-{MACHINE} --no-pager", check=False).stdout,
        every=3,
    )
    # B's logins too are made while nobody judges them: the hog's login (its user
    # manager, sshd, the hook) ran at its 20% quota long enough for B's model to
    # penalize it before its test, under a penalty1 that outlasted the module.
    on_b(vm, "systemctl stop cgpolicyd")
    login_b(vm, USER)
    login_b(vm, HOG)
    on_b(vm, "systemctl start cgpolicyd && systemctl is-active cgpolicyd")
    wait_quota(vm, "a", None)
    wait_quota(vm, "b", None)
    yield vm
    if vm.running:
        root(vm, f"pkill -KILL -u {HOG}; cgpolicyctl release {HOG}", check=False)
        root(vm, f"loginctl terminate-user {HOG}", check=False)
        root(vm, f"cgpolicyctl release {USER}; cgpolicyctl release {LATE}", check=False)
        let_go(vm)
        root(vm, CONTAINER_DOWN, check=False)
        root(vm, f"rm -f {KEY} {KEY}.pub", check=False)
        forbid_network(vm)
        root(
            vm,
            f"rm -rf /etc/cgpolicy && cp -a {BACKUP} /etc/cgpolicy && rm -rf {BACKUP} && "
            "systemctl restart cgpolicyd",
            check=False,
        )
        root(vm, f"cgpolicyctl release {USER}; loginctl terminate-user {USER}", check=False)
        root(vm, "runuser -u postgres -- psql -q -c 'DROP DATABASE IF EXISTS cgsync'", check=False)
        root(vm, "runuser -u postgres -- psql -q -c 'DROP ROLE IF EXISTS cgsync'", check=False)
        root(vm, "systemctl stop postgresql", check=False)


def test_a_penalty_on_a_is_on_bs_slice_within_two_intervals(nodes):
    vm = nodes
    root(vm, f"cgpolicyctl penalize {USER} penalty1")
    wait_quota(vm, "b", "penalty1")
    seconds = converged(vm, "a", "b", "penalized")
    print(f"convergence A -> B: {seconds:.2f} s (interval {INTERVAL} s)")
    assert seconds <= 2 * INTERVAL, f"{seconds:.2f} s\n{diagnostics(vm)}"
    a = root(vm, "hostname").stdout.strip()
    (event,) = [e for e in events(vm, "b") if e[1] == "penalized"]
    assert event[3] == f"sync:{a}"
    shown = root(vm, "cgpolicyctl status | tail -n 1").stdout.strip()
    assert shown.startswith(f"sync: group vmtest, node {a}: up, last sync "), shown


def test_a_user_penalized_on_a_gets_the_tier_from_bs_hook_at_login_on_b(nodes):
    vm = nodes
    root(vm, f"cgpolicyctl penalize {LATE} penalty1")
    converged(vm, "a", "b", "penalized", LATE_UID)
    # B's cgpolicyd stopped and the runtime limits it set on the slice-to-be reverted:
    # the limits at login can only come from B's hook, which reads the penalties
    # B's cgpolicyd wrote when it adopted the standing
    on_b(vm, f"systemctl stop cgpolicyd && systemctl revert user-{LATE_UID}.slice")
    try:
        assert quota(vm, "b", LATE_UID) != QUOTA["penalty1"]
        login_b(vm, LATE)
        assert quota(vm, "b", LATE_UID) == QUOTA["penalty1"], diagnostics(vm)
    finally:
        on_b(vm, "systemctl start cgpolicyd")
        root(vm, f"cgpolicyctl release {LATE}", check=False)


def test_a_release_on_b_ends_it_on_a(nodes):
    vm = nodes
    on_b(vm, f"cgpolicyctl release {USER}")
    wait_quota(vm, "a", None)
    seconds = converged(vm, "b", "a", "released")
    print(f"convergence B -> A: {seconds:.2f} s")
    assert seconds <= 2 * INTERVAL
    assert quota(vm, "b") == QUOTA[None]


def test_with_the_database_stopped_both_enforce_and_catch_up_after(nodes):
    vm = nodes
    root(vm, f"cgpolicyctl penalize {USER} penalty1")
    wait_quota(vm, "b", "penalty1")
    before = len(log_lines(vm, "a", "event=sync-down"))  # B's boot may have cost one
    root(vm, "systemctl stop postgresql")
    try:
        time.sleep(3 * INTERVAL)
        assert (quota(vm, "a"), quota(vm, "b")) == (QUOTA["penalty1"], QUOTA["penalty1"])
        root(vm, f"cgpolicyctl penalize {USER} penalty2")
        wait_quota(vm, "a", "penalty2")
        time.sleep(3 * INTERVAL)
        assert quota(vm, "b") == QUOTA["penalty1"]  # B still enforces what it knows
        down = log_lines(vm, "a", "event=sync-down")
        assert len(down) == before + 1, down  # logged once, not every cycle
    finally:
        root(vm, "systemctl start postgresql")
    wait_quota(vm, "b", "penalty2")
    assert log_lines(vm, "a", "event=sync-up")


HOLD = "cgpolicy-test-hold"  # a psql session holding the user's row of the standings


def sql(vm, query: str) -> str:
    cmd = f"runuser -u postgres -- psql -d cgsync -XAtc {shlex.quote(query)}"
    return str(root(vm, cmd).stdout.strip())


def let_go(vm) -> None:
    """End the session holding the row (its backend would sleep on without its client)."""
    stop = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
    root(vm, f"runuser -u postgres -- psql -XAtc {shlex.quote(stop)}", check=False)
    root(vm, f"systemctl stop {HOLD}", check=False)


def test_a_sigkilled_during_an_exchange_loses_nothing(nodes):
    vm = nodes
    a = root(vm, "hostname").stdout.strip()
    adopted = [e for e in events(vm, "b") if e[1] == "released" and e[3] == f"sync:{a}"]
    # only an exchange that writes the user's row waits on it: A's, carrying the release
    row = f"SELECT 1 FROM cgpolicy_standings WHERE uid = {UID} FOR UPDATE"
    lock = f"BEGIN; {row}; SELECT pg_sleep(600)"
    root(vm, f"systemd-run --unit={HOLD} runuser -u postgres -- psql -d cgsync -Xc '{lock}'")
    held = "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
    try:
        poll(
            "the row locked", lambda: sql(vm, held), lambda n: n == "1", 30, lambda: diagnostics(vm)
        )
        pid = int(root(vm, "systemctl show -p MainPID --value cgpolicyd").stdout)
        root(vm, f"cgpolicyctl release {USER}")
        carrying = (
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            f"AND application_name = 'cgpolicyd {a}' "
            f"AND query LIKE 'INSERT INTO cgpolicy_standings %, {UID}, %'"
        )
        root(
            vm,
            f'until [ "$(runuser -u postgres -- psql -d cgsync -XAtc "{carrying}")" = 1 ]; '
            f"do sleep 0.1; done; kill -KILL {pid}",
            timeout=60,
        )
        assert quota(vm, "b") == QUOTA["penalty2"]  # nothing reached the group
    finally:
        let_go(vm)
    wait_until_serving(vm, other_than=pid)
    wait_quota(vm, "b", None)
    time.sleep(2 * INTERVAL)  # nothing resurrected, nothing taken twice
    assert (quota(vm, "a"), quota(vm, "b")) == (QUOTA[None], QUOTA[None])
    now = [e for e in events(vm, "b") if e[1] == "released" and e[3] == f"sync:{a}"]
    assert len(now) == len(adopted) + 1, now
    occurrences = (
        "import sqlite3; db = sqlite3.connect('file:/var/lib/cgpolicy/state.db?mode=ro', "
        f"uri=True); print(*db.execute('SELECT occurrences FROM users WHERE uid = {UID}'))"
    )
    mine = root(vm, f"python3 -c {shlex.quote(occurrences)}").stdout.strip().strip("(,)")
    shared = sql(vm, f"SELECT tier IS NULL, occurrences FROM cgpolicy_standings WHERE uid = {UID}")
    assert shared == f"t|{mine}", (shared, mine)


def test_b_with_a_wrong_password_says_so_and_enforces_locally(nodes):
    vm = nodes
    path = f"{B}/mnt/etc/cgpolicy/sync-password"
    root(vm, f"printf 'wrong\\n' > {path} && chmod 0600 {path}")
    try:
        on_b(vm, "systemctl restart cgpolicyd")
        on_b(vm, f"cgpolicyctl penalize {USER} penalty1")
        wait_quota(vm, "b", "penalty1")
        lines = poll(
            "B logs the refused password",
            lambda: log_lines(vm, "b", "event=sync-down"),
            bool,
            30,
            lambda: diagnostics(vm),
        )
        assert "password authentication failed" in lines[-1], lines
        time.sleep(2 * INTERVAL)
        assert quota(vm, "a") == QUOTA[None]  # it never reached the group
        assert quota(vm, "b") == QUOTA["penalty1"]
    finally:
        root(vm, f"printf '{PASSWORD}\\n' > {path}")
        on_b(vm, "systemctl restart cgpolicyd", check=False)


def test_a_hog_on_a_is_penalized_by_the_model_and_b_follows(nodes):
    vm = nodes
    for node in ("a", "b"):  # else the tier's quota below would be an old penalty's
        before = [e for e in events(vm, node, HOG_UID) if e[1] == "penalized"]
        assert not before, f"{HOG} penalized on {node} before the hog ran: {before}"
    vm.ssh("nohup sh -c 'while :; do :; done' >/dev/null 2>&1 &", user=HOG)
    try:
        wait_quota(vm, "a", "penalty1", timeout=120, uid=HOG_UID, shown="100ms")
        wait_quota(vm, "b", "penalty1", uid=HOG_UID, shown="100ms")
        seconds = converged(vm, "a", "b", "penalized", HOG_UID)
        print(f"convergence of the model's penalty A -> B: {seconds:.2f} s")
        assert seconds <= 2 * INTERVAL, f"{seconds:.2f} s\n{diagnostics(vm)}"
        (made,) = [e for e in events(vm, "a", HOG_UID) if e[1] == "penalized"]
        assert made[3] is None  # the model's own, no admin
    finally:
        root(vm, f"pkill -KILL -u {HOG}", check=False)
