"""The penalty engine: what cgpolicyd decides, recorded before it is acted on.

Each cycle turns the users' usage samples into new standings (badness.evaluate),
stores them all in one transaction, and returns the limits to set for the users
whose tier changed. At start-up ``reconcile`` returns the limits of every
penalty still in force (systemd's runtime properties are gone after a reboot)
and ends those that expired while the daemon was down. Admin actions take the
same road. The engine does no I/O but the state store: the daemon applies the
actions it returns, so a crash between the two leaves a recorded penalty to
reconcile, never an applied one that was forgotten.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from . import limits
from .accounts import Account, lookup_uid
from .badness import Change, Tier, UserScore, evaluate, memory_max_now, tier_limits
from .classify import decide
from .errors import CgpolicyError, NotManaged, NotPenalized, UnknownTier
from .policy import Policy
from .state import StateStore
from .usage import Sample

Properties = tuple[tuple[str, str, Any], ...]
Group = dict[str, Any]


@dataclass(frozen=True)
class Action:
    """Limits to set on one user's slice; ``change`` is None when re-applying."""

    uid: int
    user: str
    properties: Properties
    change: Change | None


@dataclass(frozen=True)
class Quotas:
    """A group's limits as numbers the model measures against."""

    cpu_usec: int | None  # CPUQuotaPerSecUSec
    memory_max: int | None  # bytes
    memory_high: int | None

    @property
    def cores(self) -> float | None:
        return None if self.cpu_usec is None else self.cpu_usec / limits.USEC_PER_SEC


def group_quotas(group: Group, memory_total: int) -> Quotas:
    """The group's CPU and memory limits in absolute units; None where unlimited."""
    found: dict[str, int] = {}
    for name, _signature, value in group["properties"]:
        if not isinstance(value, int) or isinstance(value, bool) or value >= limits.INFINITY:
            continue
        if name.endswith("Scale"):  # a share of RAM
            found[name.removesuffix("Scale")] = value * memory_total // limits.UINT32_MAX
        else:
            found[name] = value
    return Quotas(found.get("CPUQuotaPerSecUSec"), found.get("MemoryMax"), found.get("MemoryHigh"))


def tier_properties(
    group: Group, quotas: Quotas, tier: Tier, memory_max: int | None = None
) -> Properties:
    """The group's properties with the tier's smaller CPU and memory limits in place.

    ``memory_max`` replaces the tier's MemoryMax while it steps down (memory_max_now);
    MemoryHigh stays at the tier's, so the kernel reclaims instead of killing.
    """
    lowered = tier_limits(quotas.cpu_usec, quotas.memory_max, tier, quotas.memory_high)
    if memory_max is not None and "MemoryMax" in lowered:
        lowered["MemoryMax"] = memory_max
    replaced = {*lowered, *(name + "Scale" for name in lowered)}
    kept = tuple(p for p in group["properties"] if p[0] not in replaced)
    return kept + tuple((name, "t", value) for name, value in lowered.items())


def _reading(value: float | None) -> float:
    """A missing reading is NaN: the step neither blames nor credits that resource."""
    return math.nan if value is None else value


class Engine:
    """Standings of every user, the policy they are judged by, and the store they live in."""

    def __init__(
        self,
        policy: Policy,
        store: StateStore,
        memory_total: int,
        lookup: Callable[[int], Account] = lookup_uid,
    ) -> None:
        self.store = store
        self.memory_total = memory_total
        self.lookup = lookup
        # uid -> (MemoryMax sent, the tier's target) of users in a tier
        self.memory_in_force: dict[int, tuple[int, int]] = {}
        self.set_policy(policy)

    def set_policy(self, policy: Policy) -> None:
        compiled = policy.compile()  # first: a policy that fails to compile changes nothing
        self.policy = policy
        self.compiled = compiled

    def _judged_group(self, account: Account) -> tuple[Group | None, str]:
        """The user's group if they can be penalized: limited, not exempt, not skipped.

        Otherwise None, and why not, in words for an admin.
        """
        decision = decide(self.compiled, account)
        group = decision.group
        if group is None:
            return None, decision.reason
        if decision.action != "applied":
            return None, f"group {group['name']} is exempt"
        quotas = group_quotas(group, self.memory_total)
        if quotas.cpu_usec is None and quotas.memory_max is None:
            # nothing to measure against, and nothing a tier could lower
            return None, f"group {group['name']} sets neither CPUQuota nor MemoryMax"
        return group, ""

    def whitelist(self, account: Account) -> frozenset[str]:
        group = decide(self.compiled, account).group
        return frozenset(self.policy.whitelist) | frozenset(group["whitelist"] if group else ())

    def properties(
        self, account: Account, state: UserScore | None, current: int | None = None
    ) -> Properties:
        """What the user's slice should have: the group's limits, or the tier's.

        ``current`` is the slice's memory now (bytes); a tier's MemoryMax never goes
        below it plus a margin, and the value sent is remembered for the next step.
        """
        decision = decide(self.compiled, account)
        group = decision.group
        tier = self._tier(state.tier) if state and state.tier else None
        if decision.action != "applied" or group is None or tier is None:
            self.memory_in_force.pop(account.uid, None)
            return (
                () if decision.action != "applied" or group is None else tuple(group["properties"])
            )
        quotas = group_quotas(group, self.memory_total)
        target = tier_limits(None, quotas.memory_max, tier).get("MemoryMax")
        if target is None or quotas.memory_max is None:
            return tier_properties(group, quotas, tier)
        in_force = self.memory_in_force.get(account.uid, (None, target))[0]
        now = memory_max_now(target, quotas.memory_max, current, in_force)
        self.memory_in_force[account.uid] = (now, target)
        return tier_properties(group, quotas, tier, now)

    def memory_stepping(self) -> dict[int, tuple[int, int]]:
        """Users whose MemoryMax is still above their tier's: uid -> (in force, target)."""
        return {uid: pair for uid, pair in self.memory_in_force.items() if pair[0] > pair[1]}

    def _tier(self, name: str) -> Tier | None:
        return self.policy.penalty.find(name) if self.policy.penalty else None

    def cycle(
        self, samples: Mapping[int, Sample], now: float, memory: Mapping[int, int] | None = None
    ) -> list[Action]:
        """One evaluation of every sampled user; ``now`` is epoch seconds.

        ``memory`` is the slices' current memory (bytes) where it was read; the
        samples' memory stands in elsewhere.
        """
        memory = memory or {}
        penalty = self.policy.penalty
        if penalty is None:
            return []
        recorded: list[tuple[int, str, UserScore, Change | None]] = []
        actions: list[Action] = []
        judged: set[int] = set()
        for uid, sample in samples.items():
            if sample.interval is None:
                continue  # a first sample has no interval to judge
            try:
                account = self.lookup(uid)
            except CgpolicyError:
                continue
            group, _ = self._judged_group(account)
            if group is None:
                continue
            quotas = group_quotas(group, self.memory_total)
            old = self.store.get(uid) or UserScore()
            judged.add(uid)
            new, change = evaluate(
                old,
                _reading(sample.cores),
                quotas.cores,
                _reading(sample.memory_bytes),
                quotas.memory_max,
                now,
                self._elapsed(sample.interval),
                self.policy.badness,
                penalty,
            )
            if new != old:
                recorded.append((uid, account.name, new, change))
            current = memory.get(uid, sample.memory_bytes)
            stepping = change is None and new.tier is not None and uid in self.memory_stepping()
            if (change is not None and change.kind != "forgiven") or stepping:
                before = self.memory_in_force.get(uid)
                props = self.properties(account, new, current)
                if change is not None or self.memory_in_force.get(uid) != before:
                    actions.append(Action(uid, account.name, props, change))
        actions += self._release_expired(now, skip=judged, recorded=recorded)
        if recorded:
            self.store.record_many(recorded, now=now)
        return actions

    def _elapsed(self, interval: float) -> float:
        """At most two intervals: a stall, a suspend or a clock step is not one long step."""
        return min(interval, 2 * self.policy.general.interval)

    def _release_expired(
        self, now: float, skip: set[int], recorded: list[tuple[int, str, UserScore, Change | None]]
    ) -> list[Action]:
        """End the penalties of users who were not sampled (logged out, daemon down)."""
        actions = []
        for row in self.store.expired(now):
            if row.uid in skip:
                continue  # evaluate() released them
            new, change = self._released(row.state, now, "penalty expired")
            recorded.append((row.uid, row.user, new, change))
            try:
                props = self.properties(self.lookup(row.uid), new)
            except CgpolicyError:
                props = ()
            actions.append(Action(row.uid, row.user, props, change))
        return actions

    @staticmethod
    def _released(state: UserScore, now: float, reason: str) -> tuple[UserScore, Change]:
        new = replace(
            state, tier=None, tier_expiry=None, cpu_badness=0.0, memory_badness=0.0, zero_since=now
        )
        return new, Change(
            "released", state.tier, None, state.occurrences, state.occurrences, reason
        )

    def reconcile(self, now: float) -> list[Action]:
        """At start-up: penalties in force come back, expired ones end."""
        actions = []
        for row in self.store.in_penalty(now):
            try:
                account = self.lookup(row.uid)
            except CgpolicyError:
                continue
            actions.append(Action(row.uid, row.user, self.properties(account, row.state), None))
        recorded: list[tuple[int, str, UserScore, Change | None]] = []
        actions += self._release_expired(now, skip=set(), recorded=recorded)
        if recorded:
            self.store.record_many(recorded, now=now)
        return actions

    def check_penalize(self, uid: int, tier_name: str) -> tuple[Account, Tier]:
        """The user and tier of an admin's penalty; refused when it would never be applied."""
        tier = self._tier(tier_name)
        if tier is None or self.policy.penalty is None:
            known = ", ".join(self.policy.penalty.order) if self.policy.penalty else "none"
            raise UnknownTier(f"no penalty tier {tier_name!r}; the tiers are: {known}")
        account = self.lookup(uid)
        group, why = self._judged_group(account)
        if group is None:
            raise NotManaged(
                f"{account.name} (uid {uid}) cannot be penalized: {why}; nothing was recorded"
            )
        return account, tier

    def penalize(
        self, uid: int, tier_name: str, actor: str, now: float, current: int | None = None
    ) -> Action:
        """An admin puts a user in a tier now, for the tier's timeout.

        ``current`` is the slice's memory now (bytes), None when unknown.
        Refused as check_penalize refuses.
        """
        account, tier = self.check_penalize(uid, tier_name)
        assert self.policy.penalty is not None  # check_penalize refuses otherwise
        old = self.store.get(uid) or UserScore()
        occurrences = max(old.occurrences, self.policy.penalty.order.index(tier_name) + 1)
        new = replace(
            old,
            tier=tier_name,
            tier_expiry=now + tier.timeout,
            occurrences=occurrences,
            cpu_badness=0.0,
            memory_badness=0.0,
            zero_since=None,
        )
        change = Change(
            "penalized", old.tier, tier_name, old.occurrences, occurrences, f"by {actor}"
        )
        self.store.record(uid, account.name, new, change, actor, now=now)
        self.memory_in_force.pop(uid, None)  # a new tier steps down from the group's limit
        return Action(uid, account.name, self.properties(account, new, current), change)

    def release(self, uid: int, actor: str, now: float) -> Action:
        """An admin ends a user's penalty now; NotPenalized when there is none."""
        account = self.lookup(uid)
        old = self.store.get(uid) or UserScore()
        if old.tier is None:
            raise NotPenalized(
                f"{account.name} (uid {uid}) is in no penalty tier; nothing to release"
            )
        new, change = self._released(old, now, f"by {actor}")
        self.store.record(uid, account.name, new, change, actor, now=now)
        return Action(uid, account.name, self.properties(account, new), change)
