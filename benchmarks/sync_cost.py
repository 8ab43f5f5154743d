"""Wall time of the sync per cycle per node: 10 nodes x 1,000 users with standings each.

Against a real PostgreSQL server: the one given (--host, --port, --database,
--user, --password-file), or a private one started in a temporary directory
(--private, where the server's programs are installed). Each node has its own
state.db and Engine; at the start each node records a penalty for each of its
1,000 users and publishes them, and each then reads the whole group once (the
catch-up, timed on its own). Then, cycle after cycle, each node changes the
standings of CHURN of its users (a new penalty, or an admin's release) and
shares: publishes its outbox, reads what the others changed since its last
read, and adopts the winners (Engine.adopt, state.db written). The figure is
the median wall time of one node's share per cycle; goal: at most 20 ms.

    .venv/bin/python benchmarks/sync_cost.py --private [CYCLES]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pam_cgpolicy.accounts import Account  # noqa: E402
from pam_cgpolicy.badness import Change, UserScore  # noqa: E402
from pam_cgpolicy.engine import Engine  # noqa: E402
from pam_cgpolicy.policy import Sync, load_policy  # noqa: E402
from pam_cgpolicy.state import StateStore  # noqa: E402
from pam_cgpolicy.sync import Sharing  # noqa: E402
from pam_cgpolicy.syncdb import SyncDB  # noqa: E402

NODES, USERS, CHURN = 10, 1000, 10
FIRST_UID = 100_000
POLICY = """\
[status]
order = ["normal"]
fallback = "normal"

[penalty]
order = ["penalty1", "penalty2"]

[penalty.penalty1]
timeout = 1800
cpu_factor = 0.8
memory_factor = 0.8

[penalty.penalty2]
timeout = 3600
cpu_factor = 0.5
memory_factor = 0.5
"""


def account(uid: int) -> Account:
    return Account(f"u{uid}", uid, frozenset({uid}))


class Node:
    def __init__(self, index: int, settings: Sync, tmp: Path, config: Path) -> None:
        self.name = f"login{index}"
        self.store = StateStore.open(tmp / f"{self.name}.db")
        self.store.sharing = True
        self.engine = Engine(load_policy(config), self.store, 64 << 30, account)
        self.sharing = Sharing(SyncDB(Sync(**{**settings.__dict__, "node": self.name})), self.name)
        self.uids = range(FIRST_UID + index * USERS, FIRST_UID + (index + 1) * USERS)

    def change(self, uids: range | list[int], now: float, cycle: int) -> None:
        """A penalty for each, or at odd cycles an admin's release."""
        entries = []
        for uid in uids:
            old = self.store.get(uid) or UserScore()
            if cycle % 2 and old.tier:
                new = UserScore(occurrences=old.occurrences)
                change = Change("released", old.tier, None, old.occurrences, old.occurrences, "x")
            else:
                new = UserScore(tier="penalty1", tier_expiry=now + 1800, occurrences=1)
                change = Change("penalized", old.tier, "penalty1", old.occurrences, 1, "cpu")
            entries.append((uid, f"u{uid}", new, change))
        self.store.record_many(entries, "admin" if cycle % 2 else None, now=now)

    def share(self, now: float) -> float:
        started = time.perf_counter()
        order = ("penalty1", "penalty2")
        self.engine.adopt(asyncio.run(self.sharing.share(self.store, now, order)), now)
        if self.sharing.down:
            raise SystemExit(f"{self.name}: {self.sharing.down}")
        return (time.perf_counter() - started) * 1000


def run(settings: Sync, cycles: int) -> None:
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        config = tmp / "etc"
        (config / "groups.d").mkdir(parents=True)
        (config / "cgpolicy.toml").write_text(POLICY)
        (config / "groups.d" / "normal.toml").write_text('[limits]\nCPUQuota = "200%"\n')
        # a group of this run's own: the tables may hold other groups
        settings = Sync(**{**settings.__dict__, "group": f"bench-{time.time_ns()}"})
        nodes = [Node(i, settings, tmp, config) for i in range(NODES)]
        now = time.time()
        for node in nodes:
            node.change(node.uids, now, 0)
            node.share(now)  # publishes its 1,000
        catch_up = [node.share(now) for node in nodes]  # reads the group's 10,000
        print(f"{NODES} nodes x {USERS} users with standings, {CHURN} changes per node per cycle")
        median = statistics.median(catch_up)
        print(f"catch-up (a node reads all {NODES * USERS} standings): median {median:.1f} ms")
        times = []
        for cycle in range(1, cycles + 1):
            now += 10
            for node in nodes:
                start = (cycle * CHURN) % USERS
                node.change(list(node.uids[start : start + CHURN]), now, cycle)
            for node in nodes:
                times.append(node.share(now))
        adopted = sum(
            1
            for node in nodes
            for e in node.store.history(limit=10_000)
            if e.actor and e.actor.startswith("sync:")
        )
        print(
            f"per cycle per node: median {statistics.median(times):.1f} ms, "
            f"p90 {statistics.quantiles(times, n=10)[-1]:.1f} ms, max {max(times):.1f} ms "
            f"({len(times)} shares; {adopted} standings adopted in all); goal <= 20 ms"
        )
        for node in nodes:
            node.sharing.db.close()
            node.store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cycles", nargs="?", type=int, default=20)
    parser.add_argument("--private", action="store_true", help="start a private server")
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=5432)
    parser.add_argument("--database", default="cgpolicy")
    parser.add_argument("--user", default="cgpolicy")
    parser.add_argument("--password-file", default="")
    args = parser.parse_args()
    settings = Sync(
        args.host,
        args.database,
        args.user,
        "",
        "",
        port=args.port,
        password_file=args.password_file,
        timeout=10,
    )
    if not args.private:
        run(settings, args.cycles)
        return
    sys.path.insert(0, str(REPO / "tests" / "unit"))
    from pgserver import USER, start

    with tempfile.TemporaryDirectory() as private:
        server = start(Path(private))
        started = next(server)
        settings = Sync(
            started.socket_dir,
            "postgres",
            USER,
            "",
            "",
            port=started.port,
            password_file=str(started.password_file),
            timeout=10,
        )
        try:
            run(settings, args.cycles)
        finally:
            server.close()


if __name__ == "__main__":
    main()
