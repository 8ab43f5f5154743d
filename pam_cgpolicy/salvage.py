"""Start on a damaged state database instead of crash-looping on it.

The damaged file is never deleted: it is moved aside under a timestamped name, and
whatever rows SQLite can still read from it are copied into a fresh database.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass

from . import log
from .errors import StateError
from .state import StateStore

SIDE_FILES = ("", "-wal", "-shm")
DAMAGED = ("SQLITE_CORRUPT", "SQLITE_NOTADB")
MOVED_MARK = ".corrupt-"
REPORT_SUFFIX = ".salvaged"


@dataclass(frozen=True)
class Salvage:
    """What was done with a damaged state database: where it went and what was kept."""

    problem: str
    moved_to: str
    kept: dict[str, int]

    def summary(self) -> str:
        return log.fields(moved_to=self.moved_to, **self.kept, problem=self.problem)


def _problem(path: str) -> str | None:
    """Why the database at ``path`` cannot be trusted, or None if it can."""
    try:
        with StateStore.open(path) as store:
            (verdict,) = store.integrity()
    except StateError as err:
        # Only a damaged file is moved aside: a lock, a permission or a newer schema is not.
        cause = err.__cause__
        if getattr(cause, "sqlite_errorname", None) in DAMAGED:
            return str(err)
        raise
    return None if verdict == "ok" else f"{path}: integrity check: {verdict}"


def open_or_salvage(path: str, now: float | None = None) -> tuple[StateStore, Salvage | None]:
    """Open the state database; if damaged, move it aside, salvage its rows, and open anew."""
    problem = _problem(path)
    if problem is None:
        return StateStore.open(path), None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    moved_to = f"{path}{MOVED_MARK}{stamp}"
    for suffix in SIDE_FILES:
        if os.path.lexists(path + suffix):
            os.replace(path + suffix, moved_to + suffix)
    store = StateStore.open(path)
    try:
        kept = store.copy_rows_from(moved_to)
    except sqlite3.Error:
        kept = {}
    salvage = Salvage(problem, moved_to, kept)
    # Kept beside the moved copy, root-only like it, for cgpolicyctl doctor to show.
    fd = os.open(
        moved_to + REPORT_SUFFIX, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
    )
    with os.fdopen(fd, "w") as report:
        report.write(salvage.summary() + "\n")
    return store, salvage


def last_salvage(path: str) -> str | None:
    """The report of the latest salvage of the database at ``path``, if any."""
    folder, name = os.path.split(path)
    try:
        reports = sorted(
            entry
            for entry in os.listdir(folder or ".")
            if entry.startswith(name + MOVED_MARK) and entry.endswith(REPORT_SUFFIX)
        )
    except OSError:
        return None
    if not reports:
        return None
    try:
        with open(os.path.join(folder, reports[-1])) as report:
            return report.read().strip()
    except OSError as err:
        return f"{reports[-1]}: {err.strerror}"
