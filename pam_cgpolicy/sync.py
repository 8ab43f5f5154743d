"""Several login nodes, one standing: the merge rule and each node's share of it.

The nodes of a sync group share their penalties through one PostgreSQL
database (syncdb.py). Each node's SQLite state stays the record of what it
enforces; after each cycle cgpolicyd publishes the tier changes it made itself
(the outbox, kept in state.db in the transaction of the change, so a crash
loses none), reads what changed in the group since its last read, and adopts
the winners through Engine.adopt. Badness and the forgiving of occurrences
stay each node's own.

The merge rule, Arbiter2's: an expired standing loses; then the higher tier;
then more occurrences; then the newer. An admin's release ends every penalty
of the user begun before it, on every node, so a node that was away cannot
bring a released penalty back; a penalty begun after it wins as usual.

The database being away never stops enforcement: the loss is logged once,
the recovery once, and the outbox waits for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import log
from .errors import SyncError
from .state import SYNC_ACTOR, Published, StateStore


def is_active(standing: Published, now: float) -> bool:
    return standing.tier is not None and (standing.tier_expiry or 0) > now


def wins(a: Published, b: Published, now: float, order: Sequence[str]) -> bool:
    """Whether ``a`` beats ``b`` for the same user at ``now``; tiers ranked by ``order``."""
    if a.released is not None and is_active(b, now) and b.since <= a.released:
        return True
    if b.released is not None and is_active(a, now) and a.since <= b.released:
        return False
    return _rank(a, now, order) > _rank(b, now, order)


def _rank(s: Published, now: float, order: Sequence[str]) -> tuple[bool, int, int, float]:
    active = is_active(s, now)
    tier = order.index(s.tier) + 1 if active and s.tier in order else 0
    return active, tier, s.occurrences, s.since


def merge(
    current: Published | None, entries: Sequence[Published], now: float, order: Sequence[str]
) -> Published | None:
    """The group's standing after ``entries`` (oldest first) met ``current``;
    None when ``current`` stays."""
    winner = None
    for entry in entries:
        best = winner or current
        if best is None or wins(entry, best, now, order):
            winner = entry
    return winner


def actor_of(origin: str) -> str:
    """The actor an adopted standing is recorded under: never published again, never mailed."""
    return SYNC_ACTOR + origin


class Exchange:
    """What the database side does for one share (syncdb.SyncDB implements it)."""

    # after an exchange: another running node's instance that shares under this node's name
    duplicate: str | None = None

    def exchange(
        self, outbox: Sequence[Published], after: int, now: float, order: Sequence[str]
    ) -> tuple[list[Published], int]:
        """Publish ``outbox`` under the merge rule; return the group's standings changed
        since ``after`` (plus the winners that beat this node's entries) and the new mark."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


@dataclass
class Sharing:
    """This node's side of the sync: what it has read, and whether the database answers."""

    db: Exchange
    node: str
    group: str = ""
    mark: int = 0  # the group's change sequence as last read; 0 reads everything
    last_sync: float | None = None  # when an exchange last succeeded
    # the database away: logged once when it goes, once when it is back
    outage: log.Outage = field(init=False)
    # another cgpolicyd shares under this node's name: logged once, and once when it is gone
    clash: log.Outage = field(init=False)

    def __post_init__(self) -> None:
        self.outage = log.Outage("sync-down", "sync-up", node=self.node)
        self.clash = log.Outage("sync-duplicate", "sync-duplicate-gone", node=self.node)

    @property
    def down(self) -> str | None:
        """The error while the database is away."""
        return self.outage.error

    async def share(self, store: StateStore, now: float, order: Sequence[str]) -> list[Published]:
        """Publish the outbox and read the group's changes: the other nodes' standings to
        adopt. Nothing when the database is away (logged once); the outbox waits."""
        outbox = store.outbox()
        try:
            rows, mark = await asyncio.to_thread(
                self.db.exchange, [entry for _, entry in outbox], self.mark, now, order
            )
        except Exception as err:  # a bug too: the cycle and enforcement go on
            said = err if isinstance(err, SyncError) else f"{type(err).__name__}: {err}"
            self.outage.failed(said)
            return []
        if outbox:
            store.published(outbox[-1][0])
        self.mark = max(self.mark, mark)
        self.last_sync = now
        self.outage.ended()
        if self.db.duplicate is None:
            self.clash.ended()
        else:
            self.clash.failed(
                f"another cgpolicyd (instance {self.db.duplicate}) shares as node {self.node} "
                f"in group {self.group}: nodes of one name never adopt each other's standings; "
                "give each node its own [sync] node"
            )
        # Changed here meanwhile: this node's newer entry is published first next time.
        newer = {entry.uid for _, entry in store.outbox()}
        return [row for row in rows if row.origin != self.node and row.uid not in newer]

    def status(self) -> dict[str, object]:
        return {
            "sync": "down" if self.down else "ok",
            "sync_group": self.group,
            "sync_node": self.node,
            "sync_error": self.down,
            "sync_duplicate": self.clash.error,
            "last_sync": self.last_sync,
        }
