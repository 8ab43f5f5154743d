"""Usage history: what each user used, cycle by cycle, for ``cgpolicyctl report`` and mail.

cgpolicyd records, each cycle, every user with any usage: CPU in cores, memory,
CPU and memory badness and tier; and at each violation the user's top
processes. It lives in its own SQLite file beside the state database
(``usage.db``, root's alone, mode 0600): losing it loses no penalty, so it is
written with synchronous=NORMAL (the last cycles may be lost at a power cut,
nothing else) and a damaged file never touches state.db.

Older data is downsampled so that a week of 1,000 users stays small: samples
older than an hour become one-minute averages, older than a day ten-minute
averages (badness keeps the maximum), and everything older than the policy's
``[history] retention`` is deleted. Values are stored as integers (milli-cores,
bytes, hundredths of badness): SQLite stores small integers in one to three
bytes where a REAL takes eight.

The daemon calls ``record`` once a cycle and must go on whatever it raises
(StateError); readers open the file read-only.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import StateError
from .sqlitefile import SQLiteFile, readonly_uri
from .trust import why_unsafe_fd
from .usage import Process

SCHEMA_VERSION = 1
# (age in seconds, bucket in seconds): samples older than the age become buckets.
LEVELS = ((3600, 60), (86400, 600))
MAINTAIN_EVERY = 300.0  # seconds of sample time between two downsampling passes
TOP_PROCESSES = 5  # kept per violation

_SCHEMA = (
    # One row per user and time, keyed by time first: a cycle's rows are appended at
    # the end of the one b-tree (WITHOUT ROWID: no second index), so a cycle writes
    # a few pages, not one per user. A report reads its time range and keeps its uid.
    """CREATE TABLE samples (
        uid INTEGER NOT NULL,
        time INTEGER NOT NULL,
        span INTEGER NOT NULL,
        millicores INTEGER,
        memory INTEGER,
        cpu_badness INTEGER,
        memory_badness INTEGER,
        tier TEXT,
        PRIMARY KEY (time, uid)
    ) WITHOUT ROWID""",
    """CREATE TABLE processes (
        uid INTEGER NOT NULL,
        time INTEGER NOT NULL,
        pid INTEGER NOT NULL,
        name TEXT NOT NULL,
        executable TEXT,
        millicores INTEGER,
        memory INTEGER
    )""",
    "CREATE INDEX processes_by_uid ON processes (uid, time)",
    "CREATE TABLE maintained (time REAL NOT NULL)",
)


@dataclass(frozen=True, slots=True)
class UsagePoint:
    """One user's usage over ``span`` seconds ending at or after ``time`` (epoch seconds).

    CPU in cores and memory in bytes are None when unread; badness is 0 to 100.
    """

    uid: int
    time: float
    cores: float | None
    memory: int | None
    cpu_badness: float | None = None
    memory_badness: float | None = None
    tier: str | None = None
    span: float = 0.0


def is_average(point: UsagePoint, sampled_every: float) -> bool:
    """A downsampled point: the average of a bucket that starts at its time and lasts its
    span, longer than the interval the samples were taken at."""
    return (
        point.span > sampled_every
        and any(point.span == bucket for _, bucket in LEVELS)
        and point.time % point.span == 0
    )


_POINT_COLUMNS = "uid, time, millicores, memory, cpu_badness, memory_badness, tier, span"


def _point(row: tuple[Any, ...]) -> UsagePoint:
    return UsagePoint(
        row[0],
        float(row[1]),
        _float(row[2], 1000),
        row[3],
        _float(row[4], 100),
        _float(row[5], 100),
        row[6],
        float(row[7]),
    )


def _int(value: float | None, scale: float) -> int | None:
    return None if value is None else round(value * scale)


def _float(value: int | None, scale: float) -> float | None:
    return None if value is None else value / scale


class UsageHistory(SQLiteFile):
    """One connection to the usage history: one thread at a time."""

    def __init__(self, conn: sqlite3.Connection, path: str) -> None:
        super().__init__(conn, path)
        self._maintained: float | None = None
        self._merged: dict[int, int] = {}  # bucket -> the time merged up to, this run

    @classmethod
    def open(cls, path: str | os.PathLike[str], timeout: float = 1.0) -> UsageHistory:
        """Open for writing, creating the file (root's, 0600) and its schema if new.

        The file must be root's alone, as every state file: SQLite would follow
        whatever a link or another owner's file held.
        """
        path = os.fspath(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                why = why_unsafe_fd(fd, {0, os.geteuid()})
            finally:
                os.close(fd)
            if why:
                raise StateError(f"{path}: {why}")
            # the daemon records from a worker thread, one cycle at a time
            conn = sqlite3.connect(
                path, timeout=timeout, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as err:
            raise StateError(f"{path}: cannot open the usage history: {err}") from err
        history = cls(conn, path)
        try:
            with history._errors("cannot open the usage history"):
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                (version,) = conn.execute("PRAGMA user_version").fetchone()
                if version == 0:
                    with history._transaction():
                        for statement in _SCHEMA:
                            conn.execute(statement)
                        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                elif version != SCHEMA_VERSION:
                    raise StateError(
                        f"{path}: usage history version {version}, not {SCHEMA_VERSION}: "
                        "move the file away (only the history is lost)"
                    )
        except BaseException:
            conn.close()
            raise
        return history

    @classmethod
    def open_readonly(cls, path: str | os.PathLike[str]) -> UsageHistory | None:
        """Open for reading only; None when there is no history yet."""
        path = os.fspath(path)
        if not os.path.exists(path):
            return None
        try:
            conn = sqlite3.connect(readonly_uri(path), uri=True, timeout=1.0, isolation_level=None)
            (version,) = conn.execute("PRAGMA user_version").fetchone()
        except sqlite3.Error as err:
            raise StateError(f"{path}: cannot read the usage history: {err}") from err
        if version != SCHEMA_VERSION:
            conn.close()
            return None
        return cls(conn, path)

    def record(
        self,
        now: float,
        points: Iterable[UsagePoint],
        violations: Mapping[int, Iterable[Process]] | None = None,
        retention: float = 7 * 86400,
    ) -> None:
        """One cycle's points and the top processes of its violations, in one transaction;
        then, every MAINTAIN_EVERY seconds, downsampling and retention."""
        rows = [
            (
                p.uid,
                int(p.time),
                max(1, round(p.span)),
                _int(p.cores, 1000),
                p.memory,
                _int(p.cpu_badness, 100),
                _int(p.memory_badness, 100),
                p.tier,
            )
            for p in points
        ]
        procs = [
            (uid, int(now), p.pid, p.name, p.executable, _int(p.cores, 1000), p.memory)
            for uid, found in (violations or {}).items()
            for p in found
        ]
        with self._errors("cannot record"), self._transaction():
            self._conn.executemany(
                "INSERT OR REPLACE INTO samples VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows
            )
            if procs:
                self._conn.executemany("INSERT INTO processes VALUES (?, ?, ?, ?, ?, ?, ?)", procs)
        if self._maintained is None:
            with self._errors("cannot read"):
                row = self._conn.execute("SELECT max(time) FROM maintained").fetchone()
            self._maintained = row[0] if row[0] is not None else now
        if now < self._maintained:  # the clock was set back: look at everything again
            self._merged = {}
        if now - self._maintained >= MAINTAIN_EVERY or now < self._maintained:
            self.maintain(now, retention)

    def maintain(self, now: float, retention: float) -> None:
        """Downsample what is older than each level's age; delete what is past retention."""
        merged = dict(self._merged)
        with self._errors("cannot downsample"), self._transaction():
            for age, bucket in LEVELS:
                # Whole buckets only: every sample of a bucket is past the age together.
                cutoff = int(now - age) // bucket * bucket
                # What is before the last pass's cutoff was merged then: read only what
                # came past the age since (the whole file at the first pass).
                lower = merged.get(bucket, 0)
                self._conn.execute(
                    "CREATE TEMP TABLE merged AS SELECT uid, time / ? * ? AS start, ? AS span, "
                    "CAST(round(avg(millicores)) AS INTEGER), CAST(round(avg(memory)) AS INTEGER),"
                    " max(cpu_badness), max(memory_badness), max(tier) FROM samples "
                    "WHERE time >= ? AND time < ? AND span < ? GROUP BY uid, start",
                    (bucket, bucket, bucket, lower, cutoff, bucket),
                )
                self._conn.execute(
                    "DELETE FROM samples WHERE time >= ? AND time < ? AND span < ?",
                    (lower, cutoff, bucket),
                )
                merged[bucket] = max(lower, cutoff)
                self._conn.execute("INSERT OR REPLACE INTO samples SELECT * FROM merged")
                self._conn.execute("DROP TABLE temp.merged")
            oldest = int(now - retention)
            self._conn.execute("DELETE FROM samples WHERE time < ?", (oldest,))
            self._conn.execute("DELETE FROM processes WHERE time < ?", (oldest,))
            self._conn.execute("DELETE FROM maintained")
            self._conn.execute("INSERT INTO maintained VALUES (?)", (now,))
        self._maintained = now
        self._merged = merged

    def points(self, uid: int, since: float, until: float | None = None) -> list[UsagePoint]:
        """The user's samples from ``since`` on, oldest first."""
        end = 2**62 if until is None else int(until)
        with self._errors("cannot read"):
            rows = self._conn.execute(
                f"SELECT {_POINT_COLUMNS} FROM samples "
                "WHERE uid = ? AND time >= ? AND time <= ? ORDER BY time",
                (uid, int(since), end),
            ).fetchall()
        return [_point(row) for row in rows]

    def timeline(
        self, since: float, until: float | None = None, uid: int | None = None
    ) -> Iterator[UsagePoint]:
        """Every user's samples (only ``uid``'s if given) from ``since`` on, in time order,
        then by uid. Read as they are used: a week of a thousand users is never all in
        memory at once. Not for sharing the connection meanwhile."""
        end = 2**62 if until is None else int(until)
        where, args = "time >= ? AND time <= ?", [int(since), end]
        if uid is not None:
            where += " AND uid = ?"
            args.append(uid)
        with self._errors("cannot read"):
            cursor = self._conn.execute(
                f"SELECT {_POINT_COLUMNS} FROM samples WHERE {where} ORDER BY time, uid", args
            )
        while True:
            with self._errors("cannot read"):
                rows = cursor.fetchmany(4096)
            if not rows:
                return
            for row in rows:
                yield _point(row)

    def sampled_every(self, since: float, until: float | None = None) -> float | None:
        """The interval the samples from ``since`` on were taken at: the commonest span of
        their last hour, which is not downsampled yet. None when there are none."""
        end = 2**62 if until is None else int(until)
        with self._errors("cannot read"):
            row = self._conn.execute(
                "SELECT span FROM samples WHERE time <= ? AND time >= max(?, "
                "(SELECT max(time) FROM samples WHERE time <= ?) - ?) "
                "GROUP BY span ORDER BY count(*) DESC, span LIMIT 1",
                (end, int(since), end, LEVELS[0][0]),
            ).fetchone()
        return None if row is None else float(row[0])

    def processes(self, uid: int, since: float) -> list[tuple[float, Process]]:
        """The top processes recorded at the user's violations since ``since``, in order."""
        with self._errors("cannot read"):
            rows = self._conn.execute(
                "SELECT time, pid, name, executable, millicores, memory FROM processes "
                "WHERE uid = ? AND time >= ? ORDER BY time, millicores DESC",
                (uid, int(since)),
            ).fetchall()
        return [
            (float(row[0]), Process(row[1], row[2], row[3], _float(row[4], 1000), row[5]))
            for row in rows
        ]

    def row_count(self) -> int:
        with self._errors("cannot read"):
            (count,) = self._conn.execute("SELECT count(*) FROM samples").fetchone()
        return int(count)
