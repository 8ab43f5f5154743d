"""A damaged state database is moved aside, salvaged row by row, and never deleted."""

import os
import sqlite3

import pytest

from pam_cgpolicy.badness import Change, UserScore
from pam_cgpolicy.errors import StateError
from pam_cgpolicy.salvage import last_salvage, open_or_salvage
from pam_cgpolicy.state import SCHEMA_VERSION, StateStore

USERS = 400
PENALIZED = Change("penalized", None, "penalty1", 0, 1, "badness over the line")
IN_PENALTY1 = UserScore(tier="penalty1", tier_expiry=2800.0, occurrences=1)
NOW = 1_700_000_000.0


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "state.db")


def fill(path):
    with StateStore.open(path) as store:
        store.record_many(
            [(uid, f"user{uid}", IN_PENALTY1, PENALIZED) for uid in range(1000, 1000 + USERS)],
            now=NOW,
        )
    with sqlite3.connect(path) as conn:  # the last writer has gone: all in the main file
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
    return page_size, pages


def overwrite_pages(path, page_size, first, count):
    with open(path, "r+b") as file:
        file.seek(first * page_size)
        file.write(b"\xa5" * page_size * count)


def test_a_sound_database_is_opened_in_place(path):
    fill(path)
    store, salvage = open_or_salvage(path)
    with store:
        assert salvage is None
        assert len(store.all()) == USERS
    assert [n for n in os.listdir(os.path.dirname(path)) if ".corrupt-" in n] == []
    assert last_salvage(path) is None


def test_overwritten_pages_are_moved_aside_and_the_readable_rows_kept(path):
    page_size, pages = fill(path)
    overwrite_pages(path, page_size, pages // 2, 2)  # two pages in the middle
    with open(path, "rb") as file:
        damaged = file.read()
    # What made the daemon crash-loop before.
    with pytest.raises(StateError), StateStore.open(path) as store:
        store.all()
        store.history(limit=USERS * 2)

    store, salvage = open_or_salvage(path, now=NOW)
    with store:
        assert salvage is not None
        assert salvage.moved_to == path + ".corrupt-20231114T221320Z"
        kept_users, kept_events = salvage.kept["users"], salvage.kept["events"]
        assert 0 < kept_users + kept_events < 2 * USERS
        assert len(store.all()) == kept_users
        assert len(store.history(limit=USERS * 2)) == kept_events
        assert store.integrity() == ("ok",)
    with open(salvage.moved_to, "rb") as file:
        assert file.read() == damaged  # never deleted, never changed
    report = last_salvage(path)
    assert report is not None
    assert f"users={kept_users}" in report and f"events={kept_events}" in report
    assert oct(os.stat(salvage.moved_to + ".salvaged").st_mode & 0o777) == "0o600"


def test_a_file_that_is_not_a_database_is_moved_aside_and_a_fresh_one_started(path):
    with open(path, "wb") as file:
        file.write(b"this is not a database\n" * 400)
    store, salvage = open_or_salvage(path, now=NOW)
    with store:
        assert salvage is not None
        assert salvage.kept == {"users": 0, "events": 0, "mail": 0, "outbox": 0}
        assert "not a database" in salvage.problem
        store.record(1000, "user1000", IN_PENALTY1, PENALIZED)
        assert store.get(1000) == IN_PENALTY1
    with open(salvage.moved_to, "rb") as file:
        assert file.read() == b"this is not a database\n" * 400
    assert "users=0" in (last_salvage(path) or "")


def test_a_newer_schema_is_not_taken_for_damage(path):
    fill(path)
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(StateError, match="newer"):
        open_or_salvage(path)
    assert [n for n in os.listdir(os.path.dirname(path)) if ".corrupt-" in n] == []
