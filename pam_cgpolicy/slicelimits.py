"""What a user's slice gets: the one decision every writer makes.

``slice_limits`` takes the compiled policy, the account, the standing in force
(a penalty tier or none, and the MemoryMax the tier's descent has reached) and
the slice's memory now, and returns the properties to send with what the log
says of them. The login hook (standing from cgpolicyd's penalties copy),
cgpolicyd (standing from its state database), ``cgpolicyctl apply`` and
``selftest`` all call it, so none of them lifts a penalty another one set.
It is pure: whoever sends the result records what it sent.

What a tier lowers is written here once (TIER_LOWERS), and how: the group's
own limits scaled by the tier's factors, MemoryMax never below what the slice
holds (a lower one makes the kernel kill its processes).

Imported by the hook: builtin modules only (see hook.py).
"""

from __future__ import annotations

import os

from .classify import decide, describe_limits
from .log import fields

TYPE_CHECKING = False  # typing itself is too slow an import for the hook
if TYPE_CHECKING:
    from typing import Any, TypeAlias

    from .accounts import Account
    from .classify import Decision
    from .errors import CgpolicyError

    Group: TypeAlias = dict[str, Any]
    Properties: TypeAlias = tuple[tuple[str, str, Any], ...]

UINT64_MAX = 2**64 - 1
UINT32_MAX = 2**32 - 1
INFINITY = UINT64_MAX  # systemd's "infinity" for a limit
USEC_PER_SEC = 1_000_000

# What a penalty tier lowers: the policy's key -> the D-Bus property it sets.
TIER_LOWERS = {
    "CPUQuota": "CPUQuotaPerSecUSec",
    "MemoryMax": "MemoryMax",
    "MemoryHigh": "MemoryHigh",
}
_CPU, _MEMORY_MAX, _MEMORY_HIGH = TIER_LOWERS.values()

MEMORY_MARGIN_SHARE = 0.1  # of the group's MemoryMax, kept free above the slice's usage


def physical_memory() -> int:
    """The machine's RAM in bytes, as /proc/meminfo's MemTotal counts it."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def format_size(value: int) -> str:
    if value >= INFINITY:
        return "infinity"
    for suffix, unit in (("T", 1024**4), ("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if value >= unit:
            return f"{value / unit:.1f}{suffix}".replace(".0" + suffix, suffix)
    return f"{value}B"


def format_quota(usec: int) -> str:
    if usec >= INFINITY:
        return "infinity"
    return f"{usec * 100 / USEC_PER_SEC:g}%"


class Quotas:
    """A group's CPU and memory limits as numbers; None where unlimited."""

    __slots__ = ("cpu_usec", "memory_high", "memory_max")

    def __init__(self, cpu_usec: int | None, memory_max: int | None, memory_high: int | None):
        self.cpu_usec = cpu_usec  # CPUQuotaPerSecUSec
        self.memory_max = memory_max  # bytes
        self.memory_high = memory_high

    @property
    def cores(self) -> float | None:
        return None if self.cpu_usec is None else self.cpu_usec / USEC_PER_SEC


def group_quotas(group: Group, memory_total: int) -> Quotas:
    """The group's CPU and memory limits in absolute units; a share of RAM resolved."""
    found: dict[str, int] = {}
    for name, _signature, value in group["properties"]:
        if not isinstance(value, int) or isinstance(value, bool) or value >= INFINITY:
            continue
        if name.endswith("Scale"):  # a share of RAM
            found[name.removesuffix("Scale")] = value * memory_total // UINT32_MAX
        else:
            found[name] = value
    return Quotas(found.get(_CPU), found.get(_MEMORY_MAX), found.get(_MEMORY_HIGH))


def _limited(value: int | None) -> int | None:
    """The value if it is a limit there is to scale, None if unset or infinity."""
    return value if value is not None and 0 < value < INFINITY else None


def tier_limits(quotas: Quotas, cpu_factor: float, memory_factor: float) -> dict[str, int]:
    """A tier's limits as absolute D-Bus values: the group's own, scaled by its factors.

    Keys are TIER_LOWERS' properties. A limit the group leaves unset or at
    infinity has nothing to scale and is left out. MemoryHigh scales the group's
    MemoryHigh when it has one, else MemoryMax, so that it never stays above the
    lowered MemoryMax.
    """
    result: dict[str, int] = {}
    cpu = _limited(quotas.cpu_usec)
    if cpu is not None:
        result[_CPU] = max(1, int(cpu * cpu_factor))
    memory_max = _limited(quotas.memory_max)
    if memory_max is not None:
        high = min(_limited(quotas.memory_high) or memory_max, memory_max)
        result[_MEMORY_MAX] = max(1, int(memory_max * memory_factor))
        result[_MEMORY_HIGH] = max(1, int(high * memory_factor))
    return result


def memory_max_now(target: int, group_limit: int, current: int | None, in_force: int | None) -> int:
    """The MemoryMax to set now on the way down to a tier's ``target``.

    A MemoryMax below what the slice holds makes the kernel kill its processes, so
    the limit never goes under ``current`` plus a margin (a tenth of the group's
    limit), never rises above what is ``in_force`` (or the group's limit), and
    follows usage down cycle by cycle until it reaches the target. With no reading
    of ``current`` the limit in force stays.
    """
    ceiling = group_limit if in_force is None else min(in_force, group_limit)
    if current is None:
        return max(target, ceiling)
    floor = current + int(group_limit * MEMORY_MARGIN_SHARE)
    return max(target, min(ceiling, floor))


class Standing:
    """A user's penalty in force: its tier (None: none) and the MemoryMax it has reached."""

    __slots__ = ("memory_max", "tier")

    def __init__(self, tier: str | None = None, memory_max: int | None = None) -> None:
        self.tier = tier
        self.memory_max = memory_max  # None: not read, or no step sent yet

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Standing) and (self.tier, self.memory_max) == (
            other.tier,
            other.memory_max,
        )

    def __repr__(self) -> str:
        return f"Standing({self.tier!r}, {self.memory_max!r})"


NO_PENALTY = Standing()


class SliceLimits:
    """The properties to send for one user, and what the log says of them."""

    __slots__ = ("decision", "error", "lowered", "memory_target", "properties", "reason", "tier")

    def __init__(
        self,
        decision: Decision,
        properties: Properties,
        tier: str | None = None,
        lowered: dict[str, int] | None = None,
        memory_target: int | None = None,
        reason: str = "",
    ) -> None:
        self.decision = decision
        self.properties = properties
        self.tier = tier  # the tier whose limits these are; None: the group's own
        self.lowered = lowered or {}  # the D-Bus values the tier lowered
        self.memory_target = memory_target  # the tier's MemoryMax, when it lowers one
        self.reason = reason or decision.reason
        self.error: CgpolicyError | None = None

    @property
    def action(self) -> str:
        return "failed" if self.error else self.decision.action

    @property
    def memory_max(self) -> int | None:
        """The tier's MemoryMax sent now (above memory_target while it steps down)."""
        return self.lowered.get(_MEMORY_MAX)

    def fail(self, error: CgpolicyError) -> None:
        self.error = error

    def limits_text(self) -> str | None:
        """The limits sent, in the policy's notation: the group's with the tier's in place.

        None when nothing is sent (exempt, skipped).
        """
        group = self.decision.group
        if group is None or not self.properties:
            return None
        shown = dict(group["limits"])
        for key, name in TIER_LOWERS.items():
            if name in self.lowered:
                value = self.lowered[name]
                shown[key] = format_quota(value) if name == _CPU else format_size(value)
        return describe_limits(shown)

    def _memory_target_text(self) -> str | None:
        """The tier's MemoryMax while the one sent is still above it (usage kept it up)."""
        if self.memory_target is None or self.memory_max == self.memory_target:
            return None
        return format_size(self.memory_target)

    def log_line(self) -> str:
        group = self.decision.group
        return fields(
            user=self.decision.account.name,
            uid=self.decision.account.uid,
            group=group["name"] if group else None,
            rule=self.decision.rule if group else None,
            tier=self.tier,
            limits=self.limits_text(),
            memory_target=self._memory_target_text(),
            action=self.action,
            reason=self.reason or None,
            error=self.error,
        )


def is_watched(group: Group | None) -> bool:
    """True if the group's penalties are watched, never applied (Policy.watched decides)."""
    return bool(group and group["watch"])


def slice_limits(
    policy: dict[str, Any],
    account: Account,
    standing: Standing = NO_PENALTY,
    memory_total: int | None = None,
    current: int | None = None,
) -> SliceLimits:
    """What ``account``'s slice gets now: the group's limits, or its tier's.

    ``standing`` is the penalty in force; ``current`` the slice's memory now
    (bytes, None when unread); ``memory_total`` the RAM a group's share of it is
    resolved against (read here when None). Exempt and skipped users get
    nothing; a tier the policy no longer has, or one of a group in watch mode,
    leaves the group's limits.
    """
    decision = decide(policy, account)
    group = decision.group
    if decision.action != "applied" or group is None:
        return SliceLimits(decision, ())
    own = tuple(decision.properties)
    if standing.tier is None:
        return SliceLimits(decision, own)
    if is_watched(group):
        return SliceLimits(decision, own, reason=f"watching tier {standing.tier}: limits kept")
    factors = policy["tiers"].get(standing.tier)
    if factors is None:
        return SliceLimits(decision, own, reason=f"no tier {standing.tier} in the policy")
    quotas = group_quotas(group, physical_memory() if memory_total is None else memory_total)
    lowered = tier_limits(quotas, *factors)
    target = lowered.get(_MEMORY_MAX)
    if target is not None and quotas.memory_max is not None:
        lowered[_MEMORY_MAX] = memory_max_now(
            target, quotas.memory_max, current, standing.memory_max
        )
    replaced = {*lowered, *(name + "Scale" for name in lowered)}
    kept = tuple(p for p in own if p[0] not in replaced)
    properties = kept + tuple((name, "t", value) for name, value in lowered.items())
    reason = f"in penalty tier {standing.tier}"
    return SliceLimits(decision, properties, standing.tier, lowered, target, reason)
