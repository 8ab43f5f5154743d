"""A user's usage over a span of time, as ``cgpolicyctl report`` and the penalty mail show it.

``build_report`` gathers it from the usage history, the state database's
events and the policy in force: the samples, the group's CPU quota and
MemoryMax, the badness thresholds in the same units, the penalty spans
(watched ones marked) and the top processes recorded at violations. The
result is plain data (``UsageReport``); ``to_json`` prints it and
``plot.usage_png`` draws it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from .accounts import Account
from .classify import decide
from .constants import state_db_file, usage_db_file
from .policy import Policy
from .slicelimits import group_quotas
from .state import Event, StateStore
from .usage import Process
from .usagehistory import UsageHistory, UsagePoint

EVENTS_READ = 10_000  # a user's tier changes looked at: far more than a week holds


@dataclass(frozen=True)
class PenaltySpan:
    """A tier in force from ``start`` to ``end`` (epoch seconds); watched: judged only."""

    start: float
    end: float
    tier: str
    watched: bool = False


@dataclass(frozen=True)
class UsageReport:
    """What a report shows. Quotas are None where the group sets none.

    ``cpu_threshold`` and ``memory_threshold`` are in cores and bytes: the usage
    at which badness starts to grow.
    """

    user: str
    uid: int
    group: str | None
    since: float
    until: float
    samples: tuple[UsagePoint, ...]
    cpu_quota: float | None = None  # cores
    memory_max: int | None = None  # bytes
    cpu_threshold: float | None = None  # cores
    memory_threshold: int | None = None  # bytes
    penalties: tuple[PenaltySpan, ...] = ()
    processes: tuple[tuple[float, Process], ...] = ()


@dataclass(frozen=True)
class Stay:
    """A tier a user was in: the event that put them there, the one that ended it (None
    while it is in force), and its span; a span in force ends at its expiry."""

    began: Event
    ended: Event | None
    span: PenaltySpan


def stays(events: Iterable[Event], store: StateStore, until: float) -> list[Stay]:
    """Every user's tiers from ``events`` (oldest first); one still in force ends at the
    expiry ``store`` has for it, else at ``until``. In order of their start."""
    found = []
    current: dict[int, Event] = {}

    def stay(began: Event, ended: Event | None, end: float) -> Stay:
        assert began.new_tier is not None  # only a penalty with a tier begins a stay
        return Stay(began, ended, PenaltySpan(began.time, end, began.new_tier, began.watched))

    for event in events:
        began = current.get(event.uid)
        if began is not None and event.kind in ("released", "penalized"):
            found.append(stay(began, event, event.time))
            del current[event.uid]
        if event.kind == "penalized" and event.new_tier:
            current[event.uid] = event
    for uid, began in current.items():
        state = store.get(uid)
        found.append(stay(began, None, state.tier_expiry if state and state.tier_expiry else until))
    return sorted(found, key=lambda s: (s.span.start, s.began.id))


def penalty_spans(
    store: StateStore | None, uid: int, since: float, until: float
) -> list[PenaltySpan]:
    """The tiers the user was in between ``since`` and ``until``, from the recorded events."""
    if store is None:
        return []
    spans = [
        replace(s.span, end=min(s.span.end, until))
        for s in stays(reversed(store.history(uid, EVENTS_READ)), store, until)
    ]
    return [s for s in spans if s.end >= since and s.start <= until]


def build_report(
    account: Account,
    policy: Policy,
    memory_total: int,
    history: UsageHistory | None,
    store: StateStore | None,
    since: float,
    until: float,
) -> UsageReport:
    """The user's report from ``since`` to ``until`` (epoch seconds); None sources are empty."""
    group = decide(policy.compile(), account).group
    quotas = group_quotas(group, memory_total) if group else None
    cores = quotas.cores if quotas else None
    memory_max = quotas.memory_max if quotas else None
    samples = tuple(history.points(account.uid, since, until)) if history else ()
    processes = tuple(history.processes(account.uid, since)) if history else ()
    return UsageReport(
        user=account.name,
        uid=account.uid,
        group=group["name"] if group else None,
        since=since,
        until=until,
        samples=samples,
        cpu_quota=cores,
        memory_max=memory_max,
        cpu_threshold=None if cores is None else cores * policy.badness.cpu_threshold,
        memory_threshold=None
        if memory_max is None
        else int(memory_max * policy.badness.memory_threshold),
        penalties=tuple(penalty_spans(store, account.uid, since, until)),
        processes=tuple(p for p in processes if p[0] <= until),
    )


def report_from_files(
    account: Account, policy: Policy, memory_total: int, since: float, until: float
) -> UsageReport:
    """build_report on the node's usage history and state, each opened read-only here
    (so a worker thread may call it) and closed after; a missing file reads as empty."""
    history = UsageHistory.open_readonly(usage_db_file())
    store = StateStore.open_readonly(state_db_file())
    try:
        return build_report(account, policy, memory_total, history, store, since, until)
    finally:
        for source in (history, store):
            if source is not None:
                source.close()


def to_json(report: UsageReport) -> dict[str, Any]:
    """The report as plain data for JSON: times in epoch seconds, CPU in cores, memory in bytes."""
    return {
        "user": report.user,
        "uid": report.uid,
        "group": report.group,
        "since": report.since,
        "until": report.until,
        "cpu_quota": report.cpu_quota,
        "memory_max": report.memory_max,
        "cpu_threshold": report.cpu_threshold,
        "memory_threshold": report.memory_threshold,
        "samples": [
            {
                "time": p.time,
                "span": p.span,
                "cores": p.cores,
                "memory": p.memory,
                "cpu_badness": p.cpu_badness,
                "memory_badness": p.memory_badness,
                "tier": p.tier,
            }
            for p in report.samples
        ],
        "penalties": [
            {"start": s.start, "end": s.end, "tier": s.tier, "watched": s.watched}
            for s in report.penalties
        ],
        "processes": [
            {
                "time": when,
                "pid": p.pid,
                "name": p.name,
                "executable": p.executable,
                "cores": p.cores,
                "memory": p.memory,
            }
            for when, p in report.processes
        ],
    }
