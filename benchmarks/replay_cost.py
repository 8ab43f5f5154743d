"""Wall time and peak memory of ``cgpolicyctl replay``: 7 days of 1,000 users at 10 s.

Builds the usage history as cgpolicyd would have: the real UsageHistory writer,
one cycle of 1,000 points every 10 s for 7 days, with its downsampling and
retention passes (as benchmarks/history_cost.py does), in a file kept for the
next run (``--history``). Each user has a steady load of their own, and now and
then a busy stretch of a few cores and some memory, so that the policy penalizes
some of them. Then, in a child process of its own (so that building the history
counts in neither figure), it replays the whole week under a policy like the
default one (replay.replay: the engine cgpolicyd runs, cycle by cycle) and prints
the wall time and the peak resident memory beside the goals (60 s, 500 MB).
``--report N`` also prints the replay's text for the first N users.

    .venv/bin/python benchmarks/replay_cost.py [--users 1000] [--days 7] [--interval 10]
        [--history FILE] [--report N]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pam_cgpolicy.accounts import Account  # noqa: E402
from pam_cgpolicy.usagehistory import UsageHistory, UsagePoint  # noqa: E402

GOAL_SECONDS = 60.0
GOAL_MB = 500
T0 = 1_800_000_000.0
GiB = 1024**3
FIRST_UID = 5000
MEMORY_TOTAL = 256 * GiB

POLICY = {
    "cgpolicy.toml": """\
[general]
min_uid = 1000
interval = 10

[status]
order = ["normal"]
fallback = "normal"

[badness]
cpu_threshold = 0.8
memory_threshold = 0.5
time_to_max_bad = 300
time_to_min_bad = 1800

[penalty]
order = ["penalty1", "penalty2", "penalty3"]
occurrence_timeout = 10800

[penalty.penalty1]
timeout = 1800
cpu_factor = 0.8
memory_factor = 0.8

[penalty.penalty2]
timeout = 3600
cpu_factor = 0.5
memory_factor = 0.5

[penalty.penalty3]
timeout = 7200
cpu_factor = 0.3
memory_factor = 0.3
""",
    "groups.d/normal.toml": '[limits]\nCPUQuota = "400%"\nMemoryMax = "8G"\n',
}


def build(path: Path, users: int, days: float, interval: float) -> None:
    """The history of ``users`` for ``days``, one cycle at a time, as the daemon writes it."""
    rng = random.Random(11)
    uids = range(FIRST_UID, FIRST_UID + users)
    steady = {uid: (rng.uniform(0.01, 1.0), rng.randint(50 << 20, 2 * GiB)) for uid in uids}
    busy: dict[int, tuple[float, float, int]] = {}  # uid -> (until, cores, memory)
    cycles = int(days * 86400 / interval)
    started = time.monotonic()
    with UsageHistory.open(path) as history:
        for cycle in range(cycles):
            now = T0 + cycle * interval
            if rng.random() < interval / 120:  # a busy stretch begins about every 2 minutes
                uid = rng.choice(uids)
                busy[uid] = (
                    now + rng.uniform(300, 5400),
                    rng.uniform(2.5, 8.0),
                    rng.randint(1 * GiB, 7 * GiB),
                )
            points = []
            for uid in uids:
                cores, memory = steady[uid]
                stretch = busy.get(uid)
                if stretch is not None:
                    if stretch[0] < now:
                        del busy[uid]
                    else:
                        cores, memory = stretch[1], stretch[2]
                jitter = 1 + (cycle + uid) % 7 / 20
                points.append(UsagePoint(uid, now, cores * jitter, memory, span=interval))
            history.record(now, points, retention=days * 86400)
            if cycle % int(86400 / interval) == 0:
                print(
                    f"  day {cycle * interval / 86400:.0f}: {history.row_count()} rows "
                    f"({time.monotonic() - started:.0f} s)",
                    file=sys.stderr,
                )


def lookup(uid: int) -> Account:
    """The benchmark's users are not in NSS: an account of each, as NSS would give it."""
    return Account(f"user{uid}", uid, frozenset({100}))


def replay_once(path: Path, days: float, report: int) -> None:
    """The child: one replay of the whole history; its figures on one line, last."""
    from pam_cgpolicy import replay
    from pam_cgpolicy.policy import load_policy

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "groups.d").mkdir()
        for name, text in POLICY.items():
            (Path(tmp) / name).write_text(text)
        policy = load_policy(Path(tmp))
    history = UsageHistory.open_readonly(path)
    assert history is not None
    with history:
        (until,) = history._conn.execute("SELECT max(time) FROM samples").fetchone()
        since = until - days * 86400
        wall = time.monotonic()
        result = replay.replay(policy, history, None, since, until + 1, MEMORY_TOTAL, None, lookup)
        seconds = time.monotonic() - wall
        if report:
            from pam_cgpolicy import cli

            last = FIRST_UID + report - 1
            mine = [row for row in result.rows if row.penalty.uid <= last]
            shown = dataclasses.replace(result, rows=tuple(mine))
            why = "the benchmark has no state database"
            cli._print_replay(shown, "benchmarks/replay_cost.py's policy", str(path), why)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    users = len({p.uid for p in result.candidate})
    print(
        f"FIGURES {seconds:.3f} {peak} {result.samples} {len(result.candidate)} {users} "
        f"{result.sampled_every}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--days", type=float, default=7.0)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--history", type=Path, help="the history file: built if missing, kept")
    parser.add_argument("--report", type=int, default=0, metavar="N")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        path = args.history
        if path is None:
            tmp = stack.enter_context(
                tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp"))
            )
            path = Path(tmp) / "usage.db"
        if args.child:
            replay_once(path, args.days, args.report)
            return 0
        if not path.exists():
            started = time.monotonic()
            build(path, args.users, args.days, args.interval)
            print(f"history built in {time.monotonic() - started:.0f} s", file=sys.stderr)
        command = [sys.executable, __file__, "--child", "--history", str(path)]
        command += ["--days", str(args.days), "--report", str(args.report)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        *text, figures = done.stdout.splitlines()
        seconds, peak, samples, penalties, users, every = figures.split()[1:]
        size = sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))
    print("\n".join(text))
    print(
        f"replay: {args.users} users, {args.days:g} days at {args.interval:g} s: "
        f"{int(samples)} samples kept ({size / 1e6:.0f} MB, sampled every {float(every):g} s), "
        f"{penalties} penalties of {users} users"
    )
    mb = int(peak) / 1e6
    print(f"{'':28}{'measured':>12}{'goal':>12}")
    print(f"{'wall time (s)':28}{float(seconds):>12.1f}{GOAL_SECONDS:>12g}")
    print(f"{'peak resident memory (MB)':28}{mb:>12.0f}{GOAL_MB:>12}")
    return 0 if float(seconds) <= GOAL_SECONDS and mb <= GOAL_MB else 1


if __name__ == "__main__":
    sys.exit(main())
