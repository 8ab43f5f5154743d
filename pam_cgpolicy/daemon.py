"""cgpolicyd: re-evaluates every user's usage and moves repeat offenders through penalties.

Every ``interval`` it samples each user slice (usage.py), lets the engine judge
the samples (engine.py: badness, tiers, recorded in SQLite before acting), sets
the resulting limits through systemd, and keeps the hook's copy of the
penalties in force up to date. It answers admins and users on the system bus
(dbusapi.py). A slice that appears without the PAM hook (cron, systemd-run,
lingering) gets its limits at the next sample. SIGHUP reloads the policy, and
so does an edit of the policy files; a policy with errors is refused and the
old one stays in force.

It always starts: on policy files with errors it runs on the last good policy
(saved by each load that succeeds, daemon sections included), and with no
valid policy ever saved it limits nobody; either way it says so in its log and
in Status, and retries the files every cycle. Everything it reads or writes
outside itself (clock, systemd, NSS, files, usage) is passed in, so tests
build it without a system.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dbus_fast import BusType
from dbus_fast.aio import MessageBus

from . import control, log, metrics, network
from .accounts import Account, Accounts, is_admin
from .badness import UserScore
from .classify import decide
from .clockstep import STEP_MIN, ClockWatch, boot_clock
from .compiled import fingerprint, read_last_good, read_penalties, save, save_penalties
from .constants import (
    MAIN_FILE,
    compiled_policy_file,
    config_dir,
    penalties_file,
    state_db_file,
    state_dir,
    system_bus_address,
    usage_db_file,
)
from .engine import Action, Engine, Properties
from .errors import (
    CgpolicyError,
    NotManaged,
    StateError,
    SystemdError,
    UnknownUser,
    policy_error,
)
from .mail import deliver
from .notifier import Deliver, Notifier, Png, facts_for, no_png
from .policy import General, Policy, StatusGroup, Sync, load_policy
from .report import report_from_files
from .salvage import last_salvage, open_or_salvage
from .setprops import NO_BUSCTL, set_slice_properties
from .slicelimits import SliceLimits, Standing, physical_memory
from .state import SYNC_ACTOR, StateStore
from .sync import Exchange, Sharing
from .systemd import Systemd
from .usage import Sample, UsageSampler
from .usagehistory import TOP_PROCESSES, UsageHistory, UsagePoint

BUS_TIMEOUT = 10.0
PLOT_SPAN = 3600.0  # seconds of usage a penalty mail shows
# systemd calls in flight at once for ListUsers: quick, without crowding the bus.
SLICE_READS = 32

# What cgpolicyd runs on when no valid policy was ever saved: one exempt group.
NOBODY_LIMITED = "no-valid-policy"
NO_POLICY = Policy(
    General(),
    (),
    NOBODY_LIMITED,
    {
        NOBODY_LIMITED: StatusGroup(
            NOBODY_LIMITED, "no valid policy: nobody is limited", exempt=True
        )
    },
)

Writer = Callable[[int, Properties], None]  # sets a user slice's properties through systemd


RETRY = "retry"  # the actor of a cycle's reload of files it refused before


def system_writer(uid: int, props: Properties) -> None:
    set_slice_properties(uid, props, BUS_TIMEOUT, system_bus_address())


class Daemon:
    """The daemon's state and the ManagerCore behind its D-Bus API.

    ``policy`` None: no valid policy at all; it runs on NO_POLICY meanwhile.
    ``refused``: the problems of the policy files when it starts without them.
    The keyword arguments are the outside world; each defaults to the node's.
    """

    def __init__(
        self,
        policy: Policy | None,
        store: StateStore,
        systemd: Systemd,
        sampler: UsageSampler,
        *,
        refused: list[str] | None = None,
        write: Writer = system_writer,
        clock: Callable[[], float] = time.time,
        ticks: Callable[[], float] = time.monotonic,
        accounts: Accounts | None = None,
        memory: int | None = None,
        config: str | None = None,
        penalties: str | None = None,
        last_good: str | None = None,
        history: UsageHistory | None = None,
        mailer: Deliver = deliver,
        plot: Png = no_png,
        sync_db: Callable[[Sync], Exchange] | None = None,
        tcp_refused: Callable[[], OSError | None] = network.refused,
    ) -> None:
        self.store = store
        self.history = history  # None: no usage history (it could not be opened)
        self.history_error: str | None = None  # the last failure logged, not repeated
        self.systemd = systemd
        self.sampler = sampler
        self.write = write
        self.clock = clock
        self.ticks = ticks
        self.accounts = accounts or Accounts()
        self.config_dir = config or config_dir()
        self.penalties_file = penalties or penalties_file()
        self.last_good_file = last_good or compiled_policy_file()
        self.cached: dict[int, Account] = {}  # accounts of this cycle
        self.engine = Engine(
            policy or NO_POLICY,
            store,
            physical_memory() if memory is None else memory,
            self._account,
        )
        self.has_policy = policy is not None  # False until a valid policy is loaded
        self.started = clock()
        self.salvage: str | None = None  # what a damaged state database gave back
        self.known: set[int] = set()  # slices that have had their limits from us
        self.service: Any = None  # the D-Bus service, once serving
        self.marks = fingerprint(self.config_dir)  # the policy files as last loaded
        # The files' problems while they are refused; retried every cycle.
        self.refused: list[str] = list(refused or ([] if policy else ["no valid policy loaded"]))
        self.locks: dict[int, asyncio.Lock] = {}  # one send at a time per uid
        self.pending: set[int] = set()  # uids whose last send failed: retried every cycle
        self.stepped: set[int] = set()  # users whose MemoryMax was above target this cycle
        self.clock_watch = ClockWatch()  # notices a step of the wall clock
        # The state database locked by another process or on a full disk; busctl gone.
        self.unwritable = log.Outage("state-unwritable", "state-writable")
        self.no_busctl = log.Outage("busctl-missing", "busctl-found")
        self.notifier = Notifier(
            store, lambda: self.policy.notify, png=plot, send=mailer, clock=clock
        )
        self.samples: dict[int, Sample] = {}  # the last cycle's, for its metrics
        self.reloads = self.reload_errors = self.cycle_failures = 0  # since start
        self.exposition: bytes | None = None  # the last cycle's metrics
        self.textfile = metrics.TextfileWriter()
        self.sync_db = sync_db or _sync_db  # opens the sync group's database
        self.sharing: Sharing | None = None  # [sync] is set: this node's side of it
        self.sync_settings: Sync | None = None  # the [sync] that ``sharing`` was made for
        # An admin's penalize or release, to share before the interval ends: the group
        # then has it within one interval, not two.
        self.share_due = asyncio.Event()
        self.tcp_refused = tcp_refused  # why this process may not open TCP sockets, if so
        self.follow_sync()

    @property
    def policy(self) -> Policy:
        return self.engine.policy

    def _account(self, uid: int) -> Account:
        """The account as NSS gave it this cycle: group membership at most one interval old."""
        account = self.cached.get(uid)
        if account is None:
            account = self.cached[uid] = self.accounts.by_uid(uid)
        return account

    async def _emit_tier(
        self, action: Action, limits: str | None, actor: str | None, watched: bool = False
    ) -> None:
        """Tell the bus and the mail queue of a tier change: the one place both learn of it.

        ``watched``: a change watch mode only recorded; its mail goes to admins alone.
        """
        change = action.change
        if change is None:
            return
        # the node where an adopted change began mails it
        if not (actor or "").startswith(SYNC_ACTOR):
            try:  # a mail never fails the change it tells of
                facts = facts_for(
                    self.policy,
                    action.user,
                    action.uid,
                    change,
                    self.store.get(action.uid),
                    limits,
                    actor=actor,
                    watched=watched,
                    host=self.notifier.host,
                    when=self.clock(),
                )
                if facts is not None:
                    self.notifier.notify(facts)
            except Exception as err:
                log.error(
                    "mail-failed",
                    log.fields(user=action.user, uid=action.uid, event="mail-failed", error=err),
                    user=action.user,
                    uid=action.uid,
                )
        if self.service is not None and not watched:  # a watched tier is no one's business yet
            await self.service.emit_tier_changed(
                action.user, change.old_tier, change.new_tier, change.reason
            )

    def last_hour_png(self, uid: int) -> bytes | None:
        """The plot of the user's last hour for their mail; None without history. Runs in a
        worker thread: the files are opened there, read-only."""
        from .plot import usage_png  # matplotlib: only when a mail is written

        # Root's home is hidden from cgpolicyd: matplotlib keeps its cache in the state dir.
        os.environ.setdefault("MPLCONFIGDIR", os.path.join(state_dir(), "matplotlib"))
        now = self.clock()
        account = self.accounts.by_uid(uid)
        report = report_from_files(
            account, self.policy, self.engine.memory_total, now - PLOT_SPAN, now
        )
        return usage_png(report) if report.samples else None

    async def apply(self, actions: list[Action], actor: str | None = None) -> None:
        """Refresh the hook's copy, then set each action's limits, log it, and tell the bus."""
        if actions:  # first: a login meanwhile must not undo a fresh tier
            self.write_penalties()
        for action in actions:
            change = action.change
            if action.watched:  # watch mode: recorded and logged, no limit set
                if change is not None:  # None: a watched tier at start-up, nothing new
                    self._log_change(action, actor, limits="unchanged", watched="yes")
                    await self._emit_tier(action, None, actor or None, watched=True)
                continue
            sent = await self.send(action.uid, action.user)
            step = self.engine.memory_stepping().get(action.uid)
            memory = {"memory_max": step[0], "memory_target": step[1]} if step else {}
            # the limits systemd has now; a failed send was logged with those meant
            limits = sent.limits_text() if sent and not sent.error else None
            tier = self._tier_of(action.uid)
            in_tier = tier if tier != "-" else None
            if change is None:
                event = "memory-step" if action.uid in self.stepped else "reapplied"
                log.info(
                    event,
                    log.fields(
                        user=action.user,
                        uid=action.uid,
                        event=event,
                        tier=tier,
                        limits=limits,
                        **memory,
                    ),
                    user=action.user,
                    uid=action.uid,
                    tier=in_tier,
                )
                continue
            self._log_change(action, actor, limits=limits, **memory)
            await self._emit_tier(action, limits, actor or None)

    def _log_change(self, action: Action, actor: str | None, **more: Any) -> None:
        """The log line of a tier change (or forgiveness) and what it set."""
        change = action.change
        assert change is not None
        log.info(
            change.kind,
            log.fields(
                user=action.user,
                uid=action.uid,
                event=change.kind,
                tier=change.new_tier or "-",
                expiry=self._expiry_of(action.uid),
                limits=more.pop("limits"),
                reason=change.reason,
                actor=actor or None,
                **more,
            ),
            user=action.user,
            uid=action.uid,
            tier=change.new_tier,
        )

    async def send(self, uid: int, user: str) -> SliceLimits | None:
        """Set the limits of the standing recorded now, never interleaved with another for uid.

        Computed under the lock, so an admin's action that landed meanwhile is never
        undone. Returns what was meant, failed or not (its ``error``); None when nothing
        could be worked out (the account gone, or its standing unreadable: retried).
        A failure is logged and retried every cycle.
        """
        async with self.locks.setdefault(uid, asyncio.Lock()):
            try:
                account = self._account(uid)
                limits = self.engine.limits(account, self.store.get(uid))
            except CgpolicyError as err:
                if isinstance(err, UnknownUser):  # the account gone: nothing to send, nor to retry
                    self.pending.discard(uid)
                    retry = {}
                else:  # e.g. the state database unreadable for a moment
                    self.pending.add(uid)
                    retry = {"retry": "next-cycle"}
                text = log.fields(user=user, uid=uid, action="failed", error=err, **retry)
                log.error("failed", text, user=user, uid=uid)
                return None
            user = account.name  # callers that know only the uid pass it as the name
            try:
                if limits.properties:
                    await asyncio.to_thread(self.write, uid, limits.properties)
            except CgpolicyError as err:
                self.pending.add(uid)
                limits.fail(err)
                if isinstance(err, SystemdError) and err.name == NO_BUSCTL:
                    self.no_busctl.failed(err)  # the node's fault: Status lists who waits
                    return limits
                log.error(
                    "failed",
                    log.fields(
                        user=user,
                        uid=uid,
                        action="failed",
                        tier=limits.tier,
                        limits=limits.limits_text(),
                        error=err,
                        retry="next-cycle",
                    ),
                    user=user,
                    uid=uid,
                    tier=limits.tier,
                )
                return limits
            self.pending.discard(uid)
            if limits.properties:
                self.no_busctl.ended()
            return limits

    def _tier_of(self, uid: int) -> str:
        state = self.store.get(uid)
        return state.tier if state and state.tier else "-"

    def _expiry_of(self, uid: int) -> str:
        state = self.store.get(uid)
        return f"{state.tier_expiry:.1f}" if state and state.tier_expiry else "-"

    def write_penalties(self) -> None:
        """The login hook's copy of the penalties in force: uid -> (expiry, tier, MemoryMax,
        why).
        ."""
        now = self.clock()
        penalties: dict[int, tuple[float, str, int | None, str]] = {}
        for row in self.store.in_penalty(now):
            if self.engine.watched(row.uid):
                continue  # a watched tier lowers nothing, at login either
            standing = self.engine.standing(row.uid, row.state)
            if row.state.tier_expiry is not None and standing.tier is not None:
                why = self._why_penalized(row.uid, standing.tier)
                penalties[row.uid] = (
                    row.state.tier_expiry,
                    standing.tier,
                    standing.memory_max,
                    why,
                )
        try:
            save_penalties(self.penalties_file, penalties)
        except OSError as err:
            log.error("state-file-error", f"cannot write {self.penalties_file}: {err}")

    def _why_penalized(self, uid: int, tier: str) -> str:
        """For the user's login message: the tier's message, and what put them in it."""
        penalty = self.policy.penalty
        found = penalty.find(tier) if penalty else None
        said = found.message if found else ""
        event = next((e for e in self.store.history(uid, limit=20) if e.new_tier == tier), None)
        reason = event.reason if event else ""
        return f"{said} ({reason})" if said and reason else said or reason

    async def follow_clock(self, wall: float, boot: float) -> bool:
        """If the wall clock was set since the last cycle, the recorded times move with it.

        Before anything is judged: a day forward must not end every penalty. Then
        the hook's copy and the penalized slices are set again, since a login in
        between read the copy against the stepped clock. False when the times
        could not be moved: nothing may be judged by them until a later cycle has.
        """
        step = self.clock_watch.step(wall, boot)
        if not step:
            self.clock_watch.mark(wall, boot)
            return True
        try:
            moved = self.store.shift_times(step)
        except StateError as err:  # not marked: the next cycle sees the step again
            self.unwritable.failed(err)
            return False
        self.unwritable.ended()
        self.clock_watch.mark(wall, boot)
        text = log.fields(event="clock-step", step=f"{step:+.1f}", penalties_shifted=moved)
        log.info("clock-step", text)
        rows = self.store.in_penalty(wall)
        self.write_penalties()
        for row in rows:
            await self.send(row.uid, row.user)
        return True

    async def cycle(self) -> None:
        self.cached.clear()  # group membership is at most one interval old
        self.samples = {}
        # One reading judges the whole cycle: a step landing after it is seen whole
        # by the next cycle's follow_clock, before anything expires by it.
        now = self.clock()
        followed = await self.follow_clock(now, boot_clock())
        marks = fingerprint(self.config_dir)
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
                text = f'uid={uid} event=held tasks={count} reason="frozen, entered later"'
                log.info("held", text, uid=uid)
        whitelists: dict[int, frozenset[str]] = {}
        for uid in uids:
            with contextlib.suppress(CgpolicyError):
                whitelists[uid] = self.engine.whitelist(self._account(uid))
        self.sampler.match = self.policy.whitelist_match
        samples = self.samples = self.sampler.sample(uids, whitelists, self.ticks())
        self.stepped = set(self.engine.memory_stepping())
        memory = {}
        for uid in self.stepped:
            current = await self._memory_current(uid)
            if current is not None:
                memory[uid] = current
        actions: list[Action] = []
        if followed:
            try:
                actions = self.engine.cycle(samples, now, memory)
            except StateError as err:  # judged again next cycle from what is recorded
                self.unwritable.failed(err)
            else:
                if self.engine.recorded:
                    self.unwritable.ended()
        await asyncio.to_thread(self._record_usage, now, samples, actions)
        await self.apply(actions)

    def _record_usage(
        self, now: float, samples: Mapping[int, Sample], actions: list[Action]
    ) -> None:
        """The cycle's usage into the history; a failure is logged (once) and never
        stops the cycle: the history is for looking back, the penalties come first."""
        if self.history is None:
            return
        try:
            points = []
            for uid, sample in samples.items():
                if sample.interval is None or not (sample.cores or sample.memory_bytes):
                    continue  # no usage (or a first sample, with nothing to average)
                score = self.engine.scores.get(uid)
                points.append(
                    UsagePoint(
                        uid,
                        now,
                        sample.cores,
                        sample.memory_bytes,
                        score.cpu_badness if score else None,
                        score.memory_badness if score else None,
                        score.tier if score else None,
                        sample.interval,
                    )
                )
            violations = {
                a.uid: self.sampler.top_processes(a.uid, TOP_PROCESSES)
                for a in actions
                if a.change is not None and a.change.kind == "penalized"
            }
            self.history.record(now, points, violations, self.policy.history.retention)
        except Exception as err:  # even a bug: the cycle goes on
            error = f"{type(err).__name__}: {err}"
            if error != self.history_error:
                log.error("history-failed", log.fields(event="history-failed", error=error))
            self.history_error = error
        else:
            self.history_error = None

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
            started = self.ticks()
            try:
                await self.cycle()
            except CgpolicyError as err:
                self.cycle_failures += 1
                log.error("cycle-failed", log.fields(event="cycle-failed", error=err))
            except Exception as err:  # one bad cycle must not end the daemon
                self.cycle_failures += 1
                text = f"internal: {type(err).__name__}: {err}"
                log.error("cycle-failed", log.fields(event="cycle-failed", error=text))
            await self.share()
            await self.publish_metrics(self.ticks() - started)
            await self._rest(stop, started + self.policy.general.interval)

    async def _rest(self, stop: asyncio.Event, until: float) -> None:
        """Waits for the next cycle; an admin's change is shared as soon as it is made.

        Only this loop shares, so no two exchanges ever run at once."""
        wait = max(until - self.ticks(), 0.1)
        while not stop.is_set():
            waiters = [asyncio.ensure_future(e.wait()) for e in (stop, self.share_due)]
            try:
                await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
            if not self.share_due.is_set() or stop.is_set():
                return
            await self.share()
            wait = until - self.ticks()
            if wait <= 0:
                return

    def follow_sync(self) -> None:
        """Open (or close) the sync group's database as the policy's [sync] says."""
        settings = self.policy.sync
        if settings == self.sync_settings:
            return
        if self.sharing is not None:
            self.sharing.db.close()
        self.sync_settings = settings
        self.sharing = (
            None
            if settings is None
            else Sharing(self.sync_db(settings), settings.node, settings.group)
        )
        self.store.sharing = settings is not None
        self.share_own()

    def share_own(self) -> None:
        """Queue the standings this node gave and enforces, for the next share: those from
        before it shared (off, another group, a start) or from while they were watched.
        The merge rule makes a repeat harmless."""
        if self.sharing is None:
            return
        try:
            own = self.store.own_standings(self.clock())
            self.store.to_outbox([p for p in own if not self.engine.watched(p.uid)])
        except StateError as err:  # the state database's own trouble, logged by the cycle
            log.error("sync-failed", log.fields(event="sync-failed", error=err))

    async def share(self) -> None:
        """After each cycle: publish this node's tier changes to its sync group and adopt
        the group's. Never fails the cycle; the database away costs at most its timeout.
        It carries every change an admin made before it: none is due after it."""
        self.share_due.clear()
        try:
            self.follow_sync()
            if self.sharing is None:
                return
            now = self.clock()
            order = self.policy.penalty.order if self.policy.penalty else ()
            winners = await self.sharing.share(self.store, now, order)
            memory = {}
            for shared in winners:
                # a tier's MemoryMax never goes below what the slice uses now
                if shared.tier is not None and shared.uid in self.known:
                    current = await self._memory_current(shared.uid)
                    if current is not None:
                        memory[shared.uid] = current
            origins = {shared.uid: shared.origin for shared in winners}
            for action in self.engine.adopt(winners, self.clock(), memory):
                await self.apply([action], SYNC_ACTOR + origins[action.uid])
        except Exception as err:  # even a bug: enforcement goes on
            text = f"{type(err).__name__}: {err}"
            log.error("sync-failed", log.fields(event="sync-failed", error=text))

    async def publish_metrics(self, cycle_seconds: float) -> None:
        """The cycle's series, kept for Metrics and written for the node exporter.

        Never fails the cycle: a bug here is logged, a failed write logged once a kind.
        """
        try:
            tiers = self.policy.penalty.order if self.policy.penalty else ()
            users = metrics.user_series(
                self.samples, self.store.all(), self._account, self.engine.compiled, tiers
            )
            node = metrics.NodeSeries(
                tiers, cycle_seconds, self.reloads, self.reload_errors, self.cycle_failures
            )
            self.exposition = metrics.build(users, node)
            directory = self.policy.metrics.textfile_dir
            await asyncio.to_thread(self.textfile.write, directory, self.exposition)
        except Exception as err:
            text = f"{type(err).__name__}: {err}"
            log.error("metrics-failed", log.fields(event="metrics-failed", error=text))

    # --- ManagerCore: what the D-Bus API calls ---

    async def metrics(self) -> str:
        """The series of the last cycle, as written to the textfile collector's directory."""
        if self.exposition is None:
            raise CgpolicyError("cgpolicyd has not finished its first cycle yet; ask again")
        return self.exposition.decode()

    async def send_mail(self, actor: str) -> None:
        # The one sending path: the sender task, woken as by a mail cgpolicyd queued.
        self.notifier.wake.set()

    async def get_user(self, name: str) -> dict[str, Any]:
        account = self.accounts.by_name(name)
        status = await control.slice_status(self.systemd, account.uid)
        stepping = self.engine.memory_stepping()
        return self._user_info(account, self.store.get(account.uid), status, stepping)

    def _user_info(
        self,
        account: Account,
        state: UserScore | None,
        status: dict[str, Any] | None,
        stepping: dict[int, tuple[int, int]],
    ) -> dict[str, Any]:
        """GetUser's keys for ``account``; ``status`` is its slice's, None if unread;
        ``stepping`` is the engine's memory_stepping(), read once for a whole list."""
        decision = decide(self.engine.compiled, account)
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
        step = stepping.get(account.uid)
        if step is not None:
            info.update(memory_max_in_force=step[0], memory_max_target=step[1])
        if status and status.get("active"):
            info["limits"] = {k: str(v) for k, v in status["limits"].items()}
            info["frozen"] = status["freezer"] == "frozen"
        return info

    async def list_users(self) -> list[dict[str, Any]]:
        """GetUser's dictionary for every user stored or logged in.

        Thousands of users answer within the bus's deadline: NSS is read in one
        pass, systemd lists the user slices in one call, and only the slices it
        has loaded are read, several at once, while NSS is read.
        """
        stored = self.store.all()
        uids = set(stored) | set(self.sampler.active_uids(self.policy.general.min_uid))
        nss = asyncio.ensure_future(asyncio.to_thread(self.accounts.many, uids))
        try:
            paths = await self.systemd.user_slice_paths()
        except BaseException:
            await asyncio.gather(nss, return_exceptions=True)  # never a task left behind
            raise
        reads = asyncio.Semaphore(SLICE_READS)

        async def status(uid: int) -> dict[str, Any] | None:
            async with reads:
                try:
                    return await control.slice_status_at(self.systemd, uid, paths[uid])
                except CgpolicyError:  # gone since it was listed: shown without limits
                    return None

        loaded = sorted(uids & paths.keys())
        read, accounts = await asyncio.gather(asyncio.gather(*map(status, loaded)), nss)
        statuses = dict(zip(loaded, read, strict=True))
        stepping = self.engine.memory_stepping()
        return [
            self._user_info(accounts[uid], stored.get(uid), statuses.get(uid), stepping)
            for uid in sorted(accounts)
        ]

    def policy_in_force(self) -> str:
        """Which policy is in force: "files", "last good" (the files are refused) or "none"."""
        if not self.refused:
            return "files"
        return "last good" if self.has_policy else "none"

    async def status(self) -> dict[str, Any]:
        pending = []
        for uid in sorted(self.pending):
            try:
                pending.append(self._account(uid).name)
            except CgpolicyError:
                pending.append(str(uid))
        return {
            "policy": self.policy_in_force(),
            "problems": self.refused or None,
            "started": self.started,
            "pending": pending or None,
            "salvage": self.salvage,
            "users": len(self.store.all()),
            **(self.sharing.status() if self.sharing else {}),
        }

    async def freeze(self, name: str, actor: str) -> None:
        await self._freezer(name, actor, control.freeze_user, "frozen")

    async def thaw(self, name: str, actor: str) -> None:
        await self._freezer(name, actor, control.thaw_user, "running")

    async def _freezer(self, name: str, actor: str, act: Any, state: str) -> None:
        account = self.accounts.by_name(name)
        decision = decide(self.engine.compiled, account)
        # Thaw stays open below min_uid: a session frozen before a policy change is never stranded.
        if account.uid == 0 or (state == "frozen" and decision.action == "skipped"):
            raise NotManaged(f"{name} (uid {account.uid}) is never frozen: {decision.reason}")
        how = await act(self.systemd, account.uid)
        event = "frozen" if state == "frozen" else "thawed"
        log.info(
            event,
            log.fields(
                user=name, uid=account.uid, event=state, via=how.replace(" ", "-"), actor=actor
            ),
            user=name,
            uid=account.uid,
        )
        if self.service is not None:
            await self.service.emit_freezer_changed(name, state)

    async def penalize(self, name: str, tier: str, actor: str) -> None:
        account = self.accounts.by_name(name)
        self.engine.check_penalize(account.uid, tier)  # refusals before systemd is asked
        current = await self._memory_current(account.uid)
        action = self.engine.penalize(account.uid, tier, actor, self.clock(), current)
        await self.apply([action], actor)
        self.share_due.set()

    async def release(self, name: str, actor: str) -> None:
        account = self.accounts.by_name(name)
        await self.apply([self.engine.release(account.uid, actor, self.clock())], actor)
        self.share_due.set()

    async def apply_user(self, name: str, actor: str) -> str:
        """cgpolicyctl apply: the limits of the user's standing, set now; the log line.

        The standing is the one recorded, so a penalty in force stays in force.
        """
        account = self.accounts.by_name(name)
        sent = await self.send(account.uid, account.name)
        if sent is None:
            raise CgpolicyError(f"{name}: the account could not be read; nothing was set")
        line = sent.log_line()
        text = f"{line} {log.fields(actor=actor)}"
        log.info(sent.action, text, user=account.name, uid=account.uid, tier=sent.tier)
        if sent.error:
            raise sent.error
        return line

    async def reload(self, actor: str) -> list[str]:
        self.marks = fingerprint(self.config_dir)
        try:  # any failure, even a bug, is an invalid policy: the old one stays
            policy = load_policy(Path(self.config_dir))
            self.engine.set_policy(policy)
        except Exception as err:
            problems = refusal(err, self.config_dir)
            if actor != RETRY or problems != self.refused:  # not the same at every cycle
                self.reload_errors += 1
                log.error(
                    "reload-refused",
                    log.fields(
                        event="reload-refused",
                        actor=actor,
                        policy="old" if self.has_policy else "none",
                        errors="; ".join(problems),
                    ),
                )
            self.refused = problems
            return problems
        self.refused = []
        self.has_policy = True
        self.reloads += 1
        self.cached.clear()
        self.known = set()  # every slice gets the new policy's limits at the next cycle
        self.save_last_good()
        self.write_penalties()
        self.share_own()  # a group switched from watch to enforce
        log.info("reloaded", log.fields(event="reloaded", actor=actor, groups=len(policy.groups)))
        self.check_network()
        return []

    def check_network(self) -> None:
        """Say so when the policy in force needs TCP and the unit refuses it. Mail and sync
        then fail as they would anyway; the unit's families are fixed at its start."""
        sections = network.needs(self.policy)
        if not sections:
            return
        err = self.tcp_refused()
        if err is not None:
            text = log.fields(event="network-denied", error=err, fix=network.denied(sections))
            log.error("network-denied", text)

    def save_last_good(self) -> None:
        """The policy just loaded, compiled, for the hook and for a start on broken files."""
        try:
            save(self.last_good_file, self.engine.compiled, self.marks)
        except OSError as err:  # a copy not saved must not refuse a valid policy
            text = f"cannot save the last good policy in {self.last_good_file}: {err}"
            log.error("state-file-error", text)

    async def start(self) -> list[Action]:
        """Start-up: end expired penalties, re-apply those in force, refresh the hook's copy."""
        if self.has_policy and not self.refused:
            self.save_last_good()
        self.check_network()
        now = self.clock()
        self._follow_clock_back(now)
        actions = self.engine.reconcile(now, self._memory_reached())
        await self.apply(actions)
        self.write_penalties()
        return actions

    def _follow_clock_back(self, now: float) -> None:
        """At start: a wall clock behind the last standing recorded was set back while
        cgpolicyd was down. The recorded times move back by the least step that
        explains it, so no penalty has more left than it had at that record.

        A step forward cannot be told from time passing (the boot clock is not
        comparable across a reboot): penalties whose expiry has passed end.
        """
        try:
            latest = self.store.last_recorded()
            if latest is None or latest - now <= STEP_MIN:
                return
            moved = self.store.shift_times(now - latest)
        except StateError as err:  # the times stay as recorded; the live watch goes on
            self.unwritable.failed(err)
            return
        text = log.fields(
            event="clock-step", step=f"{now - latest:+.1f}", penalties_shifted=moved, seen="start"
        )
        log.info("clock-step", text)

    def _memory_reached(self) -> dict[int, Standing]:
        """Each penalty's MemoryMax on its way down, from the hook's copy of before a restart."""
        try:
            copy = read_penalties(self.penalties_file)
        except (OSError, ValueError) as err:  # unusable: the steps start again from the top
            log.error("state-file-error", f"cannot read {self.penalties_file}: {err}")
            return {}
        return {uid: Standing(entry[1], entry[2]) for uid, entry in copy.items()}

    async def is_admin(self, uid: int) -> bool:
        # Not the cached account: a member taken out of the group loses the right at once.
        try:
            account = await asyncio.to_thread(self.accounts.by_uid, uid)
        except CgpolicyError:
            return False
        return is_admin(account, self.policy.general.admin_group)


def _sync_db(settings: Sync) -> Exchange:
    from .syncdb import SyncDB  # psycopg2 only with [sync]

    return SyncDB(settings)


def refusal(err: Exception, config: str) -> list[str]:
    """Why the policy files in ``config`` were refused, one problem a line."""
    return [str(p) for p in policy_error(err, os.path.join(config, MAIN_FILE)).problems]


def starting_policy(config: str, last_good: str) -> tuple[Policy | None, list[str]]:
    """The policy to start on, and the files' problems when it is not theirs.

    The files when valid; else the last good policy saved; else None (no limits).
    """
    try:  # any failure, even a bug, is an invalid policy
        policy = load_policy(Path(config))
        policy.compile()
        return policy, []
    except Exception as err:
        problems = refusal(err, config)
    try:
        saved = read_last_good(last_good)
        return (None if saved is None else Policy.from_data(saved["policy"])), problems
    except Exception as err:  # unreadable or untrusted: as if there were none
        log.error("policy-error", f"the last good policy in {last_good} cannot be used: {err}")
        return None, problems


async def serve_forever() -> int:
    log.open_log("cgpolicyd")
    policy, problems = starting_policy(config_dir(), compiled_policy_file())
    if problems:
        log.error(
            "start-degraded",
            log.fields(
                event="start-degraded",
                policy="last good" if policy else "none",
                limits="last good policy's" if policy else "none applied: nobody is limited",
                errors="; ".join(problems),
            ),
        )
    store, salvage = open_or_salvage(state_db_file())
    if salvage is not None:
        text = "the state database was damaged; moved aside and salvaged: " + salvage.summary()
        log.error("salvaged", text)
    try:
        history: UsageHistory | None = UsageHistory.open(usage_db_file())
    except CgpolicyError as err:  # penalties work without it
        log.error("history-failed", log.fields(event="history-unavailable", error=err))
        history = None
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    daemon = Daemon(
        policy,
        store,
        Systemd(bus, BUS_TIMEOUT),
        UsageSampler(),
        refused=problems,
        history=history,
    )
    daemon.notifier.png = daemon.last_hour_png
    daemon.salvage = salvage.summary() if salvage else last_salvage(state_db_file())
    actions = await daemon.start()
    policy = daemon.policy
    log.info(
        "started",
        f"started: {len(policy.groups)} groups, interval {policy.general.interval:g}s, "
        f"policy {daemon.policy_in_force()}, "
        f"{sum(1 for a in actions if a.change is None)} penalties in force re-applied, "
        f"{sum(1 for a in actions if a.change is not None)} expired ones ended",
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
    sender = asyncio.create_task(daemon.notifier.run(stop))
    try:
        await daemon.run(stop)
    finally:
        watcher.cancel()
        await daemon.notifier.flush()  # mails being written reach the queue
        sender.cancel()
        daemon.service.stop()
        bus.disconnect()
        store.close()
        if history is not None:
            history.close()
        log.info(
            "stopped",
            "lost the system bus; exiting to be restarted" if lost.is_set() else "stopped",
        )
    return 1 if lost.is_set() else 0


def main() -> int:
    return asyncio.run(serve_forever())


if __name__ == "__main__":
    sys.exit(main())
