"""cgpolicyctl: the admin's command line.

When cgpolicyd runs, freeze, thaw and status go through it (so it records and
announces what changed, and status shows its tiers and badness); when it does
not, they go straight to systemd as before. penalize, release, reload and metrics
need cgpolicyd; history reads its state database, read-only. classify, status and
history show another user only to root and the policy's admin group.
replay (root) judges the usage history again under a candidate policy, in memory,
with cgpolicyd's own engine, beside the penalties recorded; it changes nothing.
Each user starts with no badness; admins' penalize and release are listed apart,
never replayed; where the history is kept as averages it says so, and times
there are to the bucket.
notify-test (root) sends its sample mail itself, to see the server's answer.

Exit codes: 0 success, 1 the action failed or the policy is invalid, 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from . import bus, control, evict, log, network
from .accounts import Account, Accounts, is_admin, lookup_account, lookup_uid
from .cgroups import CGROUP_ROOT, cgroup_mode
from .classify import decide, describe_limits
from .client import Daemon, daemon_running
from .compiled import Loaded, load_in_force, read_penalty
from .constants import (
    DAEMON_UNIT,
    DEFAULT_CONFIG_DIR,
    HOOK_PATH,
    MAIN_FILE,
    compiled_policy_file,
    config_dir,
    penalties_file,
    state_db_file,
    system_bus_address,
    usage_db_file,
)
from .errors import CgpolicyError, DaemonError, EvictError, PolicyError, SystemdError
from .freezer import V1Freezer
from .pamconfig import hook_wiring, user_env_before_hook
from .policy import Policy, Sync, load_policy
from .report import UsageReport, report_from_files, to_json
from .salvage import last_salvage
from .setprops import apply_limits
from .slicelimits import Standing, format_size, physical_memory, slice_limits
from .state import Event, StateStore
from .systemd import Systemd
from .usagehistory import UsageHistory

if TYPE_CHECKING:
    from .compiled import Compiled
    from .replay import Penalty, Replay

BUS_TIMEOUT = 10.0
NOT_RUNNING = "cgpolicyd is not running (start it with: systemctl start cgpolicyd)"

T = TypeVar("T")


class _Failed(Exception):
    """Stop the command with exit code 1 after the message was printed."""


def _strict_policy(args: argparse.Namespace) -> Policy:
    try:
        return load_policy(Path(config_dir(args.config_dir)))
    except PolicyError as err:
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        raise _Failed from None


def _load_in_force(args: argparse.Namespace) -> Loaded:
    """Only the node's own directory has, and may replace, the node's last good copy."""
    directory = config_dir(args.config_dir)
    own = os.path.realpath(directory) == os.path.realpath(DEFAULT_CONFIG_DIR)
    return load_in_force(directory, compiled_policy_file() if own else None)


def _policy_in_force(args: argparse.Namespace) -> Compiled:
    """What the hook would use; says so when the files are broken."""
    loaded = _load_in_force(args)
    if loaded.error:
        for problem in loaded.error.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(
            f"warning: the policy files are invalid; using the {loaded.source} policy",
            file=sys.stderr,
        )
    if loaded.policy is None:
        raise _Failed
    return loaded.policy


def _with_systemd(work: Callable[[Systemd], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        systemd = await Systemd.connect(BUS_TIMEOUT)
        try:
            return await work(systemd)
        finally:
            systemd.close()

    return asyncio.run(run())


def _on_bus(work: Callable[[Systemd, Daemon | None], Awaitable[T]]) -> T:
    """Run ``work`` with systemd, and with cgpolicyd when it runs (else None), on one connection."""

    async def run() -> T:
        connection = await bus.connect(BUS_TIMEOUT, SystemdError)
        try:
            daemon = Daemon(connection) if await daemon_running(connection, BUS_TIMEOUT) else None
            return await work(Systemd(connection, BUS_TIMEOUT), daemon)
        finally:
            connection.disconnect()

    return asyncio.run(run())


def _with_daemon(work: Callable[[Daemon], Awaitable[T]]) -> T:
    """Run ``work`` with cgpolicyd; a clear error when it does not run."""

    async def run() -> T:
        connection = await bus.connect(BUS_TIMEOUT, DaemonError)
        try:
            if not await daemon_running(connection, BUS_TIMEOUT):
                print(f"error: {NOT_RUNNING}", file=sys.stderr)
                raise _Failed
            return await work(Daemon(connection))
        finally:
            connection.disconnect()

    return asyncio.run(run())


def _may_see_others() -> bool:
    """Root and the admin group of the node's own policy (never --config-dir's); if that
    policy cannot be read, root only."""
    uid = os.getuid()
    if uid == 0:
        return True
    try:
        return is_admin(lookup_uid(uid), load_policy(Path(config_dir())).general.admin_group)
    except CgpolicyError:
        return False


def _visible_uid(uid: int | None, command: str) -> int | None:
    """Whose standing ``command`` may show: ``uid`` (None: everyone's) to root and admins;
    anyone else sees their own only, and asking about another user is refused."""
    own = os.getuid()
    if uid == own or _may_see_others():
        return uid
    if uid is None:
        return own
    print(
        f"error: {command} of another user is for root and the policy's admin group; "
        f"uid {own} is in neither",
        file=sys.stderr,
    )
    raise _Failed


def cmd_check(args: argparse.Namespace) -> None:
    policy = _strict_policy(args)
    print(
        f"{config_dir(args.config_dir)}: valid; {len(policy.groups)} groups, order "
        f"{', '.join(policy.order)}; fallback {policy.fallback}"
    )


def cmd_classify(args: argparse.Namespace) -> None:
    account = lookup_account(args.user)
    _visible_uid(account.uid, "classify")
    policy = _strict_policy(args).compile()
    decision = decide(policy, account)
    if decision.group is None:
        print(f"{account.name} (uid {account.uid}): not managed: {decision.reason}")
        return
    group = decision.group
    print(f"{account.name} (uid {account.uid}): group {group['name']} (matched by {decision.rule})")
    limits = "exempt: never limited" if group["exempt"] else describe_limits(group["limits"])
    print(f"  limits: {limits}")


def cmd_apply(args: argparse.Namespace) -> None:
    """Through cgpolicyd when it runs, which sets the standing it has recorded;
    else as the login hook does, from its copy of the penalties in force: either
    way a penalty in force stays in force. A draft directory is applied here."""
    policy = _policy_in_force(args)
    account = lookup_account(args.user)
    # cgpolicyd acts on its own directory; --config-dir names a draft
    draft = os.path.realpath(config_dir(args.config_dir)) != os.path.realpath(config_dir())
    through = None if draft else asyncio.run(_apply_through_daemon(account.name))
    if through is not None:  # cgpolicyd logged it
        print(through)
        return
    sent = apply_limits(policy, account, BUS_TIMEOUT, _penalty_copy(account), system_bus_address())
    log.open_log("cgpolicyctl")
    account = sent.decision.account
    text = sent.log_line() + " " + log.fields(by="cgpolicyctl")
    log.info(sent.action, text, user=account.name, uid=account.uid, tier=sent.tier)
    if sent.error:
        raise sent.error
    print(sent.log_line())


async def _apply_through_daemon(name: str) -> str | None:
    """cgpolicyd's Apply; None when it does not run (nor the bus: busctl will say so)."""
    try:
        connection = await bus.connect(BUS_TIMEOUT, DaemonError)
    except DaemonError:
        return None
    try:
        if not await daemon_running(connection, BUS_TIMEOUT):
            return None
        return await Daemon(connection).apply(name)
    finally:
        connection.disconnect()


def _penalty_copy(account: Account) -> Standing | None:
    """The penalty cgpolicyd has ``account`` in, from the copy the hook reads."""
    try:
        return read_penalty(penalties_file(), account.uid, time.time())
    except (OSError, ValueError) as err:
        print(f"warning: {err}; no cgpolicyd penalty is known for {account.name}", file=sys.stderr)
        return None


def _managed_uid(args: argparse.Namespace) -> int:
    account = lookup_account(args.user)
    if account.uid == 0:
        print("error: root's session is never frozen", file=sys.stderr)
        raise _Failed
    return account.uid


def _mechanism(uid: int, action: str) -> str:
    """What control.freeze_user or thaw_user uses on this node; cgpolicyd calls them too.

    Asked before the call: thawing through the v1 freezer removes the group it looks at.
    """
    if action == "thawed":
        return "v1 freezer" if os.path.isdir(V1Freezer().group_dir(uid)) else "systemd"
    return "systemd" if cgroup_mode() == "unified" else "v1 freezer"


def _freeze_or_thaw(user: str, uid: int, action: str) -> str:
    """Freeze or thaw ``user`` the way cgpolicyctl freeze and thaw do, and log it."""
    freezing = action == "frozen"

    async def work(systemd: Systemd, daemon: Daemon | None) -> tuple[str, str | None]:
        if daemon is None:
            act = control.freeze_user if freezing else control.thaw_user
            return await act(systemd, uid), None
        # Through cgpolicyd, which records it and announces UserFreezerChanged.
        how = _mechanism(uid, action)
        await (daemon.freeze if freezing else daemon.thaw)(user)
        return how, "cgpolicyd"

    how, through = _on_bus(work)
    log.open_log("cgpolicyctl")
    log.info(
        action,
        log.fields(
            user=user,
            uid=uid,
            action=action,
            via=how.replace(" ", "-"),
            through=through,
        ),
        user=user,
        uid=uid,
    )
    return how


def _freezer_command(args: argparse.Namespace, action: str) -> None:
    how = _freeze_or_thaw(args.user, _managed_uid(args), action)
    print(f"{args.user}: {action} ({how})")


def cmd_freeze(args: argparse.Namespace) -> None:
    _freezer_command(args, "frozen")


def cmd_thaw(args: argparse.Namespace) -> None:
    _freezer_command(args, "thawed")


def _user_row(policy: Compiled | None, account: Account, status: dict[str, Any]) -> dict[str, Any]:
    row = {"user": account.name, **status}
    if policy:
        decision = decide(policy, account)
        row["group"] = decision.group["name"] if decision.group else None
        row["rule"] = decision.rule or decision.reason
        row["exempt"] = decision.action == "exempt"
    return row


# What status adds from cgpolicyd when it runs; None when it has no value.
DAEMON_KEYS = ("tier", "tier_expiry", "occurrences", "cpu_badness", "memory_badness")


async def _merge_daemon(daemon: Daemon, rows: list[dict[str, Any]], each: bool) -> bool:
    """Add cgpolicyd's view of each row's user (asked one by one if ``each``, else all at
    once); False (and a warning) when it cannot."""
    try:
        if each:
            known = {row["uid"]: await daemon.get_user(row["user"]) for row in rows}
        else:
            known = {info.get("uid"): info for info in await daemon.list_users()}
    except DaemonError as err:
        print(f"warning: {err}; showing systemd's view only", file=sys.stderr)
        return False
    for row in rows:
        info = known.get(row["uid"], {})
        row.update({key: info.get(key) for key in DAEMON_KEYS})
    return True


async def _status_rows(
    systemd: Systemd, policy: Compiled | None, user: str | None, only: int | None
) -> list[dict[str, Any]]:
    """The named user's row; else every user slice's, or ``only`` that uid's."""
    if user:
        accounts = [lookup_account(user)]
    else:
        min_uid = policy["min_uid"] if policy else 1000
        accounts = []
        for uid in await systemd.user_slices():
            if uid >= min_uid and only in (None, uid):
                try:
                    accounts.append(lookup_uid(uid))
                except CgpolicyError:
                    accounts.append(Account(f"#{uid}", uid, frozenset()))
    return [_user_row(policy, a, await control.slice_status(systemd, a.uid)) for a in accounts]


_COLUMNS = ("CPUQuota", "MemoryMax", "MemoryHigh", "TasksMax")


def _human_bytes(value: int | None) -> str:
    return "-" if value is None else format_size(value)


def _badness(row: dict[str, Any]) -> str:
    """CPU/memory badness, 0 to 100 each."""
    cpu, memory = row.get("cpu_badness"), row.get("memory_badness")
    if cpu is None and memory is None:
        return "-"
    return "/".join("-" if value is None else f"{value:.1f}" for value in (cpu, memory))


def _tier(row: dict[str, Any]) -> str:
    """The tier, and while its MemoryMax steps down, the limit in force and the target."""
    tier = str(row.get("tier") or "-")
    if row.get("memory_max_target") is None:
        return tier
    in_force, target = row.get("memory_max_in_force"), row.get("memory_max_target")
    return f"{tier} (MemoryMax {_human_bytes(in_force)} -> {_human_bytes(target)})"


def _print_table(rows: list[dict[str, Any]], daemon: bool = False) -> None:
    header = ["USER", "UID", "GROUP", *_COLUMNS, "CPU-TIME", "MEMORY", "TASKS", "FREEZER"]
    if daemon:
        header += ["TIER", "BADNESS"]
    table = [header]
    for row in rows:
        limits = row.get("limits", {})
        usage = row.get("usage", {})
        cpu = usage.get("CPUUsageNSec")
        table.append(
            [
                str(row["user"]),
                str(row["uid"]),
                str(row.get("group", "-")),
                *(limits.get(key, "-") for key in _COLUMNS),
                "-" if cpu is None else f"{cpu / 1e9:.1f}s",
                _human_bytes(usage.get("MemoryCurrent")),
                "-" if usage.get("TasksCurrent") is None else str(usage["TasksCurrent"]),
                row.get("freezer", "-") if row.get("active") else "not logged in",
            ]
        )
        if daemon:
            table[-1] += [_tier(row), _badness(row)]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))


def cmd_status(args: argparse.Namespace) -> None:
    only = _visible_uid(None if args.user is None else lookup_account(args.user).uid, "status")
    policy = _load_in_force(args).policy

    async def work(
        systemd: Systemd, daemon: Daemon | None
    ) -> tuple[list[dict[str, Any]], bool, dict[str, Any] | None]:
        rows = await _status_rows(systemd, policy, args.user, only)
        each = args.user is not None or only is not None
        merged = daemon is not None and await _merge_daemon(daemon, rows, each)
        state = None
        if daemon is not None and args.user is None and not args.json:
            with contextlib.suppress(CgpolicyError):  # Status is for admins
                state = await daemon.status()
        return rows, merged, state

    rows, merged, state = _on_bus(work)
    if args.json:
        print(json.dumps(rows if args.user is None else rows[0], indent=2))
    elif not rows:
        print("no user slices")
    else:
        _print_table(rows, daemon=merged)
    line = _sync_line(state, time.time()) if state else None
    if line:
        print(line)


def _sync_line(status: dict[str, Any], now: float) -> str | None:
    """cgpolicyd's side of its sync group, from Status; None without [sync]."""
    if "sync" not in status:
        return None
    last = status.get("last_sync")
    when = "never" if last is None else f"{max(now - last, 0):.0f}s ago"
    line = f"sync: group {status.get('sync_group')}, node {status.get('sync_node')}: "
    if status["sync"] == "down":
        line += f"down, enforcing locally ({status.get('sync_error')}); last sync {when}"
    else:
        line += f"up, last sync {when}"
    if status.get("sync_duplicate"):
        line += f"; {status['sync_duplicate']}"
    return line


def cmd_penalize(args: argparse.Namespace) -> None:
    _with_daemon(lambda daemon: daemon.penalize(args.user, args.tier))
    print(f"{args.user}: penalized ({args.tier})")


def cmd_release(args: argparse.Namespace) -> None:
    _with_daemon(lambda daemon: daemon.release(args.user))
    print(f"{args.user}: released")


def cmd_notify_test(args: argparse.Namespace) -> None:
    """Send the sample mail now, straight to the mail server, and say what it answered."""
    from .mail import build_mail, deliver, top_processes
    from .notifier import sample_facts

    if os.geteuid() != 0:
        print("error: notify-test is for root: it reads the SMTP password file", file=sys.stderr)
        raise _Failed
    policy = _strict_policy(args)
    if policy.notify is None:
        print("error: the policy has no [notify] table: cgpolicy sends no mail", file=sys.stderr)
        raise _Failed
    account = lookup_account(args.user)
    tier = policy.penalty.tiers[0].name if policy.penalty else None
    limits = slice_limits(policy.compile(), account, Standing(tier)).limits_text()
    facts = sample_facts(policy, account.name, account.uid, limits, time.time())
    facts = replace(facts, processes=top_processes(account.uid))
    message = build_mail(policy.notify, facts)
    if message is None:
        print(f"error: {args.user}: no address to send to, and no admins", file=sys.stderr)
        raise _Failed
    deliver(policy.notify, bytes(message))
    bcc = f" (Bcc: {message['Bcc']})" if message["Bcc"] else ""
    print(f"{args.user}: sample mail sent to {message['To']}{bcc}")


def cmd_reload(args: argparse.Namespace) -> None:
    problems = _with_daemon(lambda daemon: daemon.reload())
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        print("cgpolicyd keeps the policy it had", file=sys.stderr)
        raise _Failed
    print("policy reloaded")


def cmd_metrics(args: argparse.Namespace) -> None:
    print(_with_daemon(lambda daemon: daemon.metrics()), end="")


def _actor() -> str:
    """Who runs this command: the login behind sudo (the kernel's loginuid), else the uid."""
    loginuid = Path("/proc/self/loginuid")
    text = loginuid.read_text().strip() if loginuid.exists() else ""
    uid = int(text) if text.isdigit() and int(text) != 0xFFFFFFFF else os.getuid()
    try:
        return lookup_uid(uid).name
    except CgpolicyError:
        return str(uid)


def _record_event(uid: int, user: str, kind: str, reason: str) -> None:
    """An admin's eviction or restore: in the history beside cgpolicyd's tier changes,
    and in the mail queue cgpolicyd sends from. (The login line reads the checkpoint.)"""
    actor = _actor()
    now = time.time()
    log.open_log("cgpolicyctl")
    with StateStore.open(state_db_file()) as store:
        store.record_event(uid, user, kind, reason, actor, now=now)
        log.info(
            kind,
            log.fields(user=user, uid=uid, event=kind, actor=actor, reason=reason),
            user=user,
            uid=uid,
        )
        queued = _queue_mail(store, user, uid, kind, reason, actor, now)
    if queued:
        _wake_sender()


def _queue_mail(
    store: StateStore, user: str, uid: int, kind: str, reason: str, actor: str, now: float
) -> bool:
    """The user's mail about it, as the node's own policy's [notify] says (none without);
    whether one was queued."""
    from .notifier import eviction_facts, queue_mail

    try:
        policy = load_policy(Path(config_dir()))
        if policy.notify is None:
            return False
        facts = eviction_facts(policy, user, uid, kind, reason, actor, now)
        return queue_mail(store, policy.notify, facts, now) is not None
    except CgpolicyError as err:  # done is done: the mail alone is missing
        print(f"warning: no mail to {user}: {err}", file=sys.stderr)
        log.error(
            "mail-failed",
            log.fields(event="mail-failed", user=user, uid=uid, kind=kind, error=err),
            user=user,
            uid=uid,
        )
        return False


def _wake_sender() -> None:
    """Have cgpolicyd send the mail just queued now, not at its sender's next look.
    Without cgpolicyd, the mail waits in the queue for its start."""

    async def send(_systemd: Systemd, daemon: Daemon | None) -> None:
        if daemon is not None:
            await daemon.send_mail()

    try:
        _on_bus(send)
    except CgpolicyError as err:  # the mail is queued all the same
        print(f"warning: cgpolicyd sends the mail later: {err}", file=sys.stderr)


def _root_only(command: str, why: str = "runs CRIU, which needs root") -> None:
    if os.geteuid() != 0:
        print(f"error: {command} {why}", file=sys.stderr)
        raise _Failed


def cmd_evict(args: argparse.Namespace) -> None:
    _root_only("evict")
    uid = _managed_uid(args)
    try:
        checkpoint = evict.evict(
            uid,
            args.user,
            args.pid,
            lambda: _freeze_or_thaw(args.user, uid, "frozen"),
            lambda: _freeze_or_thaw(args.user, uid, "thawed"),
        )
    except EvictError as err:
        log.open_log("cgpolicyctl")
        log.error(
            "evict-failed",
            log.fields(user=args.user, uid=uid, event="evict-failed", reason=str(err)),
            user=args.user,
            uid=uid,
        )
        raise
    reason = (
        f"evicted pid {checkpoint.root} ({checkpoint.command}, "
        f"{format_size(checkpoint.rss)}) to checkpoint {checkpoint.id}"
    )
    _record_event(uid, args.user, "evicted", reason)
    print(f"{args.user}: {reason}; the rest of the session runs on")
    print(f"bring it back with: cgpolicyctl restore {checkpoint.id}")


def cmd_restore(args: argparse.Namespace) -> None:
    _root_only("restore")
    checkpoint, scope = evict.restore(
        args.id, lambda uid: _with_systemd(lambda systemd: control.memory_room(systemd, uid))
    )
    reason = f"restored checkpoint {checkpoint.id} (pid {checkpoint.root}) in {scope}"
    _record_event(checkpoint.uid, checkpoint.user, "restored", reason)
    print(f"{checkpoint.user}: {reason}")


def _local_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def _event_dict(event: Event) -> dict[str, Any]:
    return {
        "time": _local_time(event.time),
        "timestamp": event.time,
        "user": event.user,
        "uid": event.uid,
        "kind": event.kind,
        "old_tier": event.old_tier,
        "new_tier": event.new_tier,
        "old_occurrences": event.old_occurrences,
        "new_occurrences": event.new_occurrences,
        "reason": event.reason,
        "actor": event.actor or "cgpolicyd",
        "watched": event.watched,
    }


def _history_uid(user: str) -> int:
    """A name through NSS; a number as a uid, for accounts deleted since."""
    return int(user) if user.isdigit() else lookup_account(user).uid


def cmd_history(args: argparse.Namespace) -> None:
    uid = _visible_uid(None if args.user is None else _history_uid(args.user), "history")
    path = state_db_file()
    if os.path.exists(path) and not os.access(path, os.R_OK):
        raise PermissionError(f"cannot read {path}")  # main() adds: run as root
    store = StateStore.open_readonly(path)
    if store is None:
        print("[]" if args.json else "no history yet")
        return
    with store:
        events = store.history(uid, args.limit)
    if args.json:
        print(json.dumps([_event_dict(event) for event in events], indent=2))
        return
    if not events:
        print("no history yet" if uid is None else f"no history for {args.user or f'uid {uid}'}")
        return
    table = [["TIME", "USER", "TIER", "OCCURRENCES", "REASON", "BY"]]
    for event in events:
        table.append(
            [
                _local_time(event.time),
                event.user,
                f"{event.old_tier or '-'} -> {event.new_tier or '-'}"
                + (" (watched)" if event.watched else ""),
                f"{event.old_occurrences} -> {event.new_occurrences}",
                event.reason,
                event.actor or "cgpolicyd",
            ]
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> float:
    """Seconds from "90s", "30m", "2h", "7d" or a plain number of seconds."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 2h, 30m, 7d)") from None
    if not 0 < seconds < 10 * 365 * 86400:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 2h, 30m, 7d)")
    return seconds


def _readable_db(path: str) -> None:
    if os.path.exists(path) and not os.access(path, os.R_OK):
        raise PermissionError(f"cannot read {path}")  # main() adds: run as root


def cmd_report(args: argparse.Namespace) -> None:
    account = lookup_account(args.user)
    _visible_uid(account.uid, "report")
    compiled = _policy_in_force(args)
    until = time.time()
    for path in (usage_db_file(), state_db_file()):
        _readable_db(path)
    policy = Policy.from_data(compiled["policy"])
    report = report_from_files(account, policy, physical_memory(), until - args.since, until)
    if args.plot:
        from .plot import usage_png  # matplotlib: only when a picture is asked for

        Path(args.plot).write_bytes(usage_png(report))
    if args.json:
        print(json.dumps(to_json(report), indent=2))
        return
    _print_report(report)
    if args.plot:
        print(f"plot written to {args.plot}")


def _print_report(report: UsageReport) -> None:
    def cores(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    print(
        f"{report.user} (uid {report.uid}), group {report.group or '-'}, "
        f"since {_local_time(report.since)}"
    )
    print(
        f"  quota: CPU {cores(report.cpu_quota)} cores (threshold "
        f"{cores(report.cpu_threshold)}), memory {_human_bytes(report.memory_max)} "
        f"(threshold {_human_bytes(report.memory_threshold)})"
    )
    if not report.samples:
        print("  no usage recorded in this span")
    else:
        used = [p.cores for p in report.samples if p.cores is not None]
        memory = [p.memory for p in report.samples if p.memory is not None]
        mean = sum(used) / len(used) if used else None
        print(
            f"  {len(report.samples)} samples: CPU mean {cores(mean)}"
            f", max {cores(max(used, default=None))} cores; memory max "
            f"{_human_bytes(max(memory, default=None))}"
        )
    for span in report.penalties:
        watched = " (watched: no limit changed)" if span.watched else ""
        print(f"  {span.tier}{watched}: {_local_time(span.start)} to {_local_time(span.end)}")
    for when, process in report.processes:
        print(
            f"  at {_local_time(when)}: pid {process.pid} {process.name} "
            f"({process.executable or '?'}) CPU {cores(process.cores)} cores, "
            f"memory {_human_bytes(process.memory)}"
        )


def cmd_replay(args: argparse.Namespace) -> None:
    """Read-only: the candidate is judged in memory; nothing of the node changes."""
    from . import replay

    _root_only("replay", "is for root: it reads every user's usage history")
    uid = None if args.user is None else _history_uid(args.user)
    policy = _strict_policy(argparse.Namespace(config_dir=args.policy))
    usage = args.history or usage_db_file()
    history = UsageHistory.open_readonly(usage)
    if history is None:
        print(f"error: {usage}: no usage history (yet) to replay", file=sys.stderr)
        raise _Failed
    # Another node's history was judged there: this node's events are not its own.
    store = None if args.history else StateStore.open_readonly(state_db_file())
    until = time.time()
    try:
        lookup = Accounts().by_uid  # as cgpolicyd asks NSS
        result = replay.replay(
            policy, history, store, until - args.since, until, physical_memory(), uid, lookup
        )
    finally:
        for source in (history, store):
            if source is not None:
                source.close()
    if args.plot:
        from .plot import replay_png  # matplotlib: only when a picture is asked for

        Path(args.plot).write_bytes(replay_png(result, args.policy))
    if args.json:
        data = {"policy": args.policy, "history": usage, **replay.to_json(result, _event_dict)}
        print(json.dumps(data, indent=2))
        return
    missing = "the history is another node's" if args.history else "no state database yet"
    _print_replay(result, args.policy, usage, None if store else missing)
    if args.plot:
        print(f"plot written to {args.plot}")


def _duration_text(seconds: float) -> str:
    """4h05m, 30m, 40s: how long a penalty lasts."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s" if secs else f"{minutes}m"
    return f"{secs}s"


def _print_replay(result: Replay, policy: str, usage: str, uncompared: str | None) -> None:
    """The replay as text; ``uncompared`` says why no recorded penalties are compared."""
    from .replay import SAME

    every = f"{result.sampled_every:g} s" if result.sampled_every else "-"
    print(f"replay of the policy in {policy} on the usage history in {usage}")
    print(
        f"  {_local_time(result.since)} to {_local_time(result.until)}: {result.users} users, "
        f"{result.samples} samples, taken every {every}"
    )
    for stretch in result.averages:
        print(
            f"  coarser from {_local_time(stretch.first)} to "
            f"{_local_time(stretch.last + stretch.bucket)}: {stretch.bucket / 60:g}-minute "
            "averages; there a penalty's time is its bucket's start, and a bucket's average "
            "counts for all of it"
        )
    print("  each user starts with no badness and no occurrences; groups as NSS says now")
    if result.unknown:
        uids = ", ".join(str(uid) for uid in result.unknown[:10])
        more = ", ..." if len(result.unknown) > 10 else ""
        print(f"  not judged: {len(result.unknown)} uids unknown here ({uids}{more})")
    if not result.has_tiers:
        print("  the candidate policy has no [penalty]: it penalizes nobody")
    same = sum(1 for row in result.rows if row.verdict == SAME)
    recorded = (
        f"none recorded compared: {uncompared}"
        if uncompared
        else f"{len(result.recorded)} recorded under the policy in force, {same} the same"
    )
    print(f"\nthe model's penalties: {len(result.candidate)} under the candidate, {recorded}")

    def shown(penalty: Penalty | None, start: float) -> str:
        if penalty is None:
            return "-"
        text = f"{penalty.tier} for {_duration_text(penalty.seconds)}"
        if penalty.start != start:
            text += f" at {_local_time(penalty.start)[11:19]}"
        notes = [
            note
            for note, present in (
                ("watched", penalty.watched),
                ("in force", penalty.in_force),
                (f"released by {penalty.ended_by}", penalty.ended_by),
                (f"to {penalty.bucket / 60:g} min", penalty.bucket),
            )
            if present
        ]
        return text + (f" ({', '.join(notes)})" if notes else "")

    table = [["START", "USER", "CANDIDATE", "RECORDED", "VERDICT"]]
    for row in result.rows:
        table.append(
            [
                _local_time(row.start),
                row.penalty.user,
                shown(row.candidate, row.start),
                shown(row.recorded, row.start),
                row.verdict,
            ]
        )
    if len(table) > 1:
        widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
        for line in table:
            print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    if result.admin:
        print(
            "\nadmins' actions, not replayed (the replay judges usage alone; "
            "a penalty an admin set is not compared):"
        )
        for event in result.admin:
            tier = f"{event.old_tier or '-'} -> {event.new_tier or '-'}"
            when = _local_time(event.time)
            print(f"  {when}  {event.user}  {event.kind} ({tier}) by {event.actor}")


def _positive(text: str) -> int:
    number = int(text)
    if number < 1:
        raise ValueError(text)
    return number


def _doctor_checks(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(verdict, what, detail) for each thing a working node needs."""
    checks: list[tuple[str, str, str]] = []
    try:
        version = _with_systemd(lambda sd: sd.manager_property("Version"))
        checks.append(("ok", "systemd", f"version {version}, reachable over the system bus"))
    except CgpolicyError as err:
        checks.append(("FAIL", "systemd", str(err)))
    mode = cgroup_mode()
    checks.append(
        (
            "ok",
            "cgroup mode",
            {"unified": "v2 (unified)", "hybrid": "v1 (hybrid)", "legacy": "v1 (legacy)"}[mode],
        )
    )
    if mode == "unified":
        freeze_ok = (CGROUP_ROOT / "user.slice" / "cgroup.freeze").exists()
        checks.append(
            (
                "ok" if freeze_ok else "FAIL",
                "freezer",
                "systemd FreezeUnit (cgroup.freeze)"
                if freeze_ok
                else "no cgroup.freeze in user.slice: kernel too old",
            )
        )
    else:
        v1_ok = V1Freezer().available()
        checks.append(
            (
                "ok" if v1_ok else "FAIL",
                "freezer",
                "kernel v1 freezer hierarchy" if v1_ok else "no v1 freezer mounted",
            )
        )
    wired, detail = hook_wiring("sshd", "cgpolicy-pam-hook")
    checks.append(("ok" if wired else "FAIL", "PAM line (sshd)", detail))
    for line in user_env_before_hook("sshd", "cgpolicy-pam-hook"):
        checks.append(
            (
                "warn",
                "PAM environment",
                f"{line.file}:{line.line}: {line.module} {' '.join(line.args)} runs before the "
                "hook: users' own variables reach it (it ignores them); put the hook above it",
            )
        )
    hook_ok = Path(HOOK_PATH).exists()
    checks.append(
        ("ok" if hook_ok else "FAIL", "hook", HOOK_PATH + ("" if hook_ok else " is missing"))
    )
    try:
        policy = load_policy(Path(config_dir(args.config_dir)))
        checks.append(("ok", "policy", f"valid, {len(policy.groups)} groups"))
        if policy.sync is not None:
            checks.append(_sync_check(policy.sync, policy.general.interval))
        checks += _network_check(policy)
    except PolicyError as err:
        checks.append(("FAIL", "policy", f"{len(err.problems)} errors; run cgpolicyctl check"))
    compiled = Path(compiled_policy_file())
    checks.append(
        (
            "ok" if compiled.exists() else "warn",
            "last good policy",
            str(compiled)
            if compiled.exists()
            else "none saved yet (the first login or cgpolicyctl apply saves it)",
        )
    )
    salvaged = last_salvage(state_db_file())
    if salvaged is not None:
        checks.append(("warn", "state database", "was damaged, salvaged: " + salvaged))
    checks += _daemon_checks(salvage_shown=salvaged is not None)
    return checks


def _sync_check(settings: Sync, interval: float) -> tuple[str, str, str]:
    """The sync group's database answers, and this node synced lately."""
    from .syncdb import SyncDB

    db = SyncDB(settings)
    try:
        nodes = db.nodes()
    except CgpolicyError as err:
        return ("FAIL", "sync database", str(err))
    finally:
        db.close()
    what = f"group {settings.group}, node {settings.node}"
    last = nodes.get(settings.node)
    if last is None:
        return ("warn", "sync database", f"{db.where} answers; {what} has never synced")
    age = time.time() - last
    others = len(nodes) - 1
    text = f"{db.where}: {what} last synced {age:.0f}s ago; {others} other nodes in the group"
    return ("ok" if age <= 3 * interval else "warn", "sync database", text)


def _network_check(policy: Policy) -> list[tuple[str, str, str]]:
    """A warning when the policy needs TCP and cgpolicyd's unit does not allow it."""
    sections = network.needs(policy)
    if not sections:
        return []
    try:
        allow_list, families = _with_systemd(
            lambda sd: sd.service_property(DAEMON_UNIT, "RestrictAddressFamilies")
        )
    except CgpolicyError:  # the systemd check says why
        return []
    warning = network.doctor_warning(sections, allow_list, families)
    return [] if warning is None else [("warn", "network", warning)]


def _daemon_checks(salvage_shown: bool) -> list[tuple[str, str, str]]:
    """cgpolicyd as it reports itself: the policy it runs on, and sends systemd refused."""

    async def ask(_systemd: Systemd, daemon: Daemon | None) -> dict[str, Any] | None:
        return None if daemon is None else await daemon.status()

    try:
        status = _on_bus(ask)
    except CgpolicyError as err:
        return [("warn", "cgpolicyd", f"cannot ask it: {err}")]
    if status is None:
        return [("warn", "cgpolicyd", "not running: nobody's usage is judged")]
    since = datetime.fromtimestamp(status["started"]).isoformat(" ", "seconds")
    problems = status.get("problems", [])
    policy = status["policy"]
    if policy == "files":
        checks = [("ok", "cgpolicyd", f"running since {since} on the policy files")]
    elif policy == "last good":
        checks = [
            (
                "warn",
                "cgpolicyd",
                f"degraded since {since}: on the last good policy; the files are refused "
                f"({'; '.join(problems)})",
            )
        ]
    else:
        checks = [
            (
                "FAIL",
                "cgpolicyd",
                f"degraded since {since}: no valid policy, nobody is limited "
                f"({'; '.join(problems)})",
            )
        ]
    if status.get("pending"):
        checks.append(
            (
                "warn",
                "cgpolicyd sends",
                "limits systemd has not taken yet, retried every cycle: "
                + ", ".join(status["pending"]),
            )
        )
    if status.get("sync") == "down":
        checks.append(
            (
                "warn",
                "cgpolicyd sync",
                f"the sync database is away, enforcing locally: {status.get('sync_error')}",
            )
        )
    if status.get("sync_duplicate"):
        checks.append(("FAIL", "cgpolicyd sync", status["sync_duplicate"]))
    if status.get("salvage") and not salvage_shown:  # an admin who cannot read the report
        checks.append(("warn", "cgpolicyd state", "salvaged at start: " + status["salvage"]))
    return checks


def cmd_selftest(args: argparse.Namespace) -> None:
    from .selftest import run

    policy = _policy_in_force(args)
    if not run(policy, args.user, _penalty_copy(lookup_account(args.user))):
        raise _Failed


def cmd_tiers(args: argparse.Namespace) -> None:
    """The penalty tiers' names, one a line: for shell completion, so quiet on errors."""
    try:
        policy = load_policy(Path(config_dir(args.config_dir)))
    except (PolicyError, OSError):
        raise _Failed from None
    for tier in policy.penalty.tiers if policy.penalty else ():
        print(tier.name)


def cmd_import_arbiter2(args: argparse.Namespace) -> None:
    from . import arbiter2

    paths = [Path(name) for name in args.config]
    tpc, origin = args.threads_per_core, "--threads-per-core"
    if tpc is None:
        tpc = arbiter2.threads_per_core()
        origin = "this machine's; if the login nodes differ, give --threads-per-core"
    # Arbiter2 reads relative paths from its program's directory, arbiter/ beside etc/.
    base = paths[0].resolve().parent.parent / "arbiter"
    config = arbiter2.read_configs(paths)
    imported = arbiter2.import_site(config, base, tpc, args.config, origin)
    out = Path(args.out)
    arbiter2.write_policy(imported, out)
    notes = arbiter2.merged_notes(imported.notes)
    print(f"wrote {out}: {', '.join(sorted(imported.files))}")
    if imported.same:
        print(f"what cgpolicy does anyway: {', '.join(imported.same)}")
    print(f"{len(imported.notes)} settings not carried over exactly (also atop {MAIN_FILE}):")
    for note in notes:
        print(f"  {note}")
    # A password file the import asks for is the admin's to create: until then it is
    # the one problem expected, and the rest of the policy is still checked.
    to_create = {k: path for k, path in imported.secrets.items() if not os.path.lexists(path)}
    try:
        policy: Policy | None = load_policy(out)
    except PolicyError as err:
        problems = [p for p in err.problems if p.key not in to_create]
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        if problems:
            raise _Failed from None
        policy = None
    if policy is not None:
        print(
            f"{out}: valid; {len(policy.groups)} groups, order {', '.join(policy.order)}; "
            f"fallback {policy.fallback}."
        )
    else:
        print(f"{out}: valid but for {', '.join(to_create.values())}, yet to be created (above).")
    print("Review it, copy it to /etc/cgpolicy, then cgpolicyctl check and cgpolicyctl reload")


def cmd_doctor(args: argparse.Namespace) -> None:
    checks = _doctor_checks(args)
    for verdict, what, detail in checks:
        print(f"[{verdict:>4}] {what}: {detail}")
    if any(verdict == "FAIL" for verdict, _, _ in checks):
        raise _Failed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cgpolicyctl", description=__doc__.splitlines()[0])
    parser.add_argument("--config-dir", help="policy directory (default /etc/cgpolicy)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str,
        func: Callable[[argparse.Namespace], None],
        help_text: str,
        user: str | None = None,
    ) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text, description=help_text)
        if user == "required":
            command.add_argument("user")
        elif user == "optional":
            command.add_argument("user", nargs="?")
        command.set_defaults(func=func)
        return command

    add("check", cmd_check, "validate the policy files; list every error")
    add(
        "classify", cmd_classify, "show a user's status group and the rule that matched", "required"
    )
    add("apply", cmd_apply, "set a user's limits now, as the login hook does", "required")
    add("freeze", cmd_freeze, "freeze all of a user's processes", "required")
    add("thaw", cmd_thaw, "thaw a frozen user", "required")
    status = add(
        "status",
        cmd_status,
        "limits in force, usage and freezer state; with cgpolicyd running, "
        "also the penalty tier and badness (CPU/memory, 0 to 100), and for an admin "
        "with [sync] set, the node's sync: group, node, up or down, last sync",
        "optional",
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    penalize = add("penalize", cmd_penalize, "put a user in a penalty tier now (cgpolicyd)")
    penalize.add_argument("user")
    penalize.add_argument("tier")
    add("release", cmd_release, "end a user's penalty tier now (cgpolicyd)", "required")
    add("reload", cmd_reload, "make cgpolicyd read the policy files again; list every error")
    add(
        "notify-test",
        cmd_notify_test,
        "send USER the sample of a penalty mail now, as [notify] says (root)",
        "required",
    )
    history = add(
        "history", cmd_history, "tier changes cgpolicyd recorded, newest first", "optional"
    )
    history.add_argument(
        "--limit", type=_positive, default=20, metavar="N", help="at most N events (default 20)"
    )
    history.add_argument("--json", action="store_true", help="machine-readable output")
    report = add(
        "report",
        cmd_report,
        "a user's CPU and memory over time, with the group's quota, "
        "the thresholds and the penalties",
        "required",
    )
    report.add_argument(
        "--since",
        type=_duration,
        default=7200.0,
        metavar="DURATION",
        help="how far back: 90s, 30m, 2h (the default), 7d",
    )
    report.add_argument("--json", action="store_true", help="machine-readable output")
    report.add_argument(
        "--plot", metavar="FILE", help="also draw it into FILE as a PNG image (needs matplotlib)"
    )
    replaying = add(
        "replay",
        cmd_replay,
        "judge this node's recorded usage under the policy in a directory, as cgpolicyd "
        "would have, and show who it would have penalized, when, at which tier and for "
        "how long, beside the penalties recorded (root)",
    )
    replaying.add_argument(
        "--policy", required=True, metavar="DIR", help="the candidate policy's directory"
    )
    replaying.add_argument(
        "--since",
        type=_duration,
        default=7 * 86400.0,
        metavar="DURATION",
        help="how far back: 30m, 2h, 7d (the default)",
    )
    replaying.add_argument("--user", help="only this user (a name, or a uid)")
    replaying.add_argument("--json", action="store_true", help="machine-readable output")
    replaying.add_argument(
        "--plot",
        metavar="FILE",
        help="also draw the penalties per hour, recorded and replayed, into FILE as a PNG "
        "image (needs matplotlib)",
    )
    replaying.add_argument(
        "--history",
        metavar="FILE",
        help="a usage history copied from another node (its usage.db) instead of this "
        "node's; there are no recorded penalties to compare then",
    )
    add(
        "metrics",
        cmd_metrics,
        "the Prometheus series of cgpolicyd's last cycle, as it writes them "
        "for the node exporter (cgpolicyd)",
    )
    evicting = add(
        "evict",
        cmd_evict,
        "checkpoint a user's job to disk (the tree using the most memory) and end it; "
        "it keeps running if it cannot be checkpointed (root)",
        "required",
    )
    evicting.add_argument(
        "--pid", type=_positive, help="the tree under this pid of the user's slice instead"
    )
    restoring = add(
        "restore", cmd_restore, "bring an evicted job back, detached, in the user's slice (root)"
    )
    restoring.add_argument("id", help="the checkpoint id that evict printed")
    add("doctor", cmd_doctor, "check that this node is set up for cgpolicy")
    add(
        "selftest",
        cmd_selftest,
        "open a real PAM session for USER through the node's "
        "session stack and check the limits it leaves",
        "required",
    )
    arbiter = add(
        "import-arbiter2",
        cmd_import_arbiter2,
        "write a policy directory equivalent to an Arbiter2 configuration (its mail, "
        "shared status database and debug mode included), and list every setting it could "
        "not carry over exactly, and why. A password in statusdb_url is written nowhere: "
        "create the root-only file its [sync] password_file names",
    )
    arbiter.add_argument(
        "config",
        nargs="+",
        metavar="CONFIG",
        help="Arbiter2's configuration files; later ones override earlier ones",
    )
    arbiter.add_argument(
        "--out",
        default="cgpolicy-imported",
        metavar="DIR",
        help="the directory to write; it must not exist or be empty (default cgpolicy-imported)",
    )
    arbiter.add_argument(
        "--threads-per-core",
        type=_positive,
        metavar="N",
        help="what div_cpu_quotas_by_threads_per_core divides by (default this machine's)",
    )
    # No help text: left out of the usage and the man page; bash completion asks it.
    sub.add_parser("tiers").set_defaults(func=cmd_tiers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except _Failed:
        return 1
    except CgpolicyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except PermissionError as err:
        print(f"error: {err} (run as root)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
