"""What-if replay: a node's recorded usage judged again under a candidate policy.

``cgpolicyctl replay`` feeds the usage history (usagehistory.py), cycle by cycle,
to the engine cgpolicyd runs (``Engine.cycle``: the same badness, tiers, expiry
and forgiveness) with the candidate policy and a state store in memory, then
sets the penalties that store recorded beside those the node's state database
recorded under the policy in force. The result is plain data (``Replay``);
``to_json`` prints it and ``plot.replay_png`` draws it.

What it cannot know, in the README and, the first three where they apply, in its output:
- Each user starts the span with no badness and no occurrences.
- Only the model is replayed. An admin's penalize or release is not the policy's
  doing: it is listed apart, never replayed; a recorded penalty an admin set is
  not compared, and one an admin ended early says so.
- Where the history is downsampled (older than an hour, a day), a bucket's
  average stands for all of it, as one step, and a penalty's time is its
  bucket's start.
- A user with no usage at all in a cycle is not in the history: the replay does
  not judge them then (cgpolicyd let their badness decay if they were logged in).
- CPU is as recorded: less the whitelist in force then. Accounts and groups are
  as NSS says now; a uid it does not know is not judged.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from .accounts import Account, lookup_uid
from .engine import Engine
from .errors import CgpolicyError
from .policy import Policy
from .report import Stay, stays
from .state import Event, StateStore
from .usage import Sample
from .usagehistory import UsageHistory, is_average

WHOLE_SECONDS = 1.0  # the history keeps whole seconds: a time is off by up to this


@dataclass(frozen=True)
class Penalty:
    """A tier a user was (or would have been) in: from ``start`` to ``end``, epoch seconds.

    ``in_force``: not ended by the end of the span; ``end`` is its expiry.
    ``ended_by``: the admin who ended it early (recorded only). ``bucket``: the
    seconds its start is rounded to where the history is averages, else 0.
    """

    uid: int
    user: str
    tier: str
    start: float
    end: float
    watched: bool
    in_force: bool
    ended_by: str | None = None
    bucket: float = 0.0

    @property
    def seconds(self) -> float:
        return self.end - self.start


# A row's verdict: the same penalty under both; another tier at the same time; the
# candidate's begins sooner or later, the two in force at once; one only.
SAME, OTHER_TIER, SOONER, LATER, CANDIDATE_ONLY, RECORDED_ONLY = (
    "same",
    "other tier",
    "sooner",
    "later",
    "candidate only",
    "recorded only",
)


@dataclass(frozen=True)
class Row:
    """One line of the comparison: a penalty under the candidate, the recorded one, or both."""

    candidate: Penalty | None
    recorded: Penalty | None
    verdict: str

    @property
    def start(self) -> float:
        return min(p.start for p in (self.candidate, self.recorded) if p is not None)

    @property
    def penalty(self) -> Penalty:
        found = self.candidate or self.recorded
        assert found is not None  # a row has at least one
        return found


@dataclass(frozen=True)
class Averages:
    """A stretch of the history kept as averages of ``bucket`` seconds, first to last start."""

    bucket: float
    first: float
    last: float


@dataclass(frozen=True)
class Replay:
    """The replay of ``since`` to ``until``: what the candidate would have done, what was done."""

    since: float
    until: float
    sampled_every: float | None  # the history's interval; None without samples
    users: int  # with samples in the span
    samples: int
    unknown: tuple[int, ...]  # uids NSS does not know here: not judged
    averages: tuple[Averages, ...]
    has_tiers: bool  # False: the candidate has no [penalty], so it penalizes nobody
    candidate: tuple[Penalty, ...]
    recorded: tuple[Penalty, ...]  # the model's, under the policy in force
    rows: tuple[Row, ...]
    admin: tuple[Event, ...]  # admins' actions recorded in the span: not replayed


class _Accounts:
    """NSS as cgpolicyd asks it, each uid once; the uids it does not know, kept."""

    def __init__(self, lookup: Callable[[int], Account]) -> None:
        self.lookup = lookup
        self.known: dict[int, Account] = {}
        self.unknown: dict[int, CgpolicyError] = {}

    def __call__(self, uid: int) -> Account:
        account = self.known.get(uid)
        if account is not None:
            return account
        error = self.unknown.get(uid)
        if error is None:
            try:
                account = self.known[uid] = self.lookup(uid)
                return account
            except CgpolicyError as err:
                error = self.unknown[uid] = err
        raise error


def replay(
    policy: Policy,
    history: UsageHistory,
    recorded: StateStore | None,
    since: float,
    until: float,
    memory_total: int,
    uid: int | None = None,
    lookup: Callable[[int], Account] = lookup_uid,
) -> Replay:
    """Judge the history from ``since`` to ``until`` (only ``uid``'s if given) under
    ``policy``, beside the events ``recorded`` holds (None: none recorded)."""
    accounts = _Accounts(lookup)
    judged = StateStore.in_memory()
    try:
        engine = Engine(policy, judged, memory_total, accounts)
        every = history.sampled_every(since, until)
        interval = every or policy.general.interval
        # A recorded step is never cut short: the candidate's interval may differ.
        longest = 2 * max(interval, policy.general.interval)
        averages: dict[float, Averages] = {}
        buckets: dict[float, float] = {}  # a cycle on averages: its time -> its bucket
        users: set[int] = set()
        samples = 0
        last: float | None = None

        def idle_until(when: float, step: float) -> None:
            """Cycles with nobody sampled over a gap, as cgpolicyd runs them: expiries."""
            tick = last + step if last is not None else when
            while when - tick > step / 2:
                engine.cycle({}, tick)
                tick += step

        timeline = history.timeline(since, until, uid)
        for when, group in itertools.groupby(timeline, key=lambda p: p.time):
            points = list(group)
            bucket = max((p.span for p in points if is_average(p, interval)), default=0.0)
            step = bucket or interval
            idle_until(when, step)
            if bucket:
                buckets[when] = bucket
                seen = averages.get(bucket)
                averages[bucket] = Averages(bucket, seen.first if seen else when, when)
            cycle = {p.uid: Sample(p.uid, p.cores, None, p.memory, None, p.span) for p in points}
            engine.cycle(cycle, when, longest_step=bucket or longest)
            users.update(cycle)
            samples += len(cycle)
            last = when
        idle_until(until, interval)
        engine.cycle({}, until)  # what has expired by the end, as a cycle then would
        events = reversed(judged.history(uid, None))
        candidate = [_penalty(s, buckets) for s in stays(events, judged, until)]
    finally:
        judged.close()
    made, admin = _recorded(recorded, since, until, uid)
    tolerance = interval + WHOLE_SECONDS
    return Replay(
        since=since,
        until=until,
        sampled_every=every,
        users=len(users),
        samples=samples,
        unknown=tuple(sorted(accounts.unknown.keys() & users)),
        averages=tuple(sorted(averages.values(), key=lambda a: a.first)),
        has_tiers=policy.penalty is not None,
        candidate=tuple(candidate),
        recorded=tuple(made),
        rows=tuple(compare(candidate, made, tolerance)),
        admin=tuple(admin),
    )


def _penalty(stay: Stay, buckets: dict[float, float]) -> Penalty:
    ended = stay.ended
    return Penalty(
        uid=stay.began.uid,
        user=stay.began.user,
        tier=stay.span.tier,
        start=stay.span.start,
        end=stay.span.end,
        watched=stay.span.watched,
        in_force=ended is None,
        ended_by=ended.actor if ended is not None else None,
        bucket=buckets.get(stay.span.start, 0.0),
    )


def _recorded(
    store: StateStore | None, since: float, until: float, uid: int | None
) -> tuple[list[Penalty], list[Event]]:
    """The model's penalties recorded in the span, and the admins' actions.

    Paired over all events, so that an admin's release ends the model's penalty;
    a penalty an admin set is theirs, not the model's, and is not compared.
    """
    if store is None:
        return [], []
    events = [e for e in reversed(store.history(uid, None, since)) if e.time <= until]
    made = [_penalty(s, {}) for s in stays(events, store, until) if s.began.actor is None]
    return made, [e for e in events if e.actor is not None]


def compare(
    candidate: Iterable[Penalty], recorded: Iterable[Penalty], tolerance: float
) -> list[Row]:
    """Pair the candidate's penalties with the recorded ones of the same user, in order:
    begun within ``tolerance`` seconds (two buckets where the history is averages: a
    bucket a user was busy in for part of it counts as busy through it) at the same tier,
    then at any tier; then any two in force at once, the nearest start first (sooner or
    later). The rest stand alone. In order of their start."""
    left = sorted(recorded, key=lambda p: p.start)
    rows: list[Row] = []
    pending = sorted(candidate, key=lambda p: p.start)

    def near(mine: Penalty, theirs: Penalty) -> bool:
        return abs(theirs.start - mine.start) <= max(tolerance, 2 * mine.bucket)

    def overlap(mine: Penalty, theirs: Penalty) -> bool:
        return mine.start < theirs.end and theirs.start < mine.end

    passes: tuple[Callable[[Penalty, Penalty], bool], ...] = (
        lambda mine, theirs: near(mine, theirs) and theirs.tier == mine.tier,
        near,
        overlap,
    )
    for fits in passes:
        unmatched = []
        for mine in pending:
            found = min(
                (t for t in left if t.uid == mine.uid and fits(mine, t)),
                key=lambda t: abs(t.start - mine.start),
                default=None,
            )
            if found is None:
                unmatched.append(mine)
                continue
            left.remove(found)
            rows.append(Row(mine, found, _verdict(mine, found, near(mine, found))))
        pending = unmatched
    rows += [Row(p, None, CANDIDATE_ONLY) for p in pending]
    rows += [Row(None, p, RECORDED_ONLY) for p in left]
    return sorted(rows, key=lambda r: (r.start, r.penalty.uid))


def _verdict(mine: Penalty, theirs: Penalty, near: bool) -> str:
    if near:
        return SAME if mine.tier == theirs.tier else OTHER_TIER
    return SOONER if mine.start < theirs.start else LATER


def per_hour(penalties: Iterable[Penalty], since: float, until: float) -> list[int]:
    """How many penalties began in each hour from ``since`` (the last hour may be short)."""
    counts = [0] * max(1, math.ceil((until - since) / 3600))
    for penalty in penalties:
        if since <= penalty.start <= until:
            counts[min(int((penalty.start - since) // 3600), len(counts) - 1)] += 1
    return counts


def _penalty_json(penalty: Penalty) -> dict[str, Any]:
    return {**asdict(penalty), "seconds": penalty.seconds, "bucket": penalty.bucket or None}


def to_json(result: Replay, event_json: Callable[[Event], dict[str, Any]]) -> dict[str, Any]:
    """The replay as plain data: times in epoch seconds, durations in seconds.

    ``event_json`` writes an admin's action as ``cgpolicyctl history --json`` does.
    """
    return {
        "since": result.since,
        "until": result.until,
        "sampled_every": result.sampled_every,
        "users": result.users,
        "samples": result.samples,
        "unknown_uids": list(result.unknown),
        "averages": [
            {"bucket": a.bucket, "first": a.first, "last": a.last} for a in result.averages
        ],
        "candidate_has_tiers": result.has_tiers,
        "candidate": [_penalty_json(p) for p in result.candidate],
        "recorded": [_penalty_json(p) for p in result.recorded],
        "comparison": [
            {
                "user": row.penalty.user,
                "uid": row.penalty.uid,
                "verdict": row.verdict,
                "candidate": row.candidate and _penalty_json(row.candidate),
                "recorded": row.recorded and _penalty_json(row.recorded),
            }
            for row in result.rows
        ],
        "admin_actions": [event_json(e) for e in result.admin],
    }
