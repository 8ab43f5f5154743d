"""The sync group's PostgreSQL database: where the login nodes meet (sync.py).

Tables, created on first use: ``cgpolicy_standings`` holds one row per sync
group and user, the group's winning standing, stamped from the sequence
``cgpolicy_changes`` at each write so that a node reads only what changed since
its last read; ``cgpolicy_nodes`` holds each node's last successful sync (for
cgpolicyctl doctor) and the instance that made it: a random id per start of
cgpolicyd, by which two running nodes of one name see each other. Writers of a
group take an advisory lock for the whole merge-write, so the sequence's order is
the order of the commits and a reader holding the lock misses none. psycopg2 is
imported only when [sync] is set.
"""

from __future__ import annotations

import secrets
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from .errors import SyncError
from .policy import Sync
from .state import Published
from .sync import Exchange, merge

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS cgpolicy_standings (
        grp TEXT NOT NULL,
        uid BIGINT NOT NULL,
        user_name TEXT NOT NULL,
        tier TEXT,
        tier_expiry DOUBLE PRECISION,
        occurrences INTEGER NOT NULL,
        since DOUBLE PRECISION NOT NULL,
        released DOUBLE PRECISION,
        origin TEXT NOT NULL,
        seq BIGINT NOT NULL,
        PRIMARY KEY (grp, uid)
    )""",
    "CREATE INDEX IF NOT EXISTS cgpolicy_standings_seq ON cgpolicy_standings (grp, seq)",
    "CREATE SEQUENCE IF NOT EXISTS cgpolicy_changes",
    """CREATE TABLE IF NOT EXISTS cgpolicy_nodes (
        grp TEXT NOT NULL,
        node TEXT NOT NULL,
        last_sync DOUBLE PRECISION NOT NULL,
        instance TEXT,
        PRIMARY KEY (grp, node)
    )""",
)
_COLUMNS = "uid, user_name, tier, tier_expiry, occurrences, since, released, origin"
_UPSERT = (
    f"INSERT INTO cgpolicy_standings (grp, {_COLUMNS}, seq) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, nextval('cgpolicy_changes')) "
    "ON CONFLICT (grp, uid) DO UPDATE SET user_name = EXCLUDED.user_name, "
    "tier = EXCLUDED.tier, tier_expiry = EXCLUDED.tier_expiry, "
    "occurrences = EXCLUDED.occurrences, since = EXCLUDED.since, "
    "released = EXCLUDED.released, origin = EXCLUDED.origin, seq = EXCLUDED.seq"
)


def _published(row: Sequence[Any]) -> Published:
    uid, user, tier, expiry, occurrences, since, released, origin = row[:8]
    return Published(uid, user, tier, expiry, occurrences, since, released, origin)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


class SyncDB(Exchange):
    """One connection to the group's database, opened when first needed and again after
    a failure. Used from one thread at a time."""

    def __init__(self, settings: Sync) -> None:
        self.settings = settings
        self.conn: Any = None
        self.where = f"{settings.host}:{settings.port}/{settings.database}"
        self.instance = secrets.token_hex(8)  # this start's, in cgpolicy_nodes
        self.claimed = False  # the node's row has been written with it

    def _connect(self) -> Any:
        if self.conn is not None:
            return self.conn
        s = self.settings
        try:
            import psycopg2
        except ImportError as err:
            raise SyncError(f"[sync] needs psycopg2 (python3-psycopg2): {err}") from None
        password = None
        if s.password_file:
            try:
                with open(s.password_file, encoding="utf-8") as file:
                    password = file.read().strip("\n")
            except OSError as err:
                raise SyncError(f"{s.password_file}: cannot read the password: {err}") from None
        ms = int(s.timeout * 1000)
        try:
            conn = psycopg2.connect(
                host=s.host,
                port=s.port,
                dbname=s.database,
                user=s.user,
                password=password,
                connect_timeout=max(2, round(s.timeout)),  # libpq's least
                options=f"-c statement_timeout={ms} -c lock_timeout={ms}",
                application_name=f"cgpolicyd {s.node}",
                **dict(s.tls),
            )
        except psycopg2.Error as err:
            raise SyncError(f"{self.where}: cannot connect: {_one_line(err)}") from None
        try:
            with conn.cursor() as cur:
                # one creator at a time: CREATE ... IF NOT EXISTS races with itself
                cur.execute("SELECT pg_advisory_xact_lock(hashtext('cgpolicy schema'))")
                for statement in _SCHEMA:
                    cur.execute(statement)
            conn.commit()
        except psycopg2.Error as err:
            conn.close()
            raise SyncError(f"{self.where}: cannot create the tables: {_one_line(err)}") from None
        self.conn = conn
        return conn

    def exchange(
        self, outbox: Sequence[Published], after: int, now: float, order: Sequence[str]
    ) -> tuple[list[Published], int]:
        import psycopg2

        s = self.settings
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("cgpolicy " + s.group,))
                beaten = self._publish(cur, outbox, now, order)
                cur.execute(
                    "SELECT instance FROM cgpolicy_nodes WHERE grp = %s AND node = %s",
                    (s.group, s.node),
                )
                found = cur.fetchone()
                cur.execute(
                    "INSERT INTO cgpolicy_nodes (grp, node, last_sync, instance) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT (grp, node) DO UPDATE SET "
                    "last_sync = EXCLUDED.last_sync, instance = EXCLUDED.instance",
                    (s.group, s.node, now, self.instance),
                )
                cur.execute(
                    f"SELECT {_COLUMNS}, seq FROM cgpolicy_standings "
                    "WHERE grp = %s AND seq > %s ORDER BY seq",
                    (s.group, after),
                )
                rows = cur.fetchall()
            conn.commit()
        except psycopg2.Error as err:
            self.close()
            raise SyncError(f"{self.where}: {_one_line(err)}") from None
        # Another instance wrote the row since this one claimed it: a second running node
        # of this name (at a restart the new instance just takes the row over).
        other = found[0] if found else None
        self.duplicate = other if self.claimed and other not in (None, self.instance) else None
        self.claimed = True
        mark = max([after] + [row[8] for row in rows])
        changed = [_published(row) for row in rows]
        seen = {p.uid for p in changed}
        return changed + [p for p in beaten if p.uid not in seen], mark

    def _publish(
        self, cur: Any, outbox: Sequence[Published], now: float, order: Sequence[str]
    ) -> list[Published]:
        """Write the outbox's winners; return the group's standings that beat an entry."""
        if not outbox:
            return []
        s = self.settings
        entries: dict[int, list[Published]] = defaultdict(list)
        for entry in outbox:
            entries[entry.uid].append(entry)
        cur.execute(
            f"SELECT {_COLUMNS} FROM cgpolicy_standings WHERE grp = %s AND uid = ANY(%s)",
            (s.group, list(entries)),
        )
        current = {row[0]: _published(row) for row in cur.fetchall()}
        writes, beaten = [], []
        for uid, mine in entries.items():
            winner = merge(current.get(uid), mine, now, order)
            if winner is None:
                beaten.append(current[uid])
                continue
            w = winner
            writes.append(
                (
                    s.group,
                    uid,
                    w.user,
                    w.tier,
                    w.tier_expiry,
                    w.occurrences,
                    w.since,
                    w.released,
                    s.node,
                )
            )
        if writes:
            cur.executemany(_UPSERT, writes)
        return beaten

    def nodes(self) -> dict[str, float]:
        """Each node of the group and its last successful sync (Unix time)."""
        import psycopg2

        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT node, last_sync FROM cgpolicy_nodes WHERE grp = %s",
                    (self.settings.group,),
                )
                rows = cur.fetchall()
            conn.commit()
        except psycopg2.Error as err:
            self.close()
            raise SyncError(f"{self.where}: {_one_line(err)}") from None
        return {node: last for node, last in rows}

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            finally:
                self.conn = None
