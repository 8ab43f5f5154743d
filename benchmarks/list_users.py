"""ListUsers' wall time with thousands of stored users, against real systemd in the test VM.

Boots the VM (cgroup v2), installs cgpolicy, adds USERS accounts to the guest's
user database, stores a standing for each in cgpolicyd's state database, and
starts a process in ACTIVE of their slices (so those slices are loaded and read
back from systemd). Then, inside the VM, times ListUsers through busctl RUNS
times and prints the fastest, the median and the slowest call. Goal: under 2 s
for 5,000 stored users; the bus's deadline for a call is 20 s.

    .venv/bin/python benchmarks/list_users.py [USERS] [ACTIVE] [RUNS] [profile]

With ``profile``, cgpolicyd's own part is also profiled once: where its time goes.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from vmharness.install import install_cgpolicy, installed_python  # noqa: E402
from vmharness.machine import VM  # noqa: E402

FIRST_UID = 100_000

STORE = r"""
import sys
from pam_cgpolicy.badness import UserScore
from pam_cgpolicy.state import StateStore

first, count = int(sys.argv[1]), int(sys.argv[2])
with StateStore.open("/var/lib/cgpolicy/state.db") as store:
    store.record_many(
        [(first + i, f"lbench{i}", UserScore(cpu_badness=1.0), None) for i in range(count)]
    )
"""

TIME = r"""
import json, statistics, subprocess, sys, time

runs = int(sys.argv[1])
call = ["busctl", "--timeout=60", "--json=short", "call", "org.cgpolicy1", "/org/cgpolicy1",
        "org.cgpolicy1.Manager", "ListUsers"]
walls, listed, with_limits = [], 0, 0
for _ in range(runs):
    started = time.perf_counter()
    done = subprocess.run(call, check=True, capture_output=True, text=True)
    walls.append(time.perf_counter() - started)
    (users,) = json.loads(done.stdout)["data"]
    listed = len(users)
    with_limits = sum(1 for row in users if row[10])  # limits: the row's 11th field
print(f"ListUsers: {listed} users listed, {with_limits} with their slice's limits read")
print(f"busctl --json, wall time over {runs} calls: fastest {min(walls):.2f} s, "
      f"median {statistics.median(walls):.2f} s, slowest {max(walls):.2f} s")
print("goal: under 2 s")
"""

# Where the time goes: cgpolicyd's own work (a Daemon in this process, on the
# node's policy, state database and systemd), and a call by cgpolicyctl's client.
PARTS = r"""
import asyncio, cProfile, pstats, statistics, sys, time
from dbus_fast import BusType
from dbus_fast.aio import MessageBus
from pam_cgpolicy.client import Daemon as Client
from pam_cgpolicy.daemon import Daemon, starting_policy
from pam_cgpolicy.state import StateStore
from pam_cgpolicy.systemd import Systemd
from pam_cgpolicy.usage import UsageSampler

async def main(runs, profile):
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    policy, _ = starting_policy("/etc/cgpolicy", "/var/lib/cgpolicy/policy.compiled")
    store = StateStore.open("/var/lib/cgpolicy/state.db")
    daemon = Daemon(policy, store, Systemd(bus, 20), UsageSampler(),
                    penalties="/tmp/unused.penalties", last_good="/tmp/unused.compiled")
    inside, client = [], []
    for _ in range(runs):
        started = time.perf_counter()
        await daemon.list_users()
        inside.append(time.perf_counter() - started)
        started = time.perf_counter()
        await Client(bus, 60).list_users()
        client.append(time.perf_counter() - started)
    for name, walls in (("cgpolicyd's list_users itself", inside),
                        ("a call through cgpolicyctl's client", client)):
        print(f"{name}: fastest {min(walls):.2f} s, median {statistics.median(walls):.2f} s")
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        await daemon.list_users()
        profiler.disable()
        print("where cgpolicyd's own time goes (one call, profiled):")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)

asyncio.run(main(int(sys.argv[1]), sys.argv[2:] == ["profile"]))
"""


def main() -> None:
    users = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    active = int(sys.argv[2]) if len(sys.argv) > 2 else 50
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    profile = sys.argv[4:] == ["profile"]
    with VM(cgroup="v2") as vm:
        install_cgpolicy(vm, REPO)
        lines = "".join(
            f"lbench{i}:x:{FIRST_UID + i}:100::/nonexistent:/usr/sbin/nologin\n"
            for i in range(users)
        )
        vm.put_bytes(lines.encode(), "/root/lbench.passwd")
        vm.ssh("cat /root/lbench.passwd >> /etc/passwd")
        vm.ssh("systemctl stop cgpolicyd")
        python = installed_python(vm)
        vm.ssh(f"{python} -c {shlex.quote(STORE)} {FIRST_UID} {users}")
        vm.ssh("systemctl start cgpolicyd")
        for i in range(active):
            uid = FIRST_UID + i
            vm.ssh(
                f"systemd-run --quiet --uid={uid} --slice=user-{uid}.slice "
                f"--unit=lbench-{uid} sleep 100000"
            )
        cpu = vm.ssh("nproc").stdout.strip()
        print(
            f"VM: {cpu} CPUs under software emulation; {users} stored users, "
            f"{active} of them with a loaded slice"
        )
        print(vm.ssh(f"python3 -c {shlex.quote(TIME)} {runs}", timeout=1800).stdout)
        parts = f"{python} -c {shlex.quote(PARTS)} {runs}"
        print(vm.ssh(f"{parts} profile" if profile else parts, timeout=600).stdout)


if __name__ == "__main__":
    main()
