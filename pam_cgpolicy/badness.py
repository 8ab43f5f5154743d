"""Badness: a score of sustained heavy use, and the penalty tiers it moves a user through.

The model is Arbiter2's (CHPC, University of Utah), computed in the same order so that
the same usage gives the same scores. Every interval of R seconds, for CPU and for
memory separately, with usage u, quota q and threshold t:

    x = min(u, q) / q
    x >= t:  badness += x * 100 / (time_to_max_bad * t) * R
    x <  t:  badness -= (1 - x) * 100 / time_to_min_bad * R

Each resource's badness stays within [0, 100]; their sum reaching 100 is a violation.
A violation puts a user in the next penalty tier; the tier ends at its expiry; a
long stretch of zero badness forgives one occurrence. Pure functions only: the caller
passes the time in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

MAX_BADNESS = 100.0

# A sum of n equal float steps can miss its exact total by a few ulps (30 steps of
# 10/3 give 99.99999999999999): without this, a user exactly at the threshold would
# be penalized one interval after time_to_max_bad instead of at it.
_EPSILON = 1e-9

ChangeKind = Literal["penalized", "released", "forgiven"]

# [penalty] mode: "enforce" lowers the limits; "watch" judges and records the same
# tiers but changes no limit (a policy on trial).
ENFORCE, WATCH = "enforce", "watch"
PENALTY_MODES = (ENFORCE, WATCH)


@dataclass(frozen=True)
class BadnessParams:
    """The badness model's settings; thresholds are fractions of the quota."""

    cpu_threshold: float
    memory_threshold: float
    time_to_max_bad: float  # seconds to reach 100 at exactly the threshold
    time_to_min_bad: float  # seconds to fall from 100 to 0 at zero usage

    def __post_init__(self) -> None:
        for name in ("cpu_threshold", "memory_threshold"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be more than 0 and at most 1, not {value!r}")
        for name in ("time_to_max_bad", "time_to_min_bad"):
            value = getattr(self, name)
            if not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")


@dataclass(frozen=True)
class Tier:
    """One penalty: the fractions of the group's limits a user keeps, and for how long."""

    name: str
    timeout: float  # seconds
    cpu_factor: float
    memory_factor: float
    message: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a tier needs a name")
        if not 0 < self.timeout < math.inf:
            raise ValueError(f"tier {self.name}: timeout must be positive, not {self.timeout!r}")
        for name in ("cpu_factor", "memory_factor"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(
                    f"tier {self.name}: {name} must be more than 0 and at most 1, not {value!r}"
                )


@dataclass(frozen=True)
class PenaltyParams:
    """The tiers in order of severity, and how long zero badness takes to forgive one."""

    tiers: tuple[Tier, ...]
    occurrence_timeout: float  # seconds
    mode: str = ENFORCE  # the groups' default; a group may override it

    def __post_init__(self) -> None:
        if self.mode not in PENALTY_MODES:
            raise ValueError(f"mode must be one of {PENALTY_MODES}, not {self.mode!r}")
        if not self.tiers:
            raise ValueError("at least one penalty tier is needed")
        names = [tier.name for tier in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique: {names}")
        if not 0 < self.occurrence_timeout < math.inf:
            raise ValueError(
                f"occurrence_timeout must be positive, not {self.occurrence_timeout!r}"
            )

    @property
    def order(self) -> tuple[str, ...]:
        return tuple(tier.name for tier in self.tiers)

    def find(self, name: str) -> Tier | None:
        return next((tier for tier in self.tiers if tier.name == name), None)


@dataclass(frozen=True)
class UserScore:
    """One user's standing. Times are absolute epoch seconds."""

    cpu_badness: float = 0.0
    memory_badness: float = 0.0
    tier: str | None = None
    tier_expiry: float | None = None
    occurrences: int = 0
    # Start of the current stretch of zero badness outside a penalty, restarted when
    # it forgives an occurrence; None while badness is above 0 or a penalty is on.
    zero_since: float | None = None

    def __post_init__(self) -> None:
        for name in ("cpu_badness", "memory_badness"):
            value = getattr(self, name)
            if not 0 <= value <= MAX_BADNESS:
                raise ValueError(f"{name} must be within 0 and 100, not {value!r}")
        if self.occurrences < 0:
            raise ValueError(f"occurrences must not be negative, not {self.occurrences!r}")
        if (self.tier is None) != (self.tier_expiry is None):
            raise ValueError("a tier and its expiry go together")

    @property
    def score(self) -> float:
        return self.cpu_badness + self.memory_badness

    @property
    def in_penalty(self) -> bool:
        return self.tier is not None


@dataclass(frozen=True)
class Change:
    """What evaluate() changed in a user's standing, and why, in words for the log."""

    kind: ChangeKind
    old_tier: str | None
    new_tier: str | None
    old_occurrences: int
    new_occurrences: int
    reason: str
    # The user's group is in watch mode: recorded and told to admins, no limit changed.
    watched: bool = False


def _clamp(badness: float) -> float:
    if badness >= MAX_BADNESS - _EPSILON:
        return MAX_BADNESS
    if badness <= _EPSILON:
        return 0.0
    return badness


def step_badness(
    badness: float,
    usage: float,
    quota: float | None,
    threshold: float,
    params: BadnessParams,
    interval: float,
) -> float:
    """One resource's badness after one interval of ``interval`` seconds at ``usage``.

    ``quota`` None or 0 means the resource is not measured: its badness is 0.
    """
    if quota is None or not 0 < quota < math.inf:
        return 0.0
    if math.isnan(usage):
        return badness  # no sample: neither blame nor credit
    # Counters that were reset read as negative usage: count it as none.
    x = min(max(usage, 0.0), quota) / quota
    # Arbiter2's order of operations, so that the floats agree too.
    if x >= threshold:
        change = x * (MAX_BADNESS / (params.time_to_max_bad * threshold) * interval)
    else:
        change = (1 - x) * -(MAX_BADNESS / params.time_to_min_bad * interval)
    return _clamp(badness + change)


def is_violation(score: float) -> bool:
    return score >= MAX_BADNESS - _EPSILON


def evaluate(
    state: UserScore,
    cpu_usage: float,
    cpu_quota: float | None,
    mem_usage: float,
    mem_quota: float | None,
    now: float,
    interval: float,
    params: BadnessParams,
    penalty: PenaltyParams,
) -> tuple[UserScore, Change | None]:
    """A user's standing after the interval ending at ``now``, and what changed.

    CPU usage and quota are in cores, memory in bytes; a quota of None or 0 leaves
    that resource unmeasured. The change is None when only the scores moved.
    """
    if state.tier is not None:
        if state.tier_expiry is not None and now < state.tier_expiry:
            return state, None  # no badness accrues during a penalty
        released = UserScore(occurrences=state.occurrences, zero_since=now)
        return released, Change(
            "released",
            state.tier,
            None,
            state.occurrences,
            state.occurrences,
            f"{state.tier} expired",
        )

    cpu = step_badness(
        state.cpu_badness, cpu_usage, cpu_quota, params.cpu_threshold, params, interval
    )
    memory = step_badness(
        state.memory_badness, mem_usage, mem_quota, params.memory_threshold, params, interval
    )
    score = cpu + memory
    if is_violation(score):
        occurrences = min(state.occurrences + 1, len(penalty.tiers))
        tier = penalty.tiers[occurrences - 1]
        penalized = UserScore(
            tier=tier.name, tier_expiry=now + tier.timeout, occurrences=occurrences
        )
        reason = f"badness {score:.1f} >= 100: cpu {cpu:.1f}, memory {memory:.1f}"
        return penalized, Change(
            "penalized", None, tier.name, state.occurrences, occurrences, reason
        )

    if score > 0:
        return replace(state, cpu_badness=cpu, memory_badness=memory, zero_since=None), None

    zero_since = state.zero_since
    if zero_since is None or state.score > 0:
        zero_since = now
    waited = now - zero_since
    if state.occurrences > 0 and waited >= penalty.occurrence_timeout:
        occurrences = state.occurrences - 1
        reason = (
            f"badness 0 for {waited:.0f} s >= occurrence_timeout {penalty.occurrence_timeout:.0f} s"
        )
        return UserScore(occurrences=occurrences, zero_since=now), Change(
            "forgiven", None, None, state.occurrences, occurrences, reason
        )
    return UserScore(occurrences=state.occurrences, zero_since=zero_since), None
