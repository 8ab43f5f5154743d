"""Disk size and CPU per cycle of the usage history: 1,000 active users for 7 days at 10 s.

Runs the real UsageHistory through every cycle of the period (60,480 cycles of
1,000 points each by default, with the downsampling and retention passes as the
daemon runs them), on a file in a temp dir on disk. Every user uses some CPU and
memory in every cycle, the worst case for the history (idle users are not
recorded); one user in 500 hits a violation each hour, with five top processes.

Printed side by side with the goals: the file's size at the end (database plus
its WAL, after the last cycle; goal at most 300 MB) and the CPU each cycle adds
(time.process_time() around building the points and recording them, as
cgpolicyd's cycle does; goal at most 10 ms): the mean over all cycles, which
spreads the downsampling passes over the cycles between them, and the worst
cycle, one with a downsampling pass.

    .venv/bin/python benchmarks/history_cost.py [--users 1000] [--days 7] [--interval 10]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pam_cgpolicy.usage import Process, Sample  # noqa: E402
from pam_cgpolicy.usagehistory import UsageHistory, UsagePoint  # noqa: E402

GOAL_MB = 300
GOAL_MS = 10.0
T0 = 1_800_000_000.0
GiB = 1024**3


def run(users: int, days: float, interval: float) -> tuple[int, list[float], int]:
    rng = random.Random(8)
    uids = list(range(5000, 5000 + users))
    base = {uid: (rng.uniform(0.05, 3.0), rng.randint(50 << 20, 8 * GiB)) for uid in uids}
    cycles = int(days * 86400 / interval)
    costs = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        path = Path(tmp) / "usage.db"
        with UsageHistory.open(path) as history:
            for cycle in range(cycles):
                now = T0 + cycle * interval
                jitter = 1 + (cycle % 7) / 10
                samples = {
                    uid: Sample(uid, cores * jitter, None, memory, 0.0, interval)
                    for uid, (cores, memory) in base.items()
                }
                violations = {}
                if cycle % int(3600 / interval) == 0:
                    for uid in uids[::500]:
                        violations[uid] = [
                            Process(100 + n, "python3", "/usr/bin/python3", 1.0, GiB)
                            for n in range(5)
                        ]
                started = time.process_time()
                points = [
                    UsagePoint(
                        uid, now, s.cores, s.memory_bytes, 12.5, 3.25, None, s.interval or 0.0
                    )
                    for uid, s in samples.items()
                ]
                history.record(now, points, violations, retention=7 * 86400)
                costs.append(time.process_time() - started)
                if cycle % 8640 == 0:
                    print(
                        f"  day {cycle * interval / 86400:.0f}: {history.row_count()} rows",
                        file=sys.stderr,
                    )
            rows = history.row_count()
        size = sum(f.stat().st_size for f in Path(tmp).iterdir())
    return size, costs, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--days", type=float, default=7.0)
    parser.add_argument("--interval", type=float, default=10.0)
    args = parser.parse_args()
    wall = time.monotonic()
    size, costs, rows = run(args.users, args.days, args.interval)
    mean_ms = statistics.fmean(costs) * 1000
    median_ms = statistics.median(costs) * 1000
    worst_ms = max(costs) * 1000
    print(
        f"usage history: {args.users} users, {args.days:g} days at {args.interval:g} s "
        f"({len(costs)} cycles, {rows} rows kept; {time.monotonic() - wall:.0f} s to run)"
    )
    print(f"{'':28}{'measured':>12}{'goal':>12}")
    print(f"{'disk size (MB)':28}{size / 1e6:>12.1f}{GOAL_MB:>12}")
    print(f"{'CPU per cycle, mean (ms)':28}{mean_ms:>12.2f}{GOAL_MS:>12g}")
    print(f"{'CPU per cycle, median (ms)':28}{median_ms:>12.2f}{GOAL_MS:>12g}")
    print(f"{'CPU, worst cycle (ms)':28}{worst_ms:>12.1f}{'-':>12}")
    return 0 if size <= GOAL_MB * 1e6 and mean_ms <= GOAL_MS else 1


if __name__ == "__main__":
    sys.exit(main())
