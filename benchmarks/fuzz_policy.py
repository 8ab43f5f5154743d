"""Fuzz the policy loader with N random and mutated policy trees (default 100,000).

Each case must end in a PolicyError locating every problem, or in a policy
that compiles (see tests/unit/policygen.py); the first broken promise stops
the run with its seed, so that `--seed S --cases 1` replays it.
"""

from __future__ import annotations

import argparse
import collections
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests" / "unit")]

from policygen import outcome, write_tree  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0, help="the first case's seed")
    args = parser.parse_args()
    counts: collections.Counter[str] = collections.Counter()
    started = time.monotonic()
    for seed in range(args.seed, args.seed + args.cases):
        root = Path(tempfile.mkdtemp(prefix="cgpolicy-fuzz-"))
        try:
            write_tree(random.Random(seed), root)
            counts[outcome(root)] += 1
        except BaseException as err:
            print(f"seed {seed}: {type(err).__name__}: {err}", file=sys.stderr)
            return 1
        finally:
            shutil.rmtree(root)
    took = time.monotonic() - started
    valid, refused = counts["valid"], counts["refused"]
    print(f"{args.cases} cases in {took:.0f}s: {valid} valid, {refused} refused")
    return 0


if __name__ == "__main__":
    sys.exit(main())
