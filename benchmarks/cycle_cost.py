"""CPU cost of one cgpolicyd evaluation cycle, on synthetic nodes of 100 to 5,000 users.

Builds fake cgroup v2 and v1 (hybrid) trees and a fake /proc in a temp dir (in
/dev/shm when there is one): per user a slice with a session scope (sshd twice,
bash) and a user@.service (systemd, (sd-pam)); every 5th user also runs rsync.
Each process's /proc/PID/exe points at a program file of its name; run as root,
as the daemon runs, these files are root's alone and the whitelist admits them.
One cycle is what the daemon does every 10 s: active_uids(), sample() with the
ssh whitelist for everyone, then badness.evaluate() for every user; the
metrics it then builds and writes are timed on their own. Between
cycles (not timed) the CPU counters of the "busy" users grow: an idle slice's
processes are not read (see usage.py), so both the worst case (every user busy)
and a more usual one (1 in 10 busy) are shown. The figure is the median
time.process_time() of several cycles after warm-up; goal: under 50 ms of CPU
per 1,000 users per cycle.

A fake tree in tmpfs or on disk is not sysfs or procfs: the kernel generates
those files on each read, and a real cgroup directory holds dozens of control
files that scandir passes over. So absolute numbers are indicative; the last
table reads files of this host's /proc and cgroupfs beside a fake one to show
the ratio. The daemon's sysfs reads are measured in the VM by other tests.

    .venv/bin/python benchmarks/cycle_cost.py [CYCLES]
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pam_cgpolicy import metrics  # noqa: E402
from pam_cgpolicy.accounts import Account  # noqa: E402
from pam_cgpolicy.badness import (  # noqa: E402
    BadnessParams,
    PenaltyParams,
    Tier,
    UserScore,
    evaluate,
)
from pam_cgpolicy.policy import General, Policy, StatusGroup  # noqa: E402
from pam_cgpolicy.usage import CLK_TCK, UsageSampler, _Rule  # noqa: E402

SIZES = (100, 1000, 5000)
BUSY = (1.0, 0.1)
GOAL_MS_PER_1000 = 50.0
INTERVAL = 10.0
FIRST_UID = 1000
WHITELIST = frozenset({"sshd", "scp", "sftp-server", "rsync"})
PARAMS = BadnessParams(
    cpu_threshold=0.8, memory_threshold=0.5, time_to_max_bad=300, time_to_min_bad=1800
)
PENALTY = PenaltyParams(
    tiers=(
        Tier("penalty1", timeout=1800, cpu_factor=0.8, memory_factor=0.8),
        Tier("penalty2", timeout=3600, cpu_factor=0.6, memory_factor=0.6),
        Tier("penalty3", timeout=7200, cpu_factor=0.4, memory_factor=0.4),
    ),
    occurrence_timeout=10800,
)
CPU_QUOTA = 1.0  # cores
MEMORY_QUOTA = 4 * 2**30

# Key sets of real memory.stat files (Linux 6.1), so that parsing reads real sizes.
V2_MEMORY_KEYS = """
anon file kernel kernel_stack pagetables sec_pagetables percpu sock vmalloc shmem zswap
zswapped file_mapped file_dirty file_writeback swapcached anon_thp file_thp shmem_thp
inactive_anon active_anon inactive_file active_file unevictable slab_reclaimable
slab_unreclaimable slab workingset_refault_anon workingset_refault_file
workingset_activate_anon workingset_activate_file workingset_restore_anon
workingset_restore_file workingset_nodereclaim pgscan pgsteal pgscan_kswapd pgscan_direct
pgsteal_kswapd pgsteal_direct pgfault pgmajfault pgrefill pgactivate pgdeactivate
pglazyfree pglazyfreed zswpin zswpout thp_fault_alloc thp_collapse_alloc
"""
V1_OWN_MEMORY_KEYS = """
cache rss rss_huge shmem mapped_file dirty writeback workingset_refault_anon
workingset_refault_file swap swapcached pgpgin pgpgout pgfault pgmajfault inactive_anon
active_anon inactive_file active_file unevictable
"""
V1_MEMORY_KEYS = (
    V1_OWN_MEMORY_KEYS
    + " hierarchical_memory_limit hierarchical_memsw_limit "
    + " ".join(f"total_{key}" for key in V1_OWN_MEMORY_KEYS.split())
)
V1_CONTROLLERS = "cpuset cpu,cpuacct blkio memory devices freezer net_cls,net_prio perf_event"


def slurp(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 16384)
    finally:
        os.close(fd)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def memory_stat(keys: str, uid: int) -> str:
    return "".join(
        f"{key} {(uid * 7919 + i * 104729) % 2**31}\n" for i, key in enumerate(keys.split())
    )


def proc_stat(pid: int, comm: str, ticks: int, start: int) -> str:
    return (
        f"{pid} ({comm}) S 1 {pid} {pid} 0 -1 4194560 2000 0 0 0 {ticks} 0 0 0 20 0 1 0 "
        f"{start} 12345678 900 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 0 0 0 0 0 0 "
        "0 0 0 0 0 0 0 0\n"
    )


class FakeNode:
    """A synthetic node of ``users`` logged-in users in one cgroup mode."""

    def __init__(self, base: Path, mode: str, users: int) -> None:
        self.mode = mode
        self.root = base / mode / "cgroup"
        self.proc = base / mode / "proc"
        self.uids = list(range(FIRST_UID, FIRST_UID + users))
        self.usage = dict.fromkeys(self.uids, 0)  # usec
        self.uptime = 100_000.0
        self.programs = base / mode / "bin"
        self.programs.mkdir(parents=True)
        self.programs.chmod(0o755)
        v2 = mode == "unified"
        tasks = self.root / ("" if v2 else "systemd") / "user.slice"
        write(self.root / ("cgroup.controllers" if v2 else "unified/cgroup.controllers"), "")
        write(self.proc / "uptime", f"{self.uptime:.2f} 1.00\n")
        pid = 10_000
        for uid in self.uids:
            slice_dir = tasks / f"user-{uid}.slice"
            processes = {
                "session-1.scope": ["sshd", "sshd", "bash"],
                f"user@{uid}.service/init.scope": ["systemd", "(sd-pam)"],
                f"user@{uid}.service/app.slice": ["rsync"] if uid % 5 == 0 else [],
            }
            write(slice_dir / "cgroup.procs", "")
            write(slice_dir / f"user@{uid}.service" / "cgroup.procs", "")
            for group, comms in processes.items():
                listed = []
                for comm in comms:
                    pid += 1
                    listed.append(f"{pid}\n")
                    write(self.proc / str(pid) / "stat", proc_stat(pid, comm, 250, 4_000_000))
                    write(self.proc / str(pid) / "comm", f"{comm}\n")
                    write(self.proc / str(pid) / "cgroup", self.cgroup_file(uid, group))
                    (self.proc / str(pid) / "exe").symlink_to(self.program(comm))
                write(slice_dir / group / "cgroup.procs", "".join(listed))
            if v2:
                write(slice_dir / "memory.stat", memory_stat(V2_MEMORY_KEYS, uid))
                write(slice_dir / "cgroup.events", "populated 1\nfrozen 0\n")
            else:
                write(
                    self.root / f"memory/user.slice/user-{uid}.slice/memory.stat",
                    memory_stat(V1_MEMORY_KEYS, uid),
                )
            self.write_cpu(uid)

    def program(self, comm: str) -> Path:
        """/proc/PID/exe's target: a file of the process's name in a directory of
        programs, both root's alone when this runs as root (as the daemon does)."""
        path = self.programs / comm.strip("()")
        if not path.exists():
            write(path, "")
            path.chmod(0o755)
        return path

    def cgroup_file(self, uid: int, group: str) -> str:
        path = f"/user.slice/user-{uid}.slice/{group}"
        if self.mode == "unified":
            return f"0::{path}\n"
        lines = [f"{n}:{c}:/" for n, c in enumerate(V1_CONTROLLERS.split(), start=2)]
        lines += [f"1:name=systemd:{path}", f"0::{path}"]
        return "".join(f"{line}\n" for line in reversed(lines))

    def write_cpu(self, uid: int) -> None:
        if self.mode == "unified":
            path = self.root / f"user.slice/user-{uid}.slice/cpu.stat"
            usec = self.usage[uid]
            text = f"usage_usec {usec}\nuser_usec {usec}\nsystem_usec 0\n"
            text += "nr_periods 0\nnr_throttled 0\nthrottled_usec 0\nnr_bursts 0\nburst_usec 0\n"
        else:
            path = self.root / f"cpu,cpuacct/user.slice/user-{uid}.slice/cpuacct.usage"
            text = f"{self.usage[uid] * 1000}\n"
        write(path, text)

    def advance(self, busy: float) -> None:
        """Ten seconds pass; the first ``busy`` fraction of users used CPU meanwhile."""
        self.uptime += INTERVAL
        write(self.proc / "uptime", f"{self.uptime:.2f} 1.00\n")
        for uid in self.uids[: math.ceil(len(self.uids) * busy)]:
            self.usage[uid] += 9_000_000  # 0.9 cores: above the threshold
            self.write_cpu(uid)


def run_cycles(
    node: FakeNode, busy: float, cycles: int
) -> tuple[list[float], UsageSampler, dict[int, UserScore]]:
    """CPU seconds of each measured cycle (the first two only warm up), and the
    sampler and scores they leave."""
    sampler = UsageSampler(node.root, node.proc)
    scores: dict[int, UserScore] = {}
    times: list[float] = []
    now = 0.0
    for cycle in range(cycles + 2):
        node.advance(busy)
        now += INTERVAL
        started = time.process_time()
        uids = sampler.active_uids(FIRST_UID)
        for uid, sample in sampler.sample(uids, WHITELIST, now).items():
            cores = math.nan if sample.cores is None else sample.cores
            memory = math.nan if sample.memory_bytes is None else float(sample.memory_bytes)
            scores[uid], _ = evaluate(
                scores.get(uid, UserScore()),
                cores,
                CPU_QUOTA,
                memory,
                MEMORY_QUOTA,
                now,
                INTERVAL,
                PARAMS,
                PENALTY,
            )
        if cycle >= 2:
            times.append(time.process_time() - started)
    return times, sampler, scores


def metrics_cost(node: FakeNode, scores: dict[int, UserScore], rounds: int = 5) -> float:
    """CPU seconds to turn a cycle's samples and standings into the metrics file."""
    samples = UsageSampler(node.root, node.proc).sample(node.uids, WHITELIST, 0.0)
    group = StatusGroup("all", limits={"CPUQuota": "100%", "MemoryMax": "4G"})
    compiled = Policy(General(), ("all",), "all", {"all": group}).compile()
    accounts = {uid: Account(f"user{uid}", uid, frozenset({uid})) for uid in node.uids}
    directory = node.root.parent / "textfile"
    directory.mkdir(mode=0o755, exist_ok=True)
    writer = metrics.TextfileWriter()

    def once() -> None:
        users = metrics.user_series(samples, scores, accounts.__getitem__, compiled, PENALTY.order)
        exposition = metrics.build(users, metrics.NodeSeries(PENALTY.order, 0.1, 0, 0, 0))
        assert writer.write(str(directory), exposition)

    return timed(once, rounds)


def read_cost(paths: list[str], rounds: int = 20) -> float:
    """Microseconds of CPU to open, read and close one of ``paths``."""

    def once() -> None:
        for path in paths:
            with contextlib.suppress(OSError):  # a process that exited meanwhile
                slurp(path)

    return timed(once, rounds) / len(paths) * 1e6


def timed(fn: Callable[[], object], rounds: int) -> float:
    fn()
    started = time.process_time()
    for _ in range(rounds):
        fn()
    return (time.process_time() - started) / rounds


def walk_slices(node: FakeNode) -> dict[int, list[int]]:
    """The road not taken: each slice's whitelisted pids from the cgroup.procs files of
    the slice and all its descendants, then /proc/PID/stat of each."""
    tasks = str(node.root / ("user.slice" if node.mode == "unified" else "systemd/user.slice"))
    found: dict[int, list[int]] = {}
    for uid in node.uids:
        pending = [f"{tasks}/user-{uid}.slice"]
        while pending:
            directory = pending.pop()
            pids = slurp(f"{directory}/cgroup.procs").split()
            with os.scandir(directory) as entries:
                pending.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))
            for pid in pids:
                data = slurp(f"{node.proc}/{pid.decode()}/stat")
                if data[data.find(b"(") + 1 : data.rfind(b")")].decode() in WHITELIST:
                    found.setdefault(uid, []).append(int(pid))
    return found


def pid_discovery(node: FakeNode) -> tuple[float, float, float]:
    """ms of CPU to find every user's whitelisted processes: walking the slices, and the
    sampler's one pass over /proc, first (every /proc/PID/cgroup read) and then."""
    wanted = dict.fromkeys(node.uids, _Rule.of(WHITELIST))
    warm = UsageSampler(node.root, node.proc)
    return (
        timed(lambda: walk_slices(node), 3) * 1000,
        timed(lambda: UsageSampler(node.root, node.proc)._scan_proc(wanted), 3) * 1000,
        timed(lambda: warm._scan_proc(wanted), 3) * 1000,
    )


def main() -> None:
    cycles = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    shm = Path("/dev/shm")
    base_dir = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="cgpolicy-bench-", dir=base_dir) as tmp:
        base = Path(tmp)
        filesystem = "tmpfs (/dev/shm)" if base_dir else f"{tempfile.gettempdir()}"
        print(f"fake trees in {filesystem}; median of {cycles} cycles after 2 warm-up cycles")
        print(f"goal: under {GOAL_MS_PER_1000:g} ms of CPU per 1,000 users per cycle")
        print()
        print(f"{'mode':8} {'users':>6} {'busy':>5} {'ms CPU/cycle':>13} {'ms/1000 users':>14}")
        largest: dict[str, FakeNode] = {}
        metrics_ms: list[tuple[int, float]] = []
        for mode in ("unified", "hybrid"):
            for users in SIZES:
                node = FakeNode(base / f"{users}", mode, users)
                for busy in BUSY:
                    times, _, scores = run_cycles(node, busy, cycles)
                    ms = statistics.median(times) * 1000
                    per_1000 = ms / users * 1000
                    verdict = "PASS" if per_1000 < GOAL_MS_PER_1000 else "MISS"
                    print(
                        f"{mode:8} {users:>6} {busy:>5.0%} {ms:>13.1f} {per_1000:>14.1f}  {verdict}"
                    )
                if mode == "unified":
                    metrics_ms.append((users, metrics_cost(node, scores) * 1000))
                if users == SIZES[-1]:
                    largest[mode] = node

        print()
        print("the metrics of a cycle: built from samples and standings, written (v2):")
        for users, ms in metrics_ms:
            print(f"  {users:>6} users: {ms:7.1f} ms CPU ({ms / users * 1000:.1f} per 1000 users)")

        node = largest["unified"]
        tracemalloc.start()
        # A fresh sampler and scores, traced from the start and alive at the end.
        kept = run_cycles(node, 1.0, 3)
        current, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        del kept
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        print()
        print(f"memory, {SIZES[-1]} users (v2, all busy):")
        print(
            f"  tracemalloc current after the cycles: {current / 2**20:.1f} MiB "
            "(the sampler's state and the scores)"
        )
        print(f"  peak RSS of this process: {peak_rss / 1024:.1f} MiB")

        slices_ms, cold_ms, warm_ms = pid_discovery(largest["unified"])
        print()
        print(f"finding every user's whitelisted processes, {SIZES[-1]} users (v2), ms CPU:")
        print(f"  walk each slice's cgroup.procs, read each /proc/PID/stat:   {slices_ms:7.1f}")
        print(f"  one pass over /proc, first time (reads each PID's cgroup):  {cold_ms:7.1f}")
        print(f"  one pass over /proc, as the sampler runs it (warm):         {warm_ms:7.1f}")

        fake = [f"{node.proc}/{pid}/stat" for pid in sorted(os.listdir(node.proc))[:500]]
        real_procs = [f"/proc/{pid}/stat" for pid in os.listdir("/proc") if pid.isdigit()]
        real_cgroup = [
            path
            for path in (
                "/sys/fs/cgroup/cpu.stat",
                "/sys/fs/cgroup/memory.stat",
                "/sys/fs/cgroup/unified/cpu.stat",
                "/sys/fs/cgroup/cpuacct/cpuacct.usage",
                "/sys/fs/cgroup/cpu,cpuacct/cpuacct.usage",
                "/sys/fs/cgroup/memory/memory.stat",
            )
            if os.path.exists(path)
        ]
        print()
        print("µs of CPU per file read (open, read, close):")
        print(f"  fake tree /proc/PID/stat:      {read_cost(fake):6.1f}")
        print(f"  this host's /proc/PID/stat:    {read_cost(real_procs):6.1f}")
        if real_cgroup:
            print(f"  this host's cgroup stat files: {read_cost(real_cgroup, 200):6.1f}")
        print(f"(clock ticks per second: {CLK_TCK})")


if __name__ == "__main__":
    main()
