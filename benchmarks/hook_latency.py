"""The login hook's wall time per login, beside a bare interpreter, in the test VM.

Boots the VM (cgroup v2), installs cgpolicy, logs a user in, then inside the
VM runs the hook exactly as pam_exec does (PAM_TYPE=open_session, PAM_USER)
and `python3 -c pass`, interleaved, RUNS times each. Prints p50 and p95 of
both and their ratio. Goal: hook p50 at most 2x the bare interpreter.

    .venv/bin/python benchmarks/hook_latency.py [RUNS]
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from vmharness.install import install_cgpolicy, installed_python  # noqa: E402
from vmharness.machine import VM  # noqa: E402

INSIDE = r"""
import os, statistics, subprocess, sys, time

runs = int(sys.argv[1])
python = sys.argv[2]  # the installed cgpolicy's interpreter
hook_env = dict(os.environ, PAM_TYPE="open_session", PAM_USER="bench")

def wall(cmd, env=None):
    started = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return (time.perf_counter() - started) * 1000

def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]

series = {
    "bare python3 -c pass": (["python3", "-c", "pass"], None),
    "cgpolicy-pam-hook": (["/usr/sbin/cgpolicy-pam-hook"], hook_env),
    # What the hook would pay just to import a Python D-Bus stack (the road not taken):
    "import dbus_fast.aio": ([python, "-I", "-c", "import dbus_fast.aio"],
                             None),
}
times = {name: [] for name in series}
for _ in range(3):  # warm the page cache
    for cmd, env in series.values():
        wall(cmd, env)
for _ in range(runs):
    for name, (cmd, env) in series.items():
        times[name].append(wall(cmd, env))
bare = pct(times["bare python3 -c pass"], 50)
print(f"runs: {runs} each, interleaved")
for name, values in times.items():
    print(f"{name:22}: p50 {pct(values, 50):7.1f} ms   p95 {pct(values, 95):7.1f} ms   "
          f"p50/bare {pct(values, 50) / bare:5.2f}x")
print("goal: cgpolicy-pam-hook p50 at most 2x bare")
"""


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 60
    with VM(cgroup="v2") as vm:
        install_cgpolicy(vm, REPO)
        vm.add_user("bench", 2500)
        vm.ssh("nohup sleep 100000 >/dev/null 2>&1 &", user="bench")
        check = vm.ssh("PAM_TYPE=open_session PAM_USER=bench /usr/sbin/cgpolicy-pam-hook")
        print("one hook run logs:", check.stderr.strip())
        cpu = vm.ssh("nproc; grep -m1 'model name' /proc/cpuinfo").stdout.split("\n")[0]
        print(
            f"VM: {cpu} CPUs under software emulation (absolute times are slow; "
            "the ratio is the figure)"
        )
        python = installed_python(vm)
        inside = f"python3 -c {shlex.quote(INSIDE)} {runs} {python}"
        print(vm.ssh(inside, timeout=1800).stdout)


if __name__ == "__main__":
    main()
