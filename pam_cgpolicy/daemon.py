"""cgpolicyd: re-evaluates every user's usage and moves repeat offenders through penalties.

Every ``interval`` it samples each user slice (usage.py), lets the engine judge
the samples (engine.py: badness, tiers, recorded in SQLite before acting), sets
the resulting limits through systemd, and keeps the hook's copy of the
penalties in force up to date. It answers admins and users on the system bus
(dbusapi.py). A slice that appears without the PAM hook (cron, systemd-run,
lingering) gets its limits at the next sample. SIGHUP reloads the policy, and
so does an edit of the policy files; a policy with errors is refused and the
old one stays in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from dbus_fast import BusType
from dbus_fast.aio import MessageBus

from . import control, log
from .accounts import Account, is_admin, lookup_account, lookup_uid
from .classify import decide
from .clockstep import ClockWatch, boot_clock
from .compiled import fingerprint, save_penalties
from .constants import MAIN_FILE, config_dir, penalties_file, state_db_file, system_bus_address
from .engine import Action, Engine
from .errors import CgpolicyError, NotManaged, policy_error
from .policy import Policy, load_policy
from .salvage import open_or_salvage
from .setprops import set_slice_properties
from .state import StateStore
from .systemd import Systemd
from .usage import UsageSampler

BUS_TIMEOUT = 10.0


def memory_total(meminfo: str = "/proc/meminfo") -> int:
    with open(meminfo) as source:
        for line in source:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise CgpolicyError(f"{meminfo} has no MemTotal")


RETRY = "retry"  # the actor of a cycle's reload of files it refused before


class Daemon:
    """The daemon's state and the ManagerCore behind its D-Bus API."""

    def __init__(
        self, policy: Policy, store: StateStore, systemd: Systemd, sampler: UsageSampler
    ) -> None:
        self.store = store
        self.systemd = systemd
        self.sampler = sampler
        self.engine = Engine(policy, store, memory_total(), self._account)
        self.known: set[int] = set()  # slices that have had their limits from us
        self.service: Any = None  # the D-Bus service, once serving
        self.marks = fingerprint(config_dir())  # the policy files as last loaded
        self.refused: list[str] = []  # the problems of the files, while they are refused
        self.locks: dict[int, asyncio.Lock] = {}  # one send at a time per uid
        self.pending: set[int] = set()  # uids whose last send failed: retried every cycle
        self.stepped: set[int] = set()  # users whose MemoryMax was above target this cycle
        self.clock = ClockWatch()

    @property
    def policy(self) -> Policy:
        return self.engine.policy

    @staticmethod
    @functools.lru_cache(maxsize=65536)
    def _account(uid: int) -> Account:
        return lookup_uid(uid)

    async def _emit_tier(self, action: Action) -> None:
        if self.service is not None and action.change is not None:
            await self.service.emit_tier_changed(
                action.user, action.change.old_tier, action.change.new_tier, action.change.reason
            )

    async def apply(self, actions: list[Action], actor: str | None = None) -> None:
        """Refresh the hook's copy, then set each action's limits, log it, and tell the bus."""
        if actions:  # first: a login meanwhile must not undo a fresh tier
            self.write_penalties()
        for action in actions:
            await self.send(action.uid, action.user)
            change = action.change
            step = self.engine.memory_stepping().get(action.uid)
            memory = {"memory_max": step[0], "memory_target": step[1]} if step else {}
            if change is None:
                log.info(
                    log.fields(
                        user=action.user,
                        uid=action.uid,
                        event="memory-step" if action.uid in self.stepped else "reapplied",
                        tier=self._tier_of(action.uid),
                        **memory,
                    )
                )
                continue
            log.info(
                log.fields(
                    user=action.user,
                    uid=action.uid,
                    event=change.kind,
                    tier=change.new_tier or "-",
                    expiry=self._expiry_of(action.uid),
                    reason=change.reason,
                    actor=actor or None,
                    **memory,
                )
            )
            await self._emit_tier(action)

    async def send(self, uid: int, user: str) -> None:
        """Set the limits of the standing recorded now, never interleaved with another for uid.

        Computed under the lock, so an admin's action that landed meanwhile is never undone.
        """
        async with self.locks.setdefault(uid, asyncio.Lock()):
            try:
                props = self.engine.properties(self._account(uid), self.store.get(uid))
            except CgpolicyError as err:  # an account gone: nothing to send, nor to retry
                log.error(log.fields(user=user, uid=uid, action="failed", error=err))
                return
            try:
                if props:
                    await asyncio.to_thread(
                        set_slice_properties, uid, props, BUS_TIMEOUT, system_bus_address()
                    )
            except CgpolicyError as err:
                self.pending.add(uid)
                log.error(
                    log.fields(user=user, uid=uid, action="failed", error=err, retry="next-cycle")
                )
                return
            self.pending.discard(uid)

    def _tier_of(self, uid: int) -> str:
        state = self.store.get(uid)
        return state.tier if state and state.tier else "-"

    def _expiry_of(self, uid: int) -> str:
        state = self.store.get(uid)
        return f"{state.tier_expiry:.1f}" if state and state.tier_expiry else "-"

    def write_penalties(self) -> None:
        """The login hook's copy of the penalties in force (uid -> expiry, properties)."""
        now = time.time()
        penalties: dict[int, tuple[float, tuple[Any, ...]]] = {}
        for row in self.store.in_penalty(now):
            try:
                props = self.engine.properties(self._account(row.uid), row.state)
            except CgpolicyError:
                continue
            if row.state.tier_expiry is not None and props:
                penalties[row.uid] = (row.state.tier_expiry, props)
        try:
            save_penalties(penalties_file(), penalties)
        except OSError as err:
            log.error(f"cannot write {penalties_file()}: {err}")

    async def follow_clock(self, wall: float, boot: float) -> None:
        """If the wall clock was set since the last cycle, the recorded times move with it.

        Before anything is judged: a day forward must not end every penalty. Then
        the hook's copy and the penalized slices are set again, since a login in
        between read the copy against the stepped clock.
        """
        step = self.clock.step(wall, boot)
        if not step:
            self.clock.mark(wall, boot)
            return
        moved = self.store.shift_times(step)  # a failure here leaves the step to the next cycle
        self.clock.mark(wall, boot)
        log.info(log.fields(event="clock-step", step=f"{step:+.1f}", penalties_shifted=moved))
        rows = self.store.in_penalty(wall)
        self.write_penalties()
        for row in rows:
            await self.send(row.uid, row.user)

    async def cycle(self) -> None:
        self._account.cache_clear()  # group membership is at most one interval old
        await self.follow_clock(time.time(), boot_clock())
        marks = fingerprint(config_dir())
        if marks != self.marks or self.refused:
            # The hook reads the files at every login: follow an edit at once, so
            # that a slice never gets the old policy's limits over the new one's.
            # Refused files are retried each cycle: what failed may have been passing.
            await self.reload("policy files changed" if marks != self.marks else RETRY)
        for uid in sorted(self.pending):
            await self.send(uid, str(uid))
        uids = self.sampler.active_uids(self.policy.general.min_uid)
        await self._limit_new_slices(uids)
        if self.sampler.mode != "unified":  # on v2 the kernel freezes what enters a slice
            for uid, count in (await asyncio.to_thread(control.hold_frozen)).items():
                log.info(f'uid={uid} event=held tasks={count} reason="frozen, entered later"')
        whitelists: dict[int, frozenset[str]] = {}
        for uid in uids:
            with contextlib.suppress(CgpolicyError):
                whitelists[uid] = self.engine.whitelist(self._account(uid))
        self.sampler.match = self.policy.whitelist_match
        samples = self.sampler.sample(uids, whitelists, time.monotonic())
        self.stepped = set(self.engine.memory_stepping())
        memory = {}
        for uid in self.stepped:
            current = await self._memory_current(uid)
            if current is not None:
                memory[uid] = current
        await self.apply(self.engine.cycle(samples, time.time(), memory))

    async def _memory_current(self, uid: int) -> int | None:
        """The slice's memory as its cgroup counts it against MemoryMax; None if unread."""
        try:
            status = await control.slice_status(self.systemd, uid)
        except CgpolicyError:
            return None
        value = status.get("usage", {}).get("MemoryCurrent")
        return value if isinstance(value, int) else None

    async def _limit_new_slices(self, uids: list[int]) -> None:
        """Slices that came without a login through the hook get their limits too."""
        fresh = [uid for uid in uids if uid not in self.known]
        self.known = set(uids)
        for uid in fresh:
            await self.send(uid, str(uid))

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                await self.cycle()
            except CgpolicyError as err:
                log.error(log.fields(event="cycle-failed", error=err))
            except Exception as err:  # one bad cycle must not end the daemon
                log.error(
                    log.fields(event="cycle-failed", error=f"internal: {type(err).__name__}: {err}")
                )
            wait = self.policy.general.interval - (time.monotonic() - started)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(wait, 0.1))

    # --- ManagerCore: what the D-Bus API calls ---

    async def get_user(self, name: str) -> dict[str, Any]:
        account = lookup_account(name)
        decision = decide(self.engine.compiled, account)
        state = self.store.get(account.uid)
        info: dict[str, Any] = {
            "user": account.name,
            "uid": account.uid,
            "group": decision.group["name"] if decision.group else None,
        }
        if state is not None:
            info.update(
                tier=state.tier,
                tier_expiry=state.tier_expiry,
                occurrences=state.occurrences,
                cpu_badness=state.cpu_badness,
                memory_badness=state.memory_badness,
            )
        step = self.engine.memory_stepping().get(account.uid)
        if step is not None:
            info.update(memory_max_in_force=step[0], memory_max_target=step[1])
        status = await control.slice_status(self.systemd, account.uid)
        if status.get("active"):
            info["limits"] = {k: str(v) for k, v in status["limits"].items()}
            info["frozen"] = status["freezer"] == "frozen"
        return info

    async def list_users(self) -> list[dict[str, Any]]:
        uids = set(self.store.all()) | set(self.sampler.active_uids(self.policy.general.min_uid))
        users = []
        for uid in sorted(uids):
            with contextlib.suppress(CgpolicyError):
                users.append(await self.get_user(self._account(uid).name))
        return users

    async def freeze(self, name: str, actor: str) -> None:
        await self._freezer(name, actor, control.freeze_user, "frozen")

    async def thaw(self, name: str, actor: str) -> None:
        await self._freezer(name, actor, control.thaw_user, "running")

    async def _freezer(self, name: str, actor: str, act: Any, state: str) -> None:
        account = lookup_account(name)
        decision = decide(self.engine.compiled, account)
        # Thaw stays open below min_uid: a session frozen before a policy change is never stranded.
        if account.uid == 0 or (state == "frozen" and decision.action == "skipped"):
            raise NotManaged(f"{name} (uid {account.uid}) is never frozen: {decision.reason}")
        how = await act(self.systemd, account.uid)
        log.info(
            log.fields(
                user=name, uid=account.uid, event=state, via=how.replace(" ", "-"), actor=actor
            )
        )
        if self.service is not None:
            await self.service.emit_freezer_changed(name, state)

    async def penalize(self, name: str, tier: str, actor: str) -> None:
        account = lookup_account(name)
        self.engine.check_penalize(account.uid, tier)  # refusals before systemd is asked
        current = await self._memory_current(account.uid)
        action = self.engine.penalize(account.uid, tier, actor, time.time(), current)
        await self.apply([action], actor)

    async def release(self, name: str, actor: str) -> None:
        account = lookup_account(name)
        await self.apply([self.engine.release(account.uid, actor, time.time())], actor)

    async def reload(self, actor: str) -> list[str]:
        self.marks = fingerprint(config_dir())
        try:  # any failure, even a bug, is an invalid policy: the old one stays
            policy = load_policy(Path(config_dir()))
            self.engine.set_policy(policy)
        except Exception as err:
            problems = [str(p) for p in policy_error(err, main_file()).problems]
            if actor != RETRY or problems != self.refused:  # not the same at every cycle
                log.error(
                    log.fields(
                        event="reload-refused",
                        actor=actor,
                        policy="old",
                        errors="; ".join(problems),
                    )
                )
            self.refused = problems
            return problems
        self.refused = []
        self._account.cache_clear()
        self.known = set()  # every slice gets the new policy's limits at the next cycle
        self.write_penalties()
        log.info(log.fields(event="reloaded", actor=actor, groups=len(policy.groups)))
        return []

    async def is_admin(self, uid: int) -> bool:
        # Not the cached account: a member taken out of the group loses the right at once.
        try:
            account = await asyncio.to_thread(lookup_uid, uid)
        except CgpolicyError:
            return False
        return is_admin(account, self.policy.general.admin_group)


async def serve_forever() -> int:
    log.open_log("cgpolicyd")
    try:
        policy = load_policy(Path(config_dir()))
        policy.compile()
    except Exception as err:  # even a bug: said in the log, and systemd restarts us
        problems = policy_error(err, main_file()).problems
        log.error("cannot start, the policy is invalid: " + "; ".join(str(p) for p in problems))
        return 1
    store, salvage = open_or_salvage(state_db_file())
    if salvage is not None:
        log.error("the state database was damaged; moved aside and salvaged: " + salvage.summary())
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    daemon = Daemon(policy, store, Systemd(bus, BUS_TIMEOUT), UsageSampler())
    actions = daemon.engine.reconcile(time.time())
    await daemon.apply(actions)
    daemon.write_penalties()
    log.info(
        f"started: {len(policy.groups)} groups, interval {policy.general.interval:g}s, "
        f"{sum(1 for a in actions if a.change is None)} penalties in force re-applied, "
        f"{sum(1 for a in actions if a.change is not None)} expired ones ended"
    )

    from .dbusapi import serve  # after start-up work: the name is taken last

    daemon.service = await serve(bus, daemon)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(daemon.reload("SIGHUP")))
    lost = asyncio.Event()

    async def watch_bus() -> None:
        # Without the bus there is no API and no systemd: exit, and let systemd
        # (Restart=always) start a daemon that reconnects.
        with contextlib.suppress(Exception):
            await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
        lost.set()
        stop.set()

    watcher = asyncio.create_task(watch_bus())
    try:
        await daemon.run(stop)
    finally:
        watcher.cancel()
        daemon.service.stop()
        bus.disconnect()
        store.close()
        log.info("lost the system bus; exiting to be restarted" if lost.is_set() else "stopped")
    return 1 if lost.is_set() else 0


def main_file() -> str:
    return os.path.join(config_dir(), MAIN_FILE)


def main() -> int:
    return asyncio.run(serve_forever())


if __name__ == "__main__":
    sys.exit(main())
