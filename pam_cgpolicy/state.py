"""The daemon's memory in SQLite: each user's badness and penalty, and a log of every change.

A crash at any moment loses nothing reported as done: the database runs in WAL mode
with synchronous=FULL, and record() writes a user's row and the event that explains it
in one transaction. The daemon records a penalty before it applies it, so at start-up
in_penalty() and expired() say what systemd should have. The login hook reads through
StateStore.open_readonly(), which never creates or changes anything.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from .badness import Change, UserScore
from .errors import StateError
from .sqlitefile import SQLiteFile, readonly_uri

SCHEMA_VERSION = 4  # 2: events.watched; 3: the mail queue; 4: the sync outbox

_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE users (
        uid INTEGER PRIMARY KEY,
        user TEXT NOT NULL,
        tier TEXT,
        tier_expiry REAL,
        occurrences INTEGER NOT NULL CHECK (occurrences >= 0),
        cpu_badness REAL NOT NULL CHECK (cpu_badness BETWEEN 0 AND 100),
        memory_badness REAL NOT NULL CHECK (memory_badness BETWEEN 0 AND 100),
        zero_since REAL,
        updated REAL NOT NULL,
        CHECK ((tier IS NULL) = (tier_expiry IS NULL))
    )""",
    """CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        time REAL NOT NULL,
        uid INTEGER NOT NULL,
        user TEXT NOT NULL,
        kind TEXT NOT NULL,
        old_tier TEXT,
        new_tier TEXT,
        old_occurrences INTEGER NOT NULL,
        new_occurrences INTEGER NOT NULL,
        reason TEXT NOT NULL,
        actor TEXT,
        watched INTEGER NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX events_by_uid ON events (uid, id)",
)
_MAIL_TABLE = (
    # Mail waiting to be sent: a row leaves only when the server took it.
    """CREATE TABLE mail (
        id INTEGER PRIMARY KEY,
        queued REAL NOT NULL,
        uid INTEGER NOT NULL,
        message BLOB NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
        next_try REAL NOT NULL,
        last_error TEXT
    )""",
    "CREATE INDEX mail_by_next_try ON mail (next_try, id)",
)
_OUTBOX_TABLE = (
    # This node's own tier changes not yet published to its sync group (sync.py); written
    # in the transaction of the change, so a crash cannot lose one.
    """CREATE TABLE outbox (
        id INTEGER PRIMARY KEY,
        uid INTEGER NOT NULL,
        user TEXT NOT NULL,
        tier TEXT,
        tier_expiry REAL,
        occurrences INTEGER NOT NULL,
        since REAL NOT NULL,
        released REAL
    )""",
)
_SCHEMA += _MAIL_TABLE + _OUTBOX_TABLE
# What brings a file of version N to N + 1 (opened for writing; a new file gets _SCHEMA).
_UPGRADES: dict[int, tuple[str, ...]] = {
    1: ("ALTER TABLE events ADD COLUMN watched INTEGER NOT NULL DEFAULT 0",),
    2: _MAIL_TABLE,
    3: _OUTBOX_TABLE,
}


_USER_COLUMNS = (
    "uid, user, tier, tier_expiry, occurrences, cpu_badness, memory_badness, zero_since, updated"
)
_EVENT_COLUMNS = (
    "id, time, uid, user, kind, old_tier, new_tier, old_occurrences, new_occurrences, reason, "
    "actor, watched"
)
# What a column added by a later version reads as in an older file.
_ADDED_COLUMNS = {"watched": "0"}
_MAIL_COLUMNS = "id, queued, uid, message, attempts, next_try, last_error"
_OUTBOX_COLUMNS = "id, uid, user, tier, tier_expiry, occurrences, since, released"
_TABLES = {
    "users": _USER_COLUMNS,
    "events": _EVENT_COLUMNS,
    "mail": _MAIL_COLUMNS,
    "outbox": _OUTBOX_COLUMNS,
}
_OUTBOX_INSERT = (
    "INSERT INTO outbox (uid, user, tier, tier_expiry, occurrences, since, released) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
SYNC_ACTOR = "sync:"  # the actor of a standing adopted from another node: never published


@dataclass(frozen=True)
class UserRow:
    """A user's stored standing, with the name and time it was recorded under."""

    uid: int
    user: str
    state: UserScore
    updated: float


@dataclass(frozen=True)
class Event:
    """One logged change of a user's tier or occurrences; actor None is the daemon."""

    id: int
    time: float
    uid: int
    user: str
    kind: str
    old_tier: str | None
    new_tier: str | None
    old_occurrences: int
    new_occurrences: int
    reason: str
    actor: str | None
    watched: bool = False  # a watch-mode penalty or release: no limit was changed


def _readable(conn: sqlite3.Connection, table: str, columns: str) -> str:
    """``columns`` as a SELECT list for ``table`` in ``conn``'s file, which may be older:
    a column it lacks reads as its default."""
    present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
    return ", ".join(
        name
        if name in present or name not in _ADDED_COLUMNS
        else f"{_ADDED_COLUMNS[name]} AS {name}"
        for name in (c.strip() for c in columns.split(","))
    )


@dataclass(frozen=True)
class Published:
    """A standing as the nodes of a sync group share it (sync.py).

    ``since``: when this node recorded it. ``released``: an admin's release at that
    time, which ends every penalty of the user begun before it, on every node.
    """

    uid: int
    user: str
    tier: str | None
    tier_expiry: float | None
    occurrences: int
    since: float
    released: float | None = None
    origin: str = ""  # the node it came from; "" for this node's own


@dataclass(frozen=True)
class QueuedMail:
    """One mail in the queue: the whole message as bytes, and how its sending went."""

    id: int
    queued: float
    uid: int
    message: bytes
    attempts: int
    next_try: float
    last_error: str | None


def _score(row: sqlite3.Row) -> UserScore:
    return UserScore(
        cpu_badness=row["cpu_badness"],
        memory_badness=row["memory_badness"],
        tier=row["tier"],
        tier_expiry=row["tier_expiry"],
        occurrences=row["occurrences"],
        zero_since=row["zero_since"],
    )


def _user_row(row: sqlite3.Row) -> UserRow:
    return UserRow(row["uid"], row["user"], _score(row), row["updated"])


class StateStore(SQLiteFile):
    """One connection to the state database. Not for sharing between threads."""

    # [sync] is set: this node's tier changes go to the outbox too (cgpolicyd sets it)
    sharing = False

    @classmethod
    def open(cls, path: str | os.PathLike[str], timeout: float = 5.0) -> StateStore:
        """Open for reading and writing, creating the file (mode 0600) and schema if new."""
        path = os.fspath(path)
        try:
            # SQLite gives its -wal and -shm files the database file's mode.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)
        except (OSError, sqlite3.Error) as err:
            raise StateError(f"{path}: cannot open the state database: {err}") from err
        store = cls(conn, path)
        try:
            with store._errors("cannot open the state database"):
                conn.row_factory = sqlite3.Row
                (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
                if mode != "wal":
                    raise StateError(f"{path}: SQLite refused WAL mode here (got {mode!r})")
                # FULL: a commit is on disk before record() returns, even if power fails.
                conn.execute("PRAGMA synchronous=FULL")
                store._create_or_upgrade()
        except BaseException:
            conn.close()
            raise
        return store

    @classmethod
    def in_memory(cls) -> StateStore:
        """A store of this process alone, gone when closed: standings worked out, not kept
        (cgpolicyctl replay)."""
        try:
            conn = sqlite3.connect(":memory:", isolation_level=None)
        except sqlite3.Error as err:
            raise StateError(f"cannot create a state database in memory: {err}") from err
        store = cls(conn, ":memory:")
        with store._errors("cannot create the state database"):
            conn.row_factory = sqlite3.Row
            store._create_or_upgrade()
        return store

    def _create_or_upgrade(self) -> None:
        """The schema of a new file, or the upgrades an older one needs."""
        conn = self._conn
        with self._transaction():
            version = self._version()
            if version == 0:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                version = SCHEMA_VERSION
            if version < SCHEMA_VERSION:  # only then: opening writes nothing
                for older in range(version, SCHEMA_VERSION):
                    for statement in _UPGRADES[older]:
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @classmethod
    def open_readonly(
        cls, path: str | os.PathLike[str], timeout: float = 0.25
    ) -> StateStore | None:
        """Open for reading only; None if the file is missing or has no state yet.

        ``timeout`` bounds the wait for a lock, so a busy writer cannot hold up a login.
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            return None
        try:
            conn = sqlite3.connect(
                readonly_uri(path), uri=True, timeout=timeout, isolation_level=None
            )
        except sqlite3.Error as err:
            if not os.path.exists(path):
                return None  # removed since we looked
            raise StateError(f"{path}: cannot open the state database: {err}") from err
        store = cls(conn, path)
        try:
            with store._errors("cannot read the state database"):
                conn.row_factory = sqlite3.Row
                if store._version() == 0:
                    conn.close()
                    return None
        except BaseException:
            conn.close()
            raise
        return store

    def _version(self) -> int:
        (version,) = self._conn.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise StateError(
                f"{self.path}: schema version {version} is newer than this cgpolicy "
                f"understands ({SCHEMA_VERSION}): upgrade cgpolicy, or move the file away"
            )
        return int(version)

    def integrity(self) -> tuple[str]:
        """SQLite's quick_check verdict: ("ok",) for a sound file."""
        with self._errors("cannot check"):
            rows = self._conn.execute("PRAGMA quick_check").fetchall()
        return ("; ".join(str(row[0]) for row in rows),)

    def get(self, uid: int) -> UserScore | None:
        with self._errors("cannot read"):
            row = self._conn.execute(
                f"SELECT {_USER_COLUMNS} FROM users WHERE uid = ?", (uid,)
            ).fetchone()
        return None if row is None else _score(row)

    def all(self) -> dict[int, UserScore]:
        with self._errors("cannot read"):
            rows = self._conn.execute(f"SELECT {_USER_COLUMNS} FROM users ORDER BY uid").fetchall()
        return {row["uid"]: _score(row) for row in rows}

    def in_penalty(self, now: float) -> list[UserRow]:
        """Users whose tier is still in force at ``now``, soonest expiry first."""
        return self._users("tier IS NOT NULL AND tier_expiry > ?", now)

    def expired(self, now: float) -> list[UserRow]:
        """Users whose tier should have ended by ``now``: to release at start-up."""
        return self._users("tier IS NOT NULL AND tier_expiry <= ?", now)

    def _users(self, where: str, now: float) -> list[UserRow]:
        with self._errors("cannot read"):
            rows = self._conn.execute(
                f"SELECT {_USER_COLUMNS} FROM users WHERE {where} ORDER BY tier_expiry, uid",
                (now,),
            ).fetchall()
        return [_user_row(row) for row in rows]

    def history(
        self, uid: int | None = None, limit: int | None = 100, since: float | None = None
    ) -> list[Event]:
        """The latest events, newest (last recorded) first; only ``uid``'s if given, only
        those at or after ``since`` if given; all of them with ``limit`` None."""
        clauses: list[str] = []
        args: list[object] = []
        if uid is not None:
            clauses.append("uid = ?")
            args.append(uid)
        if since is not None:
            clauses.append("time >= ?")
            args.append(since)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        args.append(-1 if limit is None else limit)  # SQLite: a negative LIMIT is none
        with self._errors("cannot read"):
            # read-only, a file cgpolicyd has not upgraded yet lacks the newer columns
            columns = _readable(self._conn, "events", _EVENT_COLUMNS)
            rows = self._conn.execute(
                f"SELECT {columns} FROM events {where} ORDER BY id DESC LIMIT ?", args
            ).fetchall()
        return [replace(Event(*row), watched=bool(row["watched"])) for row in rows]

    def record(
        self,
        uid: int,
        user: str,
        state: UserScore,
        change: Change | None,
        actor: str | None = None,
        *,
        now: float | None = None,
    ) -> None:
        """Store a user's standing and the change that led to it, all or nothing.

        Call it before acting on a change: a crash after it leaves a penalty to
        reconcile, never one applied and forgotten. ``actor`` names an admin who
        asked; None is the daemon. ``now`` defaults to the clock.
        """
        self.record_many([(uid, user, state, change)], actor, now=now)

    def record_many(
        self,
        entries: Sequence[tuple[int, str, UserScore, Change | None]],
        actor: str | None = None,
        *,
        now: float | None = None,
        actors: Mapping[int, str] | None = None,
    ) -> None:
        """``record`` for many users in one transaction: a whole evaluation cycle.

        ``actors``: the actor of some users' changes, where it is not ``actor``.
        """
        for _uid, _user, state, change in entries:
            if change is not None and (
                change.new_tier != state.tier or change.new_occurrences != state.occurrences
            ):
                raise ValueError(f"{change} does not lead to {state}")
        when = time.time() if now is None else now
        uids = ", ".join(str(uid) for uid, _, _, _ in entries[:5])
        with self._errors(f"cannot record uid {uids}"), self._transaction():
            for uid, user, state, change in entries:
                self._write_user(uid, user, state, when)
                if change is not None:
                    who = (actors or {}).get(uid, actor)
                    self._write_event(uid, user, change, who, when)
                    self._write_outbox(uid, user, state, change, who, when)

    def _write_outbox(
        self,
        uid: int,
        user: str,
        state: UserScore,
        change: Change,
        actor: str | None,
        when: float,
    ) -> None:
        """Keep a tier change of this node's for its sync group. Not a standing adopted
        from another node, nor a watched one (seen, not enforced), nor a forgiveness:
        badness and its decay stay each node's own. Only an admin's release ends the
        penalties of other nodes; an expiry is just an expired standing."""
        if not self.sharing or change.watched or change.kind == "forgiven":
            return
        if (actor or "").startswith(SYNC_ACTOR):
            return
        released = when if change.kind == "released" and actor is not None else None
        self._conn.execute(
            _OUTBOX_INSERT,
            (uid, user, state.tier, state.tier_expiry, state.occurrences, when, released),
        )

    def own_standings(self, now: float) -> list[Published]:
        """The tiers in force at ``now`` that this node gave (not adopted from another),
        each dated from the change that gave it: what a node starting to share publishes."""
        with self._errors("cannot read"):
            rows = self._conn.execute(
                "SELECT u.uid, u.user, u.tier, u.tier_expiry, u.occurrences, e.time, e.actor "
                "FROM users u JOIN events e ON e.id = (SELECT max(id) FROM events "
                "WHERE uid = u.uid AND new_tier = u.tier AND (old_tier IS NOT new_tier "
                "OR old_occurrences != new_occurrences)) "
                "WHERE u.tier IS NOT NULL AND u.tier_expiry > ? ORDER BY u.uid",
                (now,),
            ).fetchall()
        return [
            Published(*tuple(row)[:6])
            for row in rows
            if not (row["actor"] or "").startswith(SYNC_ACTOR)
        ]

    def to_outbox(self, entries: Sequence[Published]) -> None:
        """Queue standings for the sync group as they are (own_standings's)."""
        with self._errors("cannot write the sync outbox"), self._transaction():
            self._conn.executemany(
                _OUTBOX_INSERT,
                [
                    (e.uid, e.user, e.tier, e.tier_expiry, e.occurrences, e.since, e.released)
                    for e in entries
                ],
            )

    def outbox(self, limit: int = 5000) -> list[tuple[int, Published]]:
        """This node's changes not yet published, oldest first, with their ids."""
        with self._errors("cannot read the sync outbox"):
            rows = self._conn.execute(
                f"SELECT {_OUTBOX_COLUMNS} FROM outbox ORDER BY id LIMIT ?", (limit,)
            ).fetchall()
        return [(row["id"], Published(*tuple(row)[1:])) for row in rows]

    def published(self, last_id: int) -> None:
        """The outbox up to ``last_id`` reached the sync group's database."""
        with self._errors("cannot empty the sync outbox"), self._transaction():
            self._conn.execute("DELETE FROM outbox WHERE id <= ?", (last_id,))

    def record_event(
        self, uid: int, user: str, kind: str, reason: str, actor: str, *, now: float | None = None
    ) -> None:
        """Log an admin's action that leaves the user's tier and occurrences as they are
        (an eviction, a restore): the event shows them unchanged."""
        when = time.time() if now is None else now
        stored = self.get(uid)
        tier = stored.tier if stored else None
        occurrences = stored.occurrences if stored else 0
        with self._errors(f"cannot record uid {uid}"), self._transaction():
            self._insert_event(
                (when, uid, user, kind, tier, tier, occurrences, occurrences, reason, actor, 0)
            )

    def shift_times(self, step: float) -> int:
        """Move every tier expiry, zero-badness start and standing's time by ``step``
        seconds, in one transaction: the wall clock was set by that much. Returns the
        tiers moved. (The events keep the times they happened at, as the clock said.)"""
        with self._errors("cannot shift the recorded times"), self._transaction():
            moved = self._conn.execute(
                "UPDATE users SET tier_expiry = tier_expiry + ? WHERE tier_expiry IS NOT NULL",
                (step,),
            ).rowcount
            self._conn.execute(
                "UPDATE users SET zero_since = zero_since + ? WHERE zero_since IS NOT NULL",
                (step,),
            )
            self._conn.execute("UPDATE users SET updated = updated + ?", (step,))
        return int(moved)

    def last_recorded(self) -> float | None:
        """When a standing was last recorded, on the wall clock as it was followed since."""
        with self._errors("cannot read"):
            (latest,) = self._conn.execute("SELECT MAX(updated) FROM users").fetchone()
        return None if latest is None else float(latest)

    def copy_rows_from(self, path: str) -> dict[str, int]:
        """Copy into this store every row each table of the (damaged) file at ``path``
        still yields, table by table, stopping a table at its first unreadable page.

        Rows this schema refuses are skipped. Returns the rows kept per table.
        """
        kept = dict.fromkeys(_TABLES, 0)
        try:
            source = sqlite3.connect(readonly_uri(path), uri=True, isolation_level=None)
        except sqlite3.Error:
            return kept
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            for table, columns in _TABLES.items():
                marks = ", ".join("?" * len(columns.split(",")))
                insert = f"INSERT OR IGNORE INTO {table} ({columns}) VALUES ({marks})"
                try:
                    readable = _readable(source, table, columns)
                    for row in source.execute(f"SELECT {readable} FROM {table}"):
                        try:
                            self._conn.execute(insert, tuple(row))
                        except sqlite3.Error:
                            continue  # a garbled row the schema refuses
                        kept[table] += 1
                except sqlite3.Error:
                    continue  # the rest of this table is unreadable
            self._conn.execute("COMMIT")
        finally:
            if self._conn.in_transaction:
                self._conn.rollback()
            source.close()
        return kept

    def _write_user(self, uid: int, user: str, state: UserScore, when: float) -> None:
        self._conn.execute(
            f"INSERT OR REPLACE INTO users ({_USER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                uid,
                user,
                state.tier,
                state.tier_expiry,
                state.occurrences,
                state.cpu_badness,
                state.memory_badness,
                state.zero_since,
                when,
            ),
        )

    def _write_event(
        self, uid: int, user: str, change: Change, actor: str | None, when: float
    ) -> None:
        self._insert_event(
            (
                when,
                uid,
                user,
                change.kind,
                change.old_tier,
                change.new_tier,
                change.old_occurrences,
                change.new_occurrences,
                change.reason,
                actor,
                int(change.watched),
            )
        )

    def _insert_event(self, values: tuple[object, ...]) -> None:
        """One row of events, in the order of _EVENT_COLUMNS without the id."""
        self._conn.execute(
            "INSERT INTO events (time, uid, user, kind, old_tier, new_tier, old_occurrences, "
            "new_occurrences, reason, actor, watched) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            values,
        )

    # --- the mail queue ---

    def enqueue_mail(self, uid: int, message: bytes, now: float) -> int:
        """Keep ``message`` until it is sent; due at once. Returns its id."""
        with self._errors(f"cannot queue mail for uid {uid}"), self._transaction():
            cursor = self._conn.execute(
                "INSERT INTO mail (queued, uid, message, next_try) VALUES (?, ?, ?, ?)",
                (now, uid, message, now),
            )
        return int(cursor.lastrowid or 0)

    def due_mail(self, now: float, limit: int = 20) -> list[QueuedMail]:
        """Mail whose next try is due at ``now``, oldest first."""
        with self._errors("cannot read the mail queue"):
            rows = self._conn.execute(
                f"SELECT {_MAIL_COLUMNS} FROM mail WHERE next_try <= ? ORDER BY next_try, id "
                "LIMIT ?",
                (now, limit),
            ).fetchall()
        return [QueuedMail(*row) for row in rows]

    def queued_mail(self) -> list[QueuedMail]:
        """Every mail still waiting, oldest first."""
        with self._errors("cannot read the mail queue"):
            rows = self._conn.execute(f"SELECT {_MAIL_COLUMNS} FROM mail ORDER BY id").fetchall()
        return [QueuedMail(*row) for row in rows]

    def next_mail_try(self) -> float | None:
        """When the soonest queued mail is due; None with an empty queue."""
        with self._errors("cannot read the mail queue"):
            (when,) = self._conn.execute("SELECT min(next_try) FROM mail").fetchone()
        return None if when is None else float(when)

    def mail_sent(self, mail_id: int) -> None:
        with self._errors(f"cannot remove sent mail {mail_id}"), self._transaction():
            self._conn.execute("DELETE FROM mail WHERE id = ?", (mail_id,))

    def mail_failed(self, mail_id: int, next_try: float, error: str) -> None:
        """One more failed attempt, and when to try again."""
        with self._errors(f"cannot reschedule mail {mail_id}"), self._transaction():
            self._conn.execute(
                "UPDATE mail SET attempts = attempts + 1, next_try = ?, last_error = ? "
                "WHERE id = ?",
                (next_try, error, mail_id),
            )
