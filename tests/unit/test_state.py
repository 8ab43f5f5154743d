"""The state database: round trips, atomic records, WAL readers, crashes, queries."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest

from pam_cgpolicy.badness import Change, UserScore
from pam_cgpolicy.errors import StateError
from pam_cgpolicy.state import SCHEMA_VERSION, Event, StateStore, UserRow

ROOT = Path(__file__).resolve().parents[2]

PENALIZED = Change(
    "penalized", None, "penalty1", 0, 1, "badness 103.2 >= 100: cpu 80.1, memory 23.1"
)
IN_PENALTY1 = UserScore(tier="penalty1", tier_expiry=2800.0, occurrences=1)


@pytest.fixture
def path(tmp_path):
    return tmp_path / "state.db"


@pytest.fixture
def store(path):
    with StateStore.open(path) as opened:
        yield opened


@contextmanager
def raw(path):
    """A plain autocommit connection, closed after use."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def integrity(path):
    with raw(path) as conn:
        return conn.execute("PRAGMA integrity_check").fetchall()


def count(path, table):
    with raw(path) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


# Opening


def test_open_creates_the_schema_private_and_in_wal_mode(path, store):
    assert store.all() == {}
    assert store.history() == []
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    with raw(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_reopening_keeps_the_data(path):
    with StateStore.open(path) as store:
        store.record(1001, "alice", IN_PENALTY1, PENALIZED, now=1000.0)
    with StateStore.open(path) as store:
        assert store.get(1001) == IN_PENALTY1
        assert len(store.history()) == 1


def test_a_newer_schema_is_refused_with_a_clear_error(path):
    StateStore.open(path).close()
    with raw(path) as conn:
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(
        StateError, match=rf"schema version {SCHEMA_VERSION + 1} is newer .* upgrade cgpolicy"
    ):
        StateStore.open(path)
    with pytest.raises(StateError, match="newer"):
        StateStore.open_readonly(path)


def test_a_file_that_is_not_a_database_is_an_error(path):
    path.write_bytes(b"this is not SQLite, just some text long enough to have a header" * 10)
    with pytest.raises(StateError, match="not a database"):
        StateStore.open(path)


def test_a_missing_directory_is_an_error(tmp_path):
    with pytest.raises(StateError, match="cannot open"):
        StateStore.open(tmp_path / "nowhere" / "state.db")


# Round trips


def test_round_trip_of_every_field(store):
    states = {
        1001: UserScore(cpu_badness=12.345678901234567, memory_badness=99.99, zero_since=None),
        1002: UserScore(tier="penalty3", tier_expiry=1.7e9 + 0.125, occurrences=3),
        1003: UserScore(occurrences=2, zero_since=1_700_000_000.5),
        1004: UserScore(),
    }
    for uid, state in states.items():
        store.record(uid, f"user{uid}", state, None, now=5.0)
    assert store.all() == states
    for uid, state in states.items():
        assert store.get(uid) == state
    assert store.get(4242) is None


def test_recording_again_replaces_the_row(store):
    store.record(1001, "alice", UserScore(cpu_badness=10.0), None, now=1.0)
    store.record(1001, "alice", UserScore(cpu_badness=20.0), None, now=2.0)
    assert store.all() == {1001: UserScore(cpu_badness=20.0)}


def test_an_event_is_stored_with_its_time_and_actor(store):
    store.record(1001, "alice", IN_PENALTY1, PENALIZED, now=1000.0)
    released = UserScore(occurrences=1, zero_since=2000.0)
    change = Change("released", "penalty1", None, 1, 1, "released early by an admin")
    store.record(1001, "alice", released, change, actor="root", now=2000.0)
    assert store.history() == [
        Event(2, 2000.0, 1001, "alice", "released", "penalty1", None, 1, 1,
              "released early by an admin", "root"),
        Event(1, 1000.0, 1001, "alice", "penalized", None, "penalty1", 0, 1,
              PENALIZED.reason, None),
    ]  # fmt: skip


def test_record_without_a_change_writes_no_event(store):
    store.record(1001, "alice", UserScore(cpu_badness=3.0), None)
    assert store.history() == []
    assert store.get(1001) == UserScore(cpu_badness=3.0)


def test_a_change_must_lead_to_the_state_recorded_with_it(store):
    with pytest.raises(ValueError, match="does not lead to"):
        store.record(1001, "alice", UserScore(), PENALIZED)
    assert store.all() == {}


# One transaction


def test_a_failing_event_insert_keeps_neither_write(path, store):
    store.record(1001, "alice", UserScore(cpu_badness=50.0), None, now=1.0)
    with raw(path) as conn:
        conn.execute(
            "CREATE TRIGGER fail BEFORE INSERT ON events "
            "BEGIN SELECT RAISE(ABORT, 'simulated failure'); END"
        )
    with pytest.raises(StateError, match="simulated failure"):
        store.record(1001, "alice", IN_PENALTY1, PENALIZED, now=2.0)
    assert store.get(1001) == UserScore(cpu_badness=50.0)
    assert store.history() == []
    assert not store._conn.in_transaction


def test_an_exception_between_the_two_writes_keeps_neither(monkeypatch, path, store):
    store.record(1001, "alice", UserScore(cpu_badness=50.0), None, now=1.0)

    def crash(*args):
        raise RuntimeError("between the writes")

    monkeypatch.setattr(store, "_write_event", crash)
    with pytest.raises(RuntimeError, match="between the writes"):
        store.record(1001, "alice", IN_PENALTY1, PENALIZED, now=2.0)
    monkeypatch.undo()

    assert store.get(1001) == UserScore(cpu_badness=50.0)
    with StateStore.open(path) as other:
        assert other.get(1001) == UserScore(cpu_badness=50.0)
        assert other.history() == []
    # The store is usable again: nothing was left open.
    store.record(1001, "alice", IN_PENALTY1, PENALIZED, now=3.0)
    assert len(store.history()) == 1


def test_a_busy_database_fails_before_writing(path, store):
    with raw(path) as other:
        other.execute("BEGIN IMMEDIATE")
        store._conn.execute("PRAGMA busy_timeout=50")
        with pytest.raises(StateError, match="locked"):
            store.record(1001, "alice", IN_PENALTY1, PENALIZED)
        other.execute("ROLLBACK")
    assert store.all() == {}
    assert count(path, "events") == 0


# Other connections (WAL)


def test_a_second_connection_sees_committed_data(path, store):
    reader = StateStore.open_readonly(path)
    assert reader is not None
    with reader:
        assert reader.get(1001) is None
        store.record(1001, "alice", IN_PENALTY1, PENALIZED, now=1000.0)
        assert reader.get(1001) == IN_PENALTY1
        assert [e.reason for e in reader.history()] == [PENALIZED.reason]


def test_readers_see_the_last_commit_while_a_write_is_under_way(monkeypatch, path, store):
    store.record(1001, "alice", UserScore(cpu_badness=50.0), None, now=1.0)
    reader = StateStore.open_readonly(path, timeout=0.05)
    assert reader is not None
    seen = []
    write_event = store._write_event

    def look_then_write(*args):
        # The user row is written but not committed: a reader neither waits nor sees it.
        seen.append((reader.get(1001), reader.history()))
        write_event(*args)

    monkeypatch.setattr(store, "_write_event", look_then_write)
    with reader:
        store.record(1001, "alice", IN_PENALTY1, PENALIZED, now=2.0)
        assert seen == [(UserScore(cpu_badness=50.0), [])]
        assert reader.get(1001) == IN_PENALTY1


def test_readonly_open_of_a_missing_file_is_none(tmp_path):
    assert StateStore.open_readonly(tmp_path / "missing.db") is None
    assert StateStore.open_readonly(tmp_path / "no" / "dir" / "state.db") is None
    assert not (tmp_path / "missing.db").exists()


def test_readonly_open_of_an_empty_file_is_none(path):
    path.touch()
    assert StateStore.open_readonly(path) is None


def test_readonly_open_after_the_writer_closed(path):
    with StateStore.open(path) as store:
        store.record(1001, "alice", IN_PENALTY1, PENALIZED, now=1.0)
    reader = StateStore.open_readonly(path)
    assert reader is not None
    with reader:
        assert reader.get(1001) == IN_PENALTY1


@pytest.mark.parametrize("name", ["odd?name#1%20.db", "plain.db"])
def test_readonly_open_of_any_file_name(tmp_path, monkeypatch, name):
    with StateStore.open(tmp_path / name) as store:
        store.record(1001, "alice", IN_PENALTY1, PENALIZED, now=1.0)
    monkeypatch.chdir(tmp_path)
    for path in (name, "/" + str(tmp_path / name)):  # relative, and starting with //
        reader = StateStore.open_readonly(path)
        assert reader is not None
        with reader:
            assert reader.get(1001) == IN_PENALTY1
    assert all(p.name.startswith(name) for p in tmp_path.iterdir())  # no stray file


def test_readonly_store_cannot_write(path, store):
    reader = StateStore.open_readonly(path)
    assert reader is not None
    with reader, pytest.raises(StateError, match="readonly"):
        reader.record(1001, "alice", UserScore(), None)


# Queries


def test_history_is_newest_first_filtered_and_limited(store):
    for n in range(10):
        uid = 1001 + n % 2
        state = UserScore(occurrences=n + 1, tier=f"t{n}", tier_expiry=float(n))
        change = Change("penalized", None, f"t{n}", n, n + 1, f"event {n}")
        # Times run backwards: order is by when it was recorded, not by the clock.
        store.record(uid, f"user{uid}", state, change, now=1000.0 - n)
    assert [e.reason for e in store.history()] == [f"event {n}" for n in range(9, -1, -1)]
    assert [e.reason for e in store.history(uid=1001)] == [f"event {n}" for n in (8, 6, 4, 2, 0)]
    assert [e.reason for e in store.history(uid=1002, limit=2)] == ["event 9", "event 7"]
    assert [e.reason for e in store.history(limit=3)] == ["event 9", "event 8", "event 7"]
    assert store.history(uid=4242) == []
    assert {e.user for e in store.history(uid=1002)} == {"user1002"}


def test_in_penalty_and_expired(store):
    soon = UserScore(tier="penalty1", tier_expiry=100.0, occurrences=1)
    later = UserScore(tier="penalty2", tier_expiry=200.0, occurrences=2)
    free = UserScore(occurrences=1, zero_since=50.0)
    store.record(1003, "carol", later, None, now=10.0)
    store.record(1001, "alice", soon, None, now=11.0)
    store.record(1002, "bob", free, None, now=12.0)

    assert store.in_penalty(50.0) == [
        UserRow(1001, "alice", soon, 11.0),
        UserRow(1003, "carol", later, 10.0),
    ]
    assert store.expired(50.0) == []
    assert store.in_penalty(150.0) == [UserRow(1003, "carol", later, 10.0)]
    assert store.expired(150.0) == [UserRow(1001, "alice", soon, 11.0)]
    # At its expiry a tier is over, as evaluate() has it.
    assert store.in_penalty(200.0) == []
    assert [row.uid for row in store.expired(200.0)] == [1001, 1003]


# Crashes

_WRITER = textwrap.dedent(
    """
    import sys
    from pam_cgpolicy.badness import Change, UserScore
    from pam_cgpolicy.state import StateStore

    store = StateStore.open(sys.argv[1])
    start = int(sys.argv[2])
    for n in range(start, start + 10_000_000):
        uid = 1000 + n % 7
        state = UserScore(occurrences=n % 3 + 1, zero_since=float(n))
        change = Change("forgiven", None, None, n % 3 + 2, n % 3 + 1, f"commit {n}")
        store.record(uid, f"user{uid}", state, change, now=float(n))
        print(n, flush=True)
    """
)


def _kill_writer_after(path, start, reports):
    """Run the writer, SIGKILL it after ``reports`` commits; every commit it reported."""
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), str(start)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    done = []
    try:
        assert child.stdout is not None
        while len(done) < reports:
            line = child.stdout.readline()
            assert line, f"the writer stopped early with {child.wait()}"
            done.append(int(line))
        os.kill(child.pid, signal.SIGKILL)
        # Lines already in the pipe were reported too.
        done.extend(int(line) for line in child.stdout)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    return done


def test_every_reported_commit_survives_sigkill(path):
    reported = []
    for round_, reports in enumerate((150, 333, 71)):
        reported += _kill_writer_after(path, start=round_ * 1_000_000, reports=reports)
        assert integrity(path) == [("ok",)]
        with StateStore.open(path) as store:
            logged = {int(e.reason.split()[1]) for e in store.history(limit=10**9)}
            assert set(reported) <= logged
            # Each user's row is at least as new as the last commit reported for it.
            users = store.all()
            for n in reported:
                assert users[1000 + n % 7].zero_since >= n
            # Nothing half written: every user row has the event of the same commit.
            for uid, state in users.items():
                assert state.zero_since in logged
                assert (1000 + int(state.zero_since) % 7) == uid


def test_a_crash_between_the_two_writes_keeps_neither(path):
    with StateStore.open(path) as store:
        store.record(1001, "alice", UserScore(cpu_badness=50.0), None, now=1.0)
    script = textwrap.dedent(
        """
        import os, signal, sys
        from pam_cgpolicy.badness import Change, UserScore
        from pam_cgpolicy.state import StateStore

        store = StateStore.open(sys.argv[1])
        store._write_event = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
        state = UserScore(tier="penalty1", tier_expiry=9.0, occurrences=1)
        store.record(1001, "alice", state, Change("penalized", None, "penalty1", 0, 1, "x"))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert done.returncode == -signal.SIGKILL
    assert integrity(path) == [("ok",)]
    with StateStore.open(path) as store:
        assert store.get(1001) == UserScore(cpu_badness=50.0)
        assert store.history() == []
