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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .accounts import Account, lookup_uid
from .badness import Change, Tier, UserScore, evaluate
from .classify import decide
from .errors import CgpolicyError, NotManaged, NotPenalized, StateError, UnknownTier
from .policy import Policy
from .slicelimits import (
    Quotas,
    SliceLimits,
    Standing,
    group_quotas,
    is_watched,
    slice_limits,
)
from .state import SYNC_ACTOR, Published, StateStore
from .usage import Sample

Properties = tuple[tuple[str, str, Any], ...]
Group = dict[str, Any]


@dataclass(frozen=True)
class Action:
    """Limits to set on one user's slice; ``change`` is None when re-applying.

    ``watched``: the user's group is in watch mode: the change is recorded and
    told to admins only, and no limit is set (``properties`` are not sent).
    """

    uid: int
    user: str
    properties: Properties
    change: Change | None
    watched: bool = False


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
        # uid -> (tier, MemoryMax sent, the tier's target) of users in a tier
        self.memory_in_force: dict[int, tuple[str, int, int]] = {}
        self.scores: dict[int, UserScore] = {}  # the standings the last cycle judged
        self.recorded = 0  # users whose standing the last cycle wrote
        self.set_policy(policy)

    def set_policy(self, policy: Policy) -> None:
        compiled = policy.compile()  # first: a policy that fails to compile changes nothing
        self.policy = policy
        self.compiled = compiled
        self._quotas: dict[str, Quotas] = {}  # group name -> its quotas, under this policy

    def _group_quotas(self, group: Group) -> Quotas:
        """group_quotas, worked out once a group: a cycle asks it of every user."""
        quotas = self._quotas.get(group["name"])
        if quotas is None:
            quotas = self._quotas[group["name"]] = group_quotas(group, self.memory_total)
        return quotas

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
        quotas = self._group_quotas(group)
        if quotas.cpu_usec is None and quotas.memory_max is None:
            # nothing to measure against, and nothing a tier could lower
            return None, f"group {group['name']} sets neither CPUQuota nor MemoryMax"
        return group, ""

    def watched(self, uid: int) -> bool:
        """True if the user's penalties are watched only (their group's mode); False if unknown."""
        try:
            return is_watched(decide(self.compiled, self.lookup(uid)).group)
        except CgpolicyError:
            return False

    def whitelist(self, account: Account) -> frozenset[str]:
        group = decide(self.compiled, account).group
        return frozenset(self.policy.whitelist) | frozenset(group["whitelist"] if group else ())

    def standing(self, uid: int, state: UserScore | None) -> Standing:
        """The user's tier as recorded, and the MemoryMax sent on the way down to it."""
        tier = state.tier if state else None
        sent = self.memory_in_force.get(uid)
        return Standing(tier, sent[1] if sent and sent[0] == tier else None)

    def limits(
        self, account: Account, state: UserScore | None, current: int | None = None
    ) -> SliceLimits:
        """What the user's slice should have now (slicelimits.slice_limits); records nothing.

        ``current`` is the slice's memory now (bytes); a tier's MemoryMax never goes
        below it plus a margin. Whoever acts on the result records it (``remember``).
        """
        standing = self.standing(account.uid, state)
        return slice_limits(self.compiled, account, standing, self.memory_total, current)

    def remember(self, uid: int, limits: SliceLimits) -> bool:
        """Record the MemoryMax a tier's limits set, for the next step; True if it moved."""
        before = self.memory_in_force.get(uid)
        if limits.tier is not None and limits.memory_max is not None:
            assert limits.memory_target is not None  # set together by slice_limits
            self.memory_in_force[uid] = (limits.tier, limits.memory_max, limits.memory_target)
        else:
            self.memory_in_force.pop(uid, None)
        return self.memory_in_force.get(uid) != before

    def _stepping(self, uid: int) -> bool:
        """The user's MemoryMax is still above their tier's (one of memory_stepping())."""
        found = self.memory_in_force.get(uid)
        return found is not None and found[1] > found[2]

    def memory_stepping(self) -> dict[int, tuple[int, int]]:
        """Users whose MemoryMax is still above their tier's: uid -> (in force, target)."""
        return {
            uid: (sent, target)
            for uid, (_tier, sent, target) in self.memory_in_force.items()
            if self._stepping(uid)
        }

    def _tier(self, name: str) -> Tier | None:
        return self.policy.penalty.find(name) if self.policy.penalty else None

    def cycle(
        self,
        samples: Mapping[int, Sample],
        now: float,
        memory: Mapping[int, int] | None = None,
        longest_step: float | None = None,
    ) -> list[Action]:
        """One evaluation of every sampled user; ``now`` is epoch seconds.

        ``memory`` is the slices' current memory (bytes) where it was read; the
        samples' memory stands in elsewhere. A sample's interval counts for at most
        ``longest_step`` seconds, by default two of the policy's intervals; a replay
        of recorded usage passes the recorded interval's, or an average's span.
        StateError when the standings cannot be recorded: then the engine is as
        before the call. ``recorded`` says how many users' standings were written.
        """
        memory = memory or {}
        self.scores = {}
        self.recorded = 0
        penalty = self.policy.penalty
        if penalty is None:
            return []
        kept = dict(self.memory_in_force)
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
            quotas = self._group_quotas(group)
            old = self.store.get(uid) or UserScore()
            judged.add(uid)
            new, change = evaluate(
                old,
                _reading(sample.cores),
                quotas.cores,
                _reading(sample.memory_bytes),
                quotas.memory_max,
                now,
                self._elapsed(sample.interval, longest_step),
                self.policy.badness,
                penalty,
            )
            watched = is_watched(group)
            if change is not None and watched:
                change = replace(change, watched=True)
            self.scores[uid] = new
            if new != old:
                recorded.append((uid, account.name, new, change))
            current = memory.get(uid, sample.memory_bytes)
            stepping = change is None and new.tier is not None and self._stepping(uid)
            if (change is not None and change.kind != "forgiven") or stepping:
                limits = self.limits(account, new, current)
                if self.remember(uid, limits) or change is not None:
                    actions.append(Action(uid, account.name, limits.properties, change, watched))
        actions += self._release_expired(now, skip=judged, recorded=recorded)
        if recorded:
            try:
                self.store.record_many(recorded, now=now)
            except StateError:  # nothing unrecorded is acted on, nor kept for the next step
                self.memory_in_force = kept
                self.scores = {}
                raise
            self.recorded = len(recorded)
        return actions

    def _elapsed(self, interval: float, longest: float | None) -> float:
        """At most two intervals: a stall, a suspend or a clock step is not one long step."""
        return min(interval, 2 * self.policy.general.interval if longest is None else longest)

    def _release_expired(
        self, now: float, skip: set[int], recorded: list[tuple[int, str, UserScore, Change | None]]
    ) -> list[Action]:
        """End the penalties of users who were not sampled (logged out, daemon down)."""
        actions = []
        for row in self.store.expired(now):
            if row.uid in skip:
                continue  # evaluate() released them
            watched = self.watched(row.uid)
            new, change = self._released(row.state, now, "penalty expired", watched)
            recorded.append((row.uid, row.user, new, change))
            self.memory_in_force.pop(row.uid, None)
            try:
                props = self.limits(self.lookup(row.uid), new).properties
            except CgpolicyError:
                props = ()
            actions.append(Action(row.uid, row.user, props, change, watched))
        return actions

    @staticmethod
    def _released(
        state: UserScore, now: float, reason: str, watched: bool = False
    ) -> tuple[UserScore, Change]:
        new = replace(
            state, tier=None, tier_expiry=None, cpu_badness=0.0, memory_badness=0.0, zero_since=now
        )
        return new, Change(
            "released", state.tier, None, state.occurrences, state.occurrences, reason, watched
        )

    def reconcile(self, now: float, reached: Mapping[int, Standing] | None = None) -> list[Action]:
        """At start-up: penalties in force come back, expired ones end.

        ``reached`` is the MemoryMax each penalty had stepped down to before (the
        hook's copy): the step goes on from there, not from the group's limit again.
        """
        actions = []
        for row in self.store.in_penalty(now):
            try:
                account = self.lookup(row.uid)
            except CgpolicyError:
                continue
            before, tier = (reached or {}).get(row.uid), row.state.tier
            if before and tier and before.tier == tier and before.memory_max is not None:
                # the target is the tier's, set by remember below
                self.memory_in_force[row.uid] = (tier, before.memory_max, 0)
            limits = self.limits(account, row.state)
            self.remember(row.uid, limits)
            watched = is_watched(limits.decision.group)
            actions.append(Action(row.uid, row.user, limits.properties, None, watched))
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
        if group is not None and is_watched(group):
            why = f"group {group['name']} is in watch mode (penalty mode)"
        if group is None or is_watched(group):
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
        limits = self.limits(account, new, current)  # a new tier steps down from the group's
        self.remember(uid, limits)
        return Action(uid, account.name, limits.properties, change)

    def adopt(
        self, winners: Sequence[Published], now: float, memory: Mapping[int, int] | None = None
    ) -> list[Action]:
        """Take other nodes' winning standings (sync.py) as this node's, in one transaction;
        the actions of those that change something here. ``memory``: slices' memory now.

        Recorded under the actor "sync:<node>", so that they are neither published back
        nor mailed (the origin node mails), and their occurrences are not counted again.
        A user this node could not penalize, or a tier its policy lacks, is passed over.
        """
        recorded: list[tuple[int, str, UserScore, Change | None]] = []
        actors: dict[int, str] = {}
        taken: list[tuple[Account, UserScore, bool]] = []
        for shared in winners:
            try:
                account = self.lookup(shared.uid)
            except CgpolicyError:
                continue
            group, _ = self._judged_group(account)
            if group is None:
                continue
            old = self.store.get(shared.uid) or UserScore()
            adopted = self._adopted(shared, old, now, is_watched(group))
            if adopted is None:
                continue
            recorded.append((shared.uid, account.name, *adopted))
            actors[shared.uid] = SYNC_ACTOR + shared.origin
            taken.append((account, adopted[0], is_watched(group)))
        if recorded:
            self.store.record_many(recorded, now=now, actors=actors)
        actions = []
        for (account, new, watched), (_, _, _, change) in zip(taken, recorded, strict=True):
            if new.tier is None:
                self.memory_in_force.pop(account.uid, None)
            limits = self.limits(account, new, (memory or {}).get(account.uid))
            self.remember(account.uid, limits)
            actions.append(Action(account.uid, account.name, limits.properties, change, watched))
        return actions

    def _adopted(
        self, shared: Published, old: UserScore, now: float, watched: bool
    ) -> tuple[UserScore, Change] | None:
        """The standing and change that adopting ``shared`` makes of ``old``; None: none."""
        if shared.tier is not None and (shared.tier_expiry or 0) > now:
            if self._tier(shared.tier) is None:
                return None  # a tier this node's policy lacks: its own standing stays
            if (old.tier, old.tier_expiry) == (shared.tier, shared.tier_expiry):
                return None
            occurrences = max(old.occurrences, shared.occurrences)
            new = replace(
                old,
                tier=shared.tier,
                tier_expiry=shared.tier_expiry,
                occurrences=occurrences,
                cpu_badness=0.0,
                memory_badness=0.0,
                zero_since=None,
            )
            reason = f"on {shared.origin}"
            change = Change(
                "penalized", old.tier, shared.tier, old.occurrences, occurrences, reason, watched
            )
            return new, change
        if shared.released is not None and old.tier is not None:
            return self._released(old, now, f"released on {shared.origin}", watched)
        return None  # an expired standing: this node's own expiry ends it

    def release(self, uid: int, actor: str, now: float) -> Action:
        """An admin ends a user's penalty now; NotPenalized when there is none."""
        account = self.lookup(uid)
        old = self.store.get(uid) or UserScore()
        if old.tier is None:
            raise NotPenalized(
                f"{account.name} (uid {uid}) is in no penalty tier; nothing to release"
            )
        watched = self.watched(uid)
        new, change = self._released(old, now, f"by {actor}", watched)
        self.store.record(uid, account.name, new, change, actor, now=now)
        self.memory_in_force.pop(uid, None)
        return Action(uid, account.name, self.limits(account, new).properties, change, watched)
