"""cgpolicyd's Prometheus series: built once a cycle from what the daemon knows.

``build`` turns the cycle's samples, the recorded standings and the daemon's
counters into one exposition in the Prometheus text format (the client
library's ``generate_latest``, never text written by hand). cgpolicyd writes it
to the node exporter's textfile collector directory (``[metrics] textfile_dir``)
and answers the Metrics bus call with the same bytes, so the file and
``cgpolicyctl metrics`` never disagree.

The file is world-readable by design (the exporter runs as its own account):
whoever can log in can read every user's usage and tier from it. It is written
as root's state files are (compiled.py): under a fresh name, then renamed, into
a directory only root can change.

Daemon only: the hook never imports this module (nor the client library).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)

from . import __version__, log
from .accounts import Account
from .badness import UserScore
from .classify import decide
from .compiled import write_public_file
from .errors import CgpolicyError
from .usage import Sample

TEXTFILE = "cgpolicy.prom"  # the collector reads *.prom
USER_LABELS = ("uid", "user", "group")


@dataclass(frozen=True)
class UserSeries:
    """One user's values; None where there is no reading (logged out, unread)."""

    uid: int
    user: str  # "" when NSS does not know the uid
    group: str  # the policy's status group; "" when none applies
    cpu_seconds: float | None  # the slice's CPU time so far, whitelisted programs included
    memory_bytes: int | None  # anonymous plus mapped-file memory, as badness counts it
    standing: UserScore
    tier_level: int  # the tier's place in [penalty] order, from 1; 0 in no tier
    frozen: bool

    def labels(self) -> list[str]:
        return [str(self.uid), self.user, self.group]


@dataclass(frozen=True)
class NodeSeries:
    """The daemon's own figures; counters count since it started."""

    tiers: Sequence[str]  # [penalty] order
    cycle_seconds: float | None  # how long the last cycle took
    reloads: int  # policies loaded by a reload (SIGHUP, Reload, an edit seen)
    reload_errors: int  # reloads refused (a refusal repeated every cycle counts once)
    cycle_failures: int


def user_series(
    samples: Mapping[int, Sample],
    standings: Mapping[int, UserScore],
    account: Callable[[int], Account],
    compiled: dict[str, Any],
    tiers: Sequence[str],
) -> list[UserSeries]:
    """Every user sampled this cycle, and every user in a tier, logged in or not."""
    uids = set(samples) | {uid for uid, standing in standings.items() if standing.tier}
    series = []
    for uid in sorted(uids):
        try:
            who: Account | None = account(uid)
        except CgpolicyError:
            who = None
        group = decide(compiled, who).group if who is not None else None
        sample = samples.get(uid)
        standing = standings.get(uid) or UserScore()
        cpu = sample.cpu_usec_total if sample else None
        series.append(
            UserSeries(
                uid=uid,
                user=who.name if who else "",
                group=str(group["name"]) if group else "",
                cpu_seconds=None if cpu is None else cpu / 1e6,
                memory_bytes=sample.memory_bytes if sample else None,
                standing=standing,
                tier_level=_level(standing.tier, tiers),
                frozen=bool(sample and sample.frozen),
            )
        )
    return series


def _level(tier: str | None, tiers: Sequence[str]) -> int:
    if tier is None:
        return 0
    # a tier the policy no longer lists is still a penalty in force
    return tiers.index(tier) + 1 if tier in tiers else len(tiers) + 1


class _Snapshot:
    """A collector of one cycle's values: the registry asks it at exposition time."""

    def __init__(self, users: Sequence[UserSeries], node: NodeSeries) -> None:
        self.users = users
        self.node = node

    def collect(self) -> Iterator[Metric]:
        yield from self._users()
        yield from self._node()

    def _users(self) -> Iterator[Metric]:
        def gauge(name: str, doc: str, extra: Sequence[str] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=[*USER_LABELS, *extra])

        cpu = CounterMetricFamily(
            "cgpolicy_user_cpu_seconds",
            "CPU time used by the user's slice, whitelisted programs included",
            labels=USER_LABELS,
        )
        memory = gauge(
            "cgpolicy_user_memory_bytes", "anonymous plus mapped-file memory of the user's slice"
        )
        cpu_bad = gauge("cgpolicy_user_cpu_badness", "CPU badness, 0 to 100")
        memory_bad = gauge("cgpolicy_user_memory_badness", "memory badness, 0 to 100")
        tier = gauge(
            "cgpolicy_user_tier",
            "the penalty tier's place in [penalty] order (1 the first, 0 none); label tier "
            "names it",
            ["tier"],
        )
        expiry = gauge(
            "cgpolicy_user_tier_expiry_timestamp_seconds",
            "Unix time the user's penalty tier ends; only users in a tier",
        )
        frozen = gauge("cgpolicy_user_frozen", "1 if the user's slice is frozen, else 0")
        for user in self.users:
            labels = user.labels()
            if user.cpu_seconds is not None:
                cpu.add_metric(labels, user.cpu_seconds)
            if user.memory_bytes is not None:
                memory.add_metric(labels, user.memory_bytes)
            cpu_bad.add_metric(labels, user.standing.cpu_badness)
            memory_bad.add_metric(labels, user.standing.memory_badness)
            tier.add_metric([*labels, user.standing.tier or ""], user.tier_level)
            if user.standing.tier_expiry is not None:
                expiry.add_metric(labels, user.standing.tier_expiry)
            frozen.add_metric(labels, int(user.frozen))
        yield from (cpu, memory, cpu_bad, memory_bad, tier, expiry, frozen)

    def _node(self) -> Iterator[Metric]:
        node = self.node
        counts = dict.fromkeys(node.tiers, 0)
        for user in self.users:
            if user.standing.tier:
                counts[user.standing.tier] = counts.get(user.standing.tier, 0) + 1
        penalties = GaugeMetricFamily(
            "cgpolicy_penalties", "users in each penalty tier now", labels=["tier"]
        )
        for name, count in counts.items():
            penalties.add_metric([name], count)
        yield penalties
        if node.cycle_seconds is not None:
            yield GaugeMetricFamily(
                "cgpolicy_cycle_duration_seconds",
                "how long cgpolicyd's last cycle took",
                value=node.cycle_seconds,
            )
        yield CounterMetricFamily(
            "cgpolicy_cycle_failures", "cycles that ended in an error", value=node.cycle_failures
        )
        yield CounterMetricFamily(
            "cgpolicy_policy_reloads", "policies loaded by a reload", value=node.reloads
        )
        yield CounterMetricFamily(
            "cgpolicy_policy_reload_errors",
            "reloads refused for errors in the policy files",
            value=node.reload_errors,
        )
        yield InfoMetricFamily(
            "cgpolicy_build", "cgpolicy's version", value={"version": __version__}
        )


def build(users: Sequence[UserSeries], node: NodeSeries) -> bytes:
    """The exposition, in the Prometheus text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(users, node))
    return generate_latest(registry)


class TextfileWriter:
    """Writes the exposition into the textfile collector's directory each cycle.

    A failure never fails a cycle: it is logged once per kind (the directory
    missing, refused, read-only...), and once more when writing works again.
    When the policy moves the directory, or writes none, the file it wrote
    before is removed: the exporter would serve its last values for ever.
    """

    def __init__(self, write: Callable[[str, bytes], None] = write_public_file) -> None:
        self.write_file = write
        self.failing: set[str] = set()  # the kinds of failure logged since the last success
        self.written: str | None = None  # the file this writer last wrote

    def write(self, directory: str, data: bytes) -> bool:
        """True when written; False when ``directory`` is "" or the write failed."""
        path = os.path.join(directory, TEXTFILE) if directory else None
        if self.written is not None and self.written != path:
            with contextlib.suppress(OSError):  # unlink never follows a link
                os.unlink(self.written)
            self.written = None
        if path is None:
            return False
        try:
            self.write_file(path, data)
        except OSError as err:
            kind = errno.errorcode.get(err.errno or 0, type(err).__name__)
            if kind not in self.failing:
                self.failing.add(kind)
                log.error(
                    "metrics-not-written",
                    log.fields(
                        event="metrics-not-written",
                        file=path,
                        error=err,
                        hint=_hint(err),
                    )
                )
            return False
        self.written = path
        if self.failing:
            self.failing.clear()
            log.info("metrics-written", log.fields(event="metrics-written", file=path))
        return True


def _hint(err: OSError) -> str | None:
    if err.errno == errno.ENOENT:
        return "no such directory: is the node exporter installed? ([metrics] textfile_dir)"
    if err.errno == errno.EROFS:
        return "read-only to cgpolicyd: add it to ReadWritePaths= in a drop-in, then restart"
    return None
