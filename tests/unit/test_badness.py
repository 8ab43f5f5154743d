"""The badness model against worked examples computed by hand, and the penalty tiers."""

import math
import random

import pytest

from pam_cgpolicy.badness import (
    BadnessParams,
    Change,
    PenaltyParams,
    Tier,
    UserScore,
    evaluate,
    is_violation,
    step_badness,
)

GIB = 1024**3

# Steps that are exact in binary floats, so most checks can use ==:
# at the threshold x = 0.5: 0.5 * 100 / (400 * 0.5) * 10 = 2.5 a step; at x = 1: 5.0;
# at zero usage: 100 / 1000 * 10 = 1.0 down a step.
EXACT = BadnessParams(
    cpu_threshold=0.5, memory_threshold=0.5, time_to_max_bad=400, time_to_min_bad=1000
)
R = 10.0

TIERS = PenaltyParams(
    tiers=(
        Tier("penalty1", timeout=1800, cpu_factor=0.8, memory_factor=0.8, message="first"),
        Tier("penalty2", timeout=3600, cpu_factor=0.5, memory_factor=0.5),
        Tier("penalty3", timeout=7200, cpu_factor=0.3, memory_factor=0.3),
    ),
    occurrence_timeout=10800,
)

CORES = 4.0  # CPU quota
MEM = 8.0 * GIB  # memory quota


def steps(badness, usage, quota, threshold, params, interval, count):
    for _ in range(count):
        badness = step_badness(badness, usage, quota, threshold, params, interval)
    return badness


def steps_to_100(usage, quota, threshold, params, interval, limit=100_000):
    badness, count = 0.0, 0
    while badness < 100:
        badness = step_badness(badness, usage, quota, threshold, params, interval)
        count += 1
        assert count < limit
    return count


def run(state, now, cpu=0.0, mem=0.0, cpu_quota=CORES, mem_quota=MEM, params=EXACT):
    return evaluate(state, cpu, cpu_quota, mem, mem_quota, now, R, params, TIERS)


# One step, by hand


def test_one_step_at_the_threshold():
    # x = 2/4 = 0.5: 0.5 * 100 / (400 * 0.5) * 10
    assert step_badness(0.0, 2.0, CORES, 0.5, EXACT, R) == 2.5


def test_one_step_at_full_quota():
    # x = 1: 1 * 100 / (400 * 0.5) * 10
    assert step_badness(10.0, 4.0, CORES, 0.5, EXACT, R) == 15.0


def test_one_step_below_the_threshold_decays_by_the_unused_fraction():
    # x = 1/4: -(1 - 0.25) * 100 / 1000 * 10
    assert step_badness(50.0, 1.0, CORES, 0.5, EXACT, R) == 49.25
    # x = 0: the full 100 / 1000 * 10
    assert step_badness(50.0, 0.0, CORES, 0.5, EXACT, R) == 49.0


def test_one_step_with_arbiter2_default_settings():
    params = BadnessParams(0.45, 0.5, time_to_max_bad=600, time_to_min_bad=1800)
    # x = 0.5 >= 0.45: 0.5 * 100 / (600 * 0.45) * 30 = 50 / 9
    assert step_badness(0.0, 2.0, CORES, 0.45, params, 30) == pytest.approx(50 / 9, rel=1e-15)
    # x = 0.25 < 0.45: 10 - 0.75 * 100 / 1800 * 30 = 10 - 1.25
    assert step_badness(10.0, 1.0, CORES, 0.45, params, 30) == pytest.approx(8.75, rel=1e-15)


def test_threshold_is_inclusive():
    just_below = math.nextafter(0.5, 0.0) * CORES
    assert step_badness(10.0, 2.0, CORES, 0.5, EXACT, R) > 10.0
    assert step_badness(10.0, just_below, CORES, 0.5, EXACT, R) < 10.0


def test_memory_in_bytes_works_the_same():
    assert step_badness(0.0, 4 * GIB, MEM, 0.5, EXACT, R) == 2.5


# The times the model promises


def test_reaching_100_at_exactly_the_threshold_takes_time_to_max_bad():
    # t = 0.8, time_to_max_bad = 300 s, R = 10 s: 10/3 a step, 30 steps = 300 s.
    # Floats alone would give 99.99999999999999 after 30 steps, and a violation one
    # interval late.
    params = BadnessParams(0.8, 0.8, time_to_max_bad=300, time_to_min_bad=1800)
    usage = 0.8 * CORES
    assert steps(0.0, usage, CORES, 0.8, params, R, 29) < 100
    assert steps(0.0, usage, CORES, 0.8, params, R, 30) == 100.0
    assert steps_to_100(usage, CORES, 0.8, params, R) * R == 300


def test_reaching_100_at_full_quota_takes_threshold_times_time_to_max_bad():
    # x = 1: 100 / (300 * 0.8) * 10 = 25/6 a step, 24 steps = 240 s = 0.8 * 300.
    params = BadnessParams(0.8, 0.8, time_to_max_bad=300, time_to_min_bad=1800)
    assert steps(0.0, CORES, CORES, 0.8, params, R, 23) < 100
    assert steps(0.0, CORES, CORES, 0.8, params, R, 24) == 100.0


@pytest.mark.parametrize(
    ("threshold", "time_to_max_bad", "interval"),
    [(0.45, 600, 30), (0.5, 400, 10), (0.8, 300, 10), (0.9, 300, 10), (0.3, 900, 15), (1, 60, 5)],
)
def test_time_to_100_for_other_settings(threshold, time_to_max_bad, interval):
    params = BadnessParams(threshold, threshold, time_to_max_bad, 1800)
    at_threshold = steps_to_100(threshold * CORES, CORES, threshold, params, interval)
    at_quota = steps_to_100(CORES, CORES, threshold, params, interval)
    assert at_threshold * interval == time_to_max_bad
    assert at_quota * interval == pytest.approx(threshold * time_to_max_bad, abs=interval)


def test_decay_from_100_to_0_at_zero_usage_takes_time_to_min_bad():
    # 100 / 1800 * 10 = 5/9 a step: 180 steps = 1800 s.
    params = BadnessParams(0.8, 0.8, time_to_max_bad=300, time_to_min_bad=1800)
    assert steps(100.0, 0.0, CORES, 0.8, params, R, 179) > 0
    assert steps(100.0, 0.0, CORES, 0.8, params, R, 180) == 0.0
    assert steps(100.0, 0.0, CORES, 0.5, EXACT, R, 99) == 1.0
    assert steps(100.0, 0.0, CORES, 0.5, EXACT, R, 100) == 0.0


def test_longer_intervals_scale_the_step():
    assert step_badness(0.0, 2.0, CORES, 0.5, EXACT, 30) == 3 * step_badness(
        0.0, 2.0, CORES, 0.5, EXACT, 10
    )


# Bounds and odd input


def test_usage_above_quota_counts_as_the_quota():
    at_quota = step_badness(0.0, CORES, CORES, 0.5, EXACT, R)
    assert step_badness(0.0, 10 * CORES, CORES, 0.5, EXACT, R) == at_quota
    assert step_badness(0.0, math.inf, CORES, 0.5, EXACT, R) == at_quota


def test_badness_is_clamped_to_0_and_100():
    assert step_badness(99.0, CORES, CORES, 0.5, EXACT, R) == 100.0
    assert step_badness(100.0, CORES, CORES, 0.5, EXACT, R) == 100.0
    assert step_badness(0.5, 0.0, CORES, 0.5, EXACT, R) == 0.0
    assert step_badness(0.0, 0.0, CORES, 0.5, EXACT, R) == 0.0


def test_negative_usage_counts_as_none():
    assert step_badness(50.0, -3.0, CORES, 0.5, EXACT, R) == 49.0


def test_a_missing_sample_leaves_badness_alone():
    assert step_badness(42.0, math.nan, CORES, 0.5, EXACT, R) == 42.0


@pytest.mark.parametrize("quota", [None, 0, 0.0, -1.0, math.inf])
def test_an_unmeasured_resource_has_no_badness(quota):
    assert step_badness(0.0, 100.0, quota, 0.5, EXACT, R) == 0.0
    assert step_badness(50.0, 100.0, quota, 0.5, EXACT, R) == 0.0


def test_float_noise_at_the_bounds_snaps_to_them():
    assert step_badness(100 - 2.5 - 1e-13, 2.0, CORES, 0.5, EXACT, R) == 100.0
    assert step_badness(1.0 + 1e-13, 0.0, CORES, 0.5, EXACT, R) == 0.0
    assert is_violation(99.99999999999997)
    assert not is_violation(99.9)


def arbiter2_step(badness, usage, quota, threshold, params, interval):
    """Arbiter2's calc_delta_badness with cap_badness_incr, then its clamp."""
    max_incr_per_sec = 100.0 / (params.time_to_max_bad * threshold)
    max_incr_per_interval = max_incr_per_sec * interval
    max_decr_per_sec = 100.0 / params.time_to_min_bad
    max_decr_per_interval = max_decr_per_sec * interval
    rel_usage = min(usage, quota) / quota
    if rel_usage >= threshold:
        change = rel_usage * max_incr_per_interval
    else:
        change = (1 - rel_usage) * -max_decr_per_interval
    return min(100.0, max(0.0, badness + change))


def test_same_floats_as_arbiter2():
    rng = random.Random(20240611)
    compared = 0
    for _ in range(20_000):
        threshold = rng.choice([0.3, 0.45, 0.5, 0.8, 1.0, rng.uniform(0.05, 1)])
        params = BadnessParams(
            threshold, threshold, rng.choice([60, 300, 600, 1234.5]), rng.choice([600, 1800])
        )
        quota = rng.choice([CORES, MEM, rng.uniform(0.1, 64)])
        usage = quota * rng.choice([0, threshold, 1, 2, rng.uniform(0, 1.5)])
        badness = rng.choice([0.0, 100.0, rng.uniform(0, 100)])
        interval = rng.choice([5, 10, 30, rng.uniform(1, 60)])
        expected = arbiter2_step(badness, usage, quota, threshold, params, interval)
        ours = step_badness(badness, usage, quota, threshold, params, interval)
        if 1e-9 < expected < 100 - 1e-9:
            assert ours == expected
            compared += 1
        else:
            assert ours == round(expected)
    assert compared > 10_000


# evaluate(): scores, violations, penalties


def test_scores_move_and_nothing_changes_below_100():
    state, change = run(UserScore(), now=1000.0, cpu=2.0, mem=MEM)
    assert change is None
    assert state == UserScore(cpu_badness=2.5, memory_badness=5.0)


def test_cpu_and_memory_add_up_to_a_violation_neither_reaches_alone():
    state = UserScore(cpu_badness=57.5, memory_badness=35.0)
    new, change = run(state, now=1000.0, cpu=2.0, mem=MEM)  # +2.5 and +5.0
    assert new.tier == "penalty1"
    assert change == Change(
        kind="penalized",
        old_tier=None,
        new_tier="penalty1",
        old_occurrences=0,
        new_occurrences=1,
        reason="badness 100.0 >= 100: cpu 60.0, memory 40.0",
    )


def test_a_score_just_under_100_is_not_a_violation():
    state = UserScore(cpu_badness=57.4, memory_badness=35.0)
    new, change = run(state, now=1000.0, cpu=2.0, mem=MEM)
    assert change is None
    assert new.score == pytest.approx(99.9, abs=1e-12)


def test_violation_at_the_threshold_comes_at_exactly_time_to_max_bad():
    params = BadnessParams(0.8, 0.8, time_to_max_bad=300, time_to_min_bad=1800)
    state, now, change = UserScore(), 0.0, None
    while change is None:
        now += R
        state, change = run(state, now, cpu=0.8 * CORES, params=params)
    assert now == 300.0
    assert change.reason == "badness 100.0 >= 100: cpu 100.0, memory 0.0"


def test_penalty_resets_badness_and_sets_an_absolute_expiry():
    state = UserScore(cpu_badness=99.0, memory_badness=0.0, zero_since=None)
    new, _ = run(state, now=5000.0, cpu=CORES)
    assert new == UserScore(
        cpu_badness=0.0,
        memory_badness=0.0,
        tier="penalty1",
        tier_expiry=5000.0 + 1800,
        occurrences=1,
        zero_since=None,
    )
    assert new.in_penalty


def violate(state, now):
    """Run at full CPU until a violation; the time it happened and the result."""
    change = None
    while change is None:
        now += R
        state, change = run(state, now, cpu=CORES)
    assert change.kind == "penalized"
    return now, state, change


def serve(state, now):
    """Sit out the penalty at zero usage, up to and including the release."""
    assert state.tier_expiry is not None
    now = state.tier_expiry
    state, change = run(state, now)
    assert change is not None
    assert change.kind == "released"
    return now, state


def test_escalation_through_the_tiers_stops_at_the_last():
    state, now = UserScore(), 0.0
    seen = []
    for _ in range(5):
        now, state, change = violate(state, now)
        seen.append((state.tier, state.occurrences, change.old_occurrences))
        now, state = serve(state, now)
    assert seen == [
        ("penalty1", 1, 0),
        ("penalty2", 2, 1),
        ("penalty3", 3, 2),
        ("penalty3", 3, 3),
        ("penalty3", 3, 3),
    ]


def test_occurrences_beyond_the_tiers_are_capped_at_the_last_tier():
    # The policy lost a tier since the count was made.
    state = UserScore(cpu_badness=99.0, occurrences=7)
    new, change = run(state, now=100.0, cpu=CORES)
    assert (new.tier, new.occurrences) == ("penalty3", 3)
    assert change is not None
    assert (change.old_occurrences, change.new_occurrences) == (7, 3)


def test_no_badness_accrues_during_a_penalty():
    state = UserScore(tier="penalty2", tier_expiry=10_000.0, occurrences=2)
    for now in (100.0, 5000.0, 9999.999):
        new, change = run(state, now, cpu=100 * CORES, mem=100 * MEM)
        assert change is None
        assert new is state


def test_release_at_expiry_resets_badness_and_keeps_occurrences():
    state = UserScore(tier="penalty2", tier_expiry=10_000.0, occurrences=2)
    new, change = run(state, now=10_000.0, cpu=CORES, mem=MEM)
    assert new == UserScore(occurrences=2, zero_since=10_000.0)
    assert change == Change("released", "penalty2", None, 2, 2, "penalty2 expired")


def test_release_when_the_daemon_was_down_past_expiry():
    state = UserScore(tier="penalty1", tier_expiry=10_000.0, occurrences=1)
    new, change = run(state, now=50_000.0)
    assert new.tier is None
    assert change is not None
    assert change.kind == "released"


def test_the_interval_of_the_release_adds_no_badness():
    state = UserScore(tier="penalty1", tier_expiry=100.0, occurrences=1)
    released, _ = run(state, now=100.0, cpu=CORES)
    assert released.score == 0
    after, _ = run(released, now=110.0, cpu=CORES)
    assert after.cpu_badness == 5.0


# Forgiveness


def test_forgiveness_after_occurrence_timeout_of_zero_badness_and_the_timer_restarts():
    timeout = TIERS.occurrence_timeout
    state = UserScore(tier="penalty2", tier_expiry=1000.0, occurrences=2)
    state, _ = run(state, now=1000.0)  # release: the timer starts here
    assert state.zero_since == 1000.0

    now, change = 1000.0, None
    while now + R < 1000.0 + timeout:
        now += R
        state, change = run(state, now)
        assert change is None
    assert state.occurrences == 2

    state, change = run(state, now=1000.0 + timeout)
    assert change == Change(
        "forgiven",
        None,
        None,
        2,
        1,
        "badness 0 for 10800 s >= occurrence_timeout 10800 s",
    )
    assert state == UserScore(occurrences=1, zero_since=1000.0 + timeout)

    state, change = run(state, now=1000.0 + 2 * timeout - R)
    assert change is None
    state, change = run(state, now=1000.0 + 2 * timeout)
    assert change is not None
    assert state.occurrences == 0

    state, change = run(state, now=1000.0 + 5 * timeout)
    assert change is None
    assert state.occurrences == 0


def test_any_badness_restarts_the_forgiveness_timer():
    timeout = TIERS.occurrence_timeout
    state = UserScore(occurrences=1, zero_since=0.0)
    state, _ = run(state, now=timeout - 100, cpu=2.0)  # above the threshold once
    assert state.zero_since is None
    assert state.cpu_badness == 2.5

    for now in (timeout - 90, timeout - 80):  # zero usage: 1.0 down a step
        state, _ = run(state, now)
        assert state.zero_since is None
    state, _ = run(state, now=timeout - 70)
    assert state.score == 0
    assert state.zero_since == timeout - 70

    state, change = run(state, now=timeout)
    assert change is None
    state, change = run(state, now=2 * timeout - 80)
    assert change is None
    state, change = run(state, now=2 * timeout - 70)
    assert change is not None
    assert change.kind == "forgiven"


def test_the_timer_starts_when_badness_first_reads_0():
    state = UserScore(cpu_badness=1.0, occurrences=1)
    state, _ = run(state, now=500.0)
    assert state == UserScore(occurrences=1, zero_since=500.0)
    state, _ = run(state, now=510.0)
    assert state.zero_since == 500.0


def test_no_forgiveness_during_a_penalty():
    state = UserScore(tier="penalty1", tier_expiry=1e9, occurrences=1, zero_since=None)
    new, change = run(state, now=1e8)
    assert change is None
    assert new.occurrences == 1


def test_nothing_to_forgive_at_zero_occurrences():
    state = UserScore(zero_since=0.0)
    new, change = run(state, now=10 * TIERS.occurrence_timeout)
    assert change is None
    assert new == state


# Unmeasured resources in evaluate


def test_unmeasured_cpu_is_ignored_memory_still_counts():
    state = UserScore(cpu_badness=40.0, memory_badness=10.0)
    new, change = run(state, now=10.0, cpu=1000.0, cpu_quota=None, mem=MEM)
    assert change is None
    assert (new.cpu_badness, new.memory_badness) == (0.0, 15.0)


def test_nothing_measured_never_violates():
    state = UserScore()
    for now in range(10, 10_000, 10):
        state, change = run(state, float(now), cpu=1e9, mem=1e18, cpu_quota=0, mem_quota=None)
        assert change is None
    assert state.score == 0


# Parameters


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cpu_threshold": 0},
        {"cpu_threshold": 1.01},
        {"memory_threshold": -0.5},
        {"memory_threshold": math.nan},
        {"time_to_max_bad": 0},
        {"time_to_min_bad": -1},
        {"time_to_min_bad": math.inf},
    ],
)
def test_badness_params_refuse_nonsense(kwargs):
    good = {
        "cpu_threshold": 0.5,
        "memory_threshold": 0.5,
        "time_to_max_bad": 300,
        "time_to_min_bad": 600,
    }
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        BadnessParams(**{**good, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": ""}, "name"),
        ({"timeout": 0}, "timeout"),
        ({"cpu_factor": 0}, "cpu_factor"),
        ({"memory_factor": 1.5}, "memory_factor"),
    ],
)
def test_tiers_refuse_nonsense(kwargs, match):
    good = {"name": "p", "timeout": 60, "cpu_factor": 0.5, "memory_factor": 0.5}
    with pytest.raises(ValueError, match=match):
        Tier(**{**good, **kwargs})


def test_penalty_params_refuse_nonsense():
    tier = TIERS.tiers[0]
    with pytest.raises(ValueError, match="at least one"):
        PenaltyParams((), 60)
    with pytest.raises(ValueError, match="unique"):
        PenaltyParams((tier, tier), 60)
    with pytest.raises(ValueError, match="occurrence_timeout"):
        PenaltyParams((tier,), 0)


def test_penalty_params_order_and_lookup():
    assert TIERS.order == ("penalty1", "penalty2", "penalty3")
    assert TIERS.find("penalty2") is TIERS.tiers[1]
    assert TIERS.find("nope") is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cpu_badness": -1.0},
        {"memory_badness": 100.5},
        {"occurrences": -1},
        {"tier": "penalty1"},
        {"tier_expiry": 5.0},
    ],
)
def test_user_score_refuses_impossible_states(kwargs):
    with pytest.raises(ValueError):
        UserScore(**kwargs)


# Properties over many inputs, where hypothesis is installed (it is not a dependency)

try:
    from hypothesis import given
    from hypothesis import strategies as st
except ImportError:
    given = None

if given is None:

    def test_properties():
        pytest.skip("hypothesis is not installed")

else:
    fractions = st.floats(min_value=0.01, max_value=1.0)
    seconds = st.floats(min_value=1.0, max_value=100_000.0)
    badness_values = st.floats(min_value=0.0, max_value=100.0)
    usages = st.floats(min_value=0.0, max_value=1e6)
    quotas = st.floats(min_value=0.01, max_value=1e6)

    @given(badness_values, usages, quotas, fractions, seconds, seconds, seconds)
    def test_badness_stays_within_0_and_100(b, usage, quota, t, to_max, to_min, interval):
        params = BadnessParams(t, t, to_max, to_min)
        assert 0.0 <= step_badness(b, usage, quota, t, params, interval) <= 100.0

    @given(badness_values, usages, usages, quotas, fractions, seconds)
    def test_more_usage_never_means_less_badness(b, u1, u2, quota, t, interval):
        params = BadnessParams(t, t, 600, 1800)
        low, high = sorted((u1, u2))
        assert step_badness(b, low, quota, t, params, interval) <= step_badness(
            b, high, quota, t, params, interval
        )

    @given(badness_values, st.floats(min_value=0.0, max_value=1.0), quotas, fractions, seconds)
    def test_at_or_above_the_threshold_badness_never_falls(b, x, quota, t, interval):
        params = BadnessParams(t, t, 600, 1800)
        usage = max(x, t) * quota
        if min(usage, quota) / quota >= t:
            assert step_badness(b, usage, quota, t, params, interval) >= b
