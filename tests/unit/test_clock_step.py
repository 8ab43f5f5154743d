"""A step of the wall clock moves the recorded times with it: no penalty ends early or late."""

import asyncio
import time

import pytest
from fakeslices import DictAccounts, NoSlices, NoSliceUnits
from policyfiles import DAEMON_SECTIONS, MAIN, write_policy

from pam_cgpolicy import clockstep
from pam_cgpolicy import daemon as daemon_mod
from pam_cgpolicy.accounts import Account
from pam_cgpolicy.badness import UserScore
from pam_cgpolicy.clockstep import ClockWatch
from pam_cgpolicy.compiled import read_penalty
from pam_cgpolicy.policy import load_policy
from pam_cgpolicy.slicelimits import slice_limits
from pam_cgpolicy.state import StateStore

DAY = 86400.0
BOB = Account("bob", 2002, frozenset({2002}))  # students


def test_time_passing_alike_on_both_clocks_is_no_step():
    watch = ClockWatch()
    assert watch.step(1000.0, 50.0) == 0.0  # nothing to compare with yet
    watch.mark(1000.0, 50.0)
    assert watch.step(1060.0, 110.0) == 0.0
    assert watch.step(1060.5, 110.0) == 0.0  # jitter
    assert watch.step(1000.0 + 3600 * 1.0005, 50.0 + 3600) == 0.0  # an hour of slewing


@pytest.mark.parametrize("step", [DAY, -DAY, 30.0, -5.0])
def test_a_set_wall_clock_is_a_step_of_what_it_gained_beyond_boot_time(step):
    watch = ClockWatch()
    watch.mark(1000.0, 50.0)
    assert watch.step(1060.0 + step, 110.0) == pytest.approx(step)


def test_a_step_not_marked_as_followed_is_seen_again_whole():
    watch = ClockWatch()
    watch.mark(1000.0, 50.0)
    assert watch.step(1002.0 + DAY, 52.0) == pytest.approx(DAY)
    assert watch.step(1004.0 + DAY, 54.0) == pytest.approx(DAY)
    watch.mark(1004.0 + DAY, 54.0)
    assert watch.step(1006.0 + DAY, 56.0) == 0.0


def test_shift_times_moves_expiries_and_zero_starts_in_one_go(tmp_path):
    with StateStore.open(tmp_path / "state.db") as store:
        store.record(1, "a", UserScore(tier="penalty1", tier_expiry=500.0, occurrences=1), None)
        store.record(2, "b", UserScore(occurrences=1, zero_since=100.0), None)
        store.record(3, "c", UserScore(cpu_badness=5.0), None)
        assert store.shift_times(DAY) == 1
        assert store.get(1).tier_expiry == 500.0 + DAY
        assert store.get(2).zero_since == 100.0 + DAY
        assert store.get(3) == UserScore(cpu_badness=5.0)


@pytest.fixture
def daemon(tmp_path, monkeypatch):
    root = write_policy(tmp_path / "etc", main=MAIN + DAEMON_SECTIONS)
    lines: list[str] = []
    monkeypatch.setattr(daemon_mod.log, "info", lambda _kind, text, **_who: lines.append(text))
    sent: list[tuple[int, tuple]] = []
    store = StateStore.open(tmp_path / "state.db")
    made = daemon_mod.Daemon(
        load_policy(root),
        store,
        NoSliceUnits(),
        NoSlices(),
        accounts=DictAccounts({2002: BOB}),
        write=lambda uid, props: sent.append((uid, props)),
        config=str(root),
        penalties=str(tmp_path / "penalties"),
        last_good=str(tmp_path / "policy.compiled"),
        memory=8 * 1024**3,
    )
    made.lines, made.sent = lines, sent  # type: ignore[attr-defined]
    yield made
    store.close()


def test_a_day_forward_then_back_keeps_the_penalty_and_its_expiry(daemon, tmp_path):
    wall, boot = time.time(), 1000.0
    asyncio.run(daemon.penalize("bob", "penalty1", "admin"))
    expiry = daemon.store.get(2002).tier_expiry
    penalized = daemon.engine.limits(BOB, daemon.store.get(2002)).properties
    asyncio.run(daemon.follow_clock(wall, boot))
    daemon.sent.clear()

    # A day forward: without the shift the next cycle would release bob at once.
    asyncio.run(daemon.follow_clock(wall + 2 + DAY, boot + 2))
    released = daemon.engine.cycle({}, wall + 2 + DAY)
    assert released == [] and daemon.store.get(2002).tier == "penalty1"
    assert daemon.store.get(2002).tier_expiry == pytest.approx(expiry + DAY)
    copy = read_penalty(str(tmp_path / "penalties"), 2002, wall + 2 + DAY)
    hook_sends = slice_limits(daemon.engine.compiled, BOB, copy, daemon.engine.memory_total)
    assert hook_sends.properties == penalized  # a login now still gets the tier
    assert daemon.sent == [(2002, penalized)]  # set again: a login meanwhile may have lifted it
    assert any("event=clock-step step=+86400.0 penalties_shifted=1" in x for x in daemon.lines)

    # And back: the penalty ends when it would have without either step.
    asyncio.run(daemon.follow_clock(wall + 4, boot + 4))
    assert daemon.store.get(2002).tier_expiry == pytest.approx(expiry)


def test_a_step_the_store_could_not_follow_is_followed_at_the_next_cycle(daemon, monkeypatch):
    from pam_cgpolicy.state import StateError

    wall, boot = time.time(), 1000.0
    asyncio.run(daemon.penalize("bob", "penalty1", "admin"))
    expiry = daemon.store.get(2002).tier_expiry
    asyncio.run(daemon.follow_clock(wall, boot))

    def locked(step):
        raise StateError("database is locked")

    with monkeypatch.context() as patch:
        patch.setattr(daemon.store, "shift_times", locked)
        assert asyncio.run(daemon.follow_clock(wall + 2 + DAY, boot + 2)) is False
    assert asyncio.run(daemon.follow_clock(wall + 4 + DAY, boot + 4)) is True
    assert daemon.store.get(2002).tier_expiry == pytest.approx(expiry + DAY)


def test_a_step_landing_during_a_cycle_ends_no_penalty(daemon):
    """The cycle judges by the time it read first; the next cycle sees the step whole."""
    wall = time.time()
    asyncio.run(daemon.penalize("bob", "penalty1", "admin"))
    expiry = daemon.store.get(2002).tier_expiry
    asyncio.run(daemon.follow_clock(wall, clockstep.boot_clock()))
    readings = iter([wall])
    daemon.clock = lambda: next(readings, wall + DAY)  # set a day on right after the first read
    asyncio.run(daemon.cycle())
    assert daemon.store.get(2002).tier == "penalty1"
    asyncio.run(daemon.cycle())
    assert daemon.store.get(2002).tier == "penalty1"
    assert daemon.store.get(2002).tier_expiry == pytest.approx(expiry + DAY, abs=1.0)


# A step while cgpolicyd was down: seen at start, from what it recorded last.


def restarted_at(daemon, wall: float) -> None:
    daemon.clock = lambda: wall
    daemon.lines.clear()
    asyncio.run(daemon.start())


def test_a_clock_set_back_while_down_gives_no_penalty_more_than_it_had_left(daemon, tmp_path):
    wall = 1_800_000_000.0
    daemon.clock = lambda: wall
    asyncio.run(daemon.penalize("bob", "penalty1", "admin"))  # penalty1: 1800 s
    assert daemon.store.get(2002).tier_expiry == wall + 1800
    restarted_at(daemon, wall - DAY + 60)  # a day back, a minute after the last record
    now = wall - DAY + 60
    assert daemon.store.get(2002).tier == "penalty1"
    assert daemon.store.get(2002).tier_expiry == pytest.approx(now + 1800)
    assert read_penalty(str(tmp_path / "penalties"), 2002, now).tier == "penalty1"
    assert read_penalty(str(tmp_path / "penalties"), 2002, now + 1801) is None  # not a day on
    assert any("event=clock-step step=-86340.0 penalties_shifted=1" in x for x in daemon.lines)
    restarted_at(daemon, now + 10)  # the times moved: a second start sees no step
    assert daemon.store.get(2002).tier_expiry == pytest.approx(now + 1800)
    assert not any("event=clock-step" in x for x in daemon.lines)


def test_a_clock_set_forward_while_down_ends_the_penalties_it_passed(daemon):
    wall = 1_800_000_000.0
    daemon.clock = lambda: wall
    asyncio.run(daemon.penalize("bob", "penalty1", "admin"))
    restarted_at(daemon, wall + DAY)  # as if a day had passed: nothing tells it apart
    assert daemon.store.get(2002).tier is None
    assert daemon.store.history(2002, limit=1)[0].reason == "penalty expired"
    assert not any("event=clock-step" in x for x in daemon.lines)


def test_a_restart_on_a_clock_that_went_on_shifts_nothing(daemon):
    wall = 1_800_000_000.0
    daemon.clock = lambda: wall
    asyncio.run(daemon.penalize("bob", "penalty1", "admin"))
    restarted_at(daemon, wall + 600)
    assert daemon.store.get(2002).tier_expiry == wall + 1800
    assert not any("event=clock-step" in x for x in daemon.lines)
