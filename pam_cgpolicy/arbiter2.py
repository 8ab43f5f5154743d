"""Import an Arbiter2 site: its configuration becomes a cgpolicy policy directory.

``import_site`` reads one or more Arbiter2 configuration files (later files override
earlier ones, table by table, as Arbiter2's own ``-g`` list does) and returns the
policy's files as text, with a note for every setting that has no exact equivalent.
``write_policy`` writes them. The badness model is the same in both (see badness.py),
so only units change:

- ``cpu_quota`` is a percentage of one CPU thread, divided by the threads per core
  when ``div_cpu_quotas_by_threads_per_core`` is set: it becomes ``CPUQuota`` in
  percent of one CPU, which is what systemd counts too.
- ``mem_quota`` is in GB of 1024^3 bytes: it becomes ``MemoryMax``.
- A penalty's relative quotas are fractions of the user's own status group's quotas:
  they become a tier's ``cpu_factor`` and ``memory_factor``.

Beyond the model: ``[email]`` becomes ``[notify]``, a shared PostgreSQL status
database ``[sync]`` (its password never written: the policy names a file for the
admin to create), ``debug_mode`` the watch mode, and a plot window longer than
cgpolicy's default ``[history]`` retention.

Arbiter2 judges badness against the status group's quotas, and cgpolicy against the
group's CPUQuota and MemoryMax: with the quotas carried over, the same usage gives
the same badness. Every written value carries a comment naming where it came from,
so that the output can be reviewed line by line.
"""

from __future__ import annotations

import math
import os
import re
import textwrap
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import parseaddr
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from . import tomlwrite
from .constants import DEFAULT_CONFIG_DIR, DEFAULT_STATE_DIR, GROUPS_DIR, MAIN_FILE
from .errors import SiteImportError
from .mail import TOP_PROCESSES
from .policy import (
    ID_MAX,
    SYNC_TLS_KEYS,
    HistoryParams,
    is_address,
    is_group_name,
    is_whitelist_entry,
)
from .tomlwrite import WIDTH, Table

GIB = 1024**3
PERMYRIAD_MAX = 2**31 - 1  # systemd's largest CPUQuota, in hundredths of a percent
_SPECIAL_RE = re.compile(r"%H|\$\{")  # Arbiter2 expands these in strings
# Where the imported [sync] expects the database's password (never written by the import).
SYNC_PASSWORD_FILE = os.path.join(DEFAULT_CONFIG_DIR, "sync-password")
DEFAULT_SYNC_GROUP = "default"  # for Arbiter2's empty sync group, which cgpolicy refuses
_RETENTION = HistoryParams().retention
_RETENTION_MAX = 86400 * 366  # [history] retention's largest value
LOCAL = "Arbiter2's status database was a local SQLite file"

_PLOTS = (
    "cgpolicy keeps no image files: its penalty mail embeds a plot of the user's last hour "
    "from the usage history (with matplotlib installed), and cgpolicyctl report USER --plot "
    "FILE draws any span of it again"
)
# Settings cgpolicy has no counterpart for, and why; the report lists those present.
NO_EQUIVALENT = {
    "general.history_per_refresh": "cgpolicyd reads each slice's cgroup counters once per "
    "interval; their difference is the exact average over it, with no samples in between",
    "general.poll": "cgpolicyd reads cgroup counters once per interval: nothing to poll",
    "self.groupname": "cgpolicyd runs as root and needs no group; [general] admin_group "
    "names who may use its D-Bus API (left unset: root only)",
    "badness.imported_badness_timeout": "cgpolicyd keeps each user's badness in its state "
    "database across restarts, without a timeout",
    "email.reply_to": "cgpolicy's mail sets no Reply-To: replies go to its From address",
    "email.keep_plots": _PLOTS,
    "email.plot_location": _PLOTS,
    "email.plot_suffix": _PLOTS,
    "email.plot_process_cap": _PLOTS,
    "email.table_process_cap": f"the mail's process table always lists the user's top "
    f"{TOP_PROCESSES} processes",
    "database.log_location": "cgpolicyd keeps its state, penalty events and usage history in "
    f"{DEFAULT_STATE_DIR} and logs to the journal",
    "database.log_rotate_period": "cgpolicy rotates no files: penalty events stay in its state "
    f"database, usage samples for [history] retention (default {_RETENTION / 86400:g} days), "
    "log lines under the "
    "journal's own retention",
    "processes.pss": "cgpolicy measures a slice's memory from its cgroup (anonymous plus "
    "mapped-file pages), not per process, so shared pages count once",
    "processes.pss_threshold": "cgpolicy measures memory per slice, not per process",
    "processes.proc_owner_whitelist": "cgpolicy charges every process in a user's slice, "
    "whoever owns it",
    "high_usage_watcher": "cgpolicy does not watch the node's total usage nor mail about it",
}
NOT_IN_PENALTY = "Arbiter2 does not use it in a penalty either"

# Arbiter2's defaults for the settings whose default changes what a site does.
DEFAULTS: dict[str, Any] = {
    "general.min_uid": 1000,
    "general.debug_mode": False,
    "processes.memsw": False,
    "badness.cap_badness_incr": True,
    "processes.whitelist_other_processes": True,
    "processes.proc_owner_whitelist": [0],
    "status.div_cpu_quotas_by_threads_per_core": False,
    "status.penalty.relative_quotas": True,
}


@dataclass(frozen=True)
class Note:
    """A setting the policy does not carry over exactly, and why."""

    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.key}: {self.reason}"


def merged_notes(notes: list[Note]) -> list[Note]:
    """One note for the keys that share a reason (a whole [email] table), in first order."""
    keys: dict[str, list[str]] = {}
    for note in notes:
        keys.setdefault(note.reason, []).append(note.key)
    return [Note(", ".join(names), reason) for reason, names in keys.items()]


@dataclass
class Imported:
    """The policy's files, relative to its directory, as text; and the notes."""

    files: dict[str, str]
    notes: list[Note]
    same: list[str]  # settings whose value is cgpolicy's behaviour: nothing to write
    # Secret files the policy names and the import does not write: policy key -> path.
    secrets: dict[str, str] = field(default_factory=dict)


def read_configs(paths: list[Path]) -> dict[str, Any]:
    """The configuration the files make together: a later file's tables override."""
    merged: dict[str, Any] = {}
    for path in paths:
        try:
            with open(path, "rb") as file:
                data = tomllib.load(file)
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise SiteImportError(f"{path}: {err}") from None
        _merge(merged, data)
    return merged


def _merge(into: dict[str, Any], data: dict[str, Any]) -> None:
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def threads_per_core() -> int:
    """This machine's hardware threads per core, as CPU 0's siblings list them."""
    path = "/sys/devices/system/cpu/cpu0/topology/thread_siblings_list"
    try:
        with open(path) as file:
            text = file.read().strip()
    except OSError:
        return 1
    count = 0
    for item in text.split(","):
        low, _, high = item.partition("-")
        count += int(high or low) - int(low) + 1
    return max(count, 1)


class _Site:
    """One Arbiter2 configuration being converted: what was used, and the notes."""

    def __init__(self, config: dict[str, Any], base_dir: Path, tpc: int, tpc_origin: str) -> None:
        self.config = config
        self.base_dir = base_dir
        self.tpc = tpc
        self.tpc_origin = tpc_origin
        self.used: set[str] = set()
        self.notes: list[Note] = []
        self.same: list[str] = []  # set as cgpolicy behaves anyway: nothing to write
        self.secrets: dict[str, str] = {}

    def get(self, key: str, default: Any = None) -> Any:
        """The value at dotted ``key``, Arbiter2's default if it has one, else ``default``."""
        found, value = self._find(key)
        return value if found else DEFAULTS.get(key, default)

    def _find(self, key: str) -> tuple[bool, Any]:
        table: Any = self.config
        for part in key.split("."):
            if not isinstance(table, dict) or part not in table:
                return False, None
            table = table[part]
        return True, table

    def use(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        return self.get(key, default)

    def flag(self, key: str) -> bool:
        """A true-or-false setting; anything else is taken as Arbiter2's default."""
        value = self.use(key)
        if not isinstance(value, bool):
            value = bool(DEFAULTS[key])
            self.note(key, f"{self.get(key)!r} is not true or false: taken as {value}")
        return value

    def matched(self, key: str) -> None:
        """``key``'s value is what cgpolicy does without a setting (a flag's)."""
        found, value = self._find(key)
        if found and isinstance(value, bool):
            self.same.append(f"{key} = {tomlwrite.value(value)}")

    def false_is_ours(self, key: str, if_true: str) -> None:
        """A flag whose false is what cgpolicy does anyway; true is noted, with why."""
        if not self.flag(key):
            self.matched(key)
        else:
            self.note(key, "true: " + if_true)

    def note(self, key: str, reason: str) -> None:
        self.used.add(key)
        self.notes.append(Note(key, reason))

    def number(self, key: str, low: float, high: float, fallback: float) -> float:
        """A number within cgpolicy's range; outside it, the nearest bound, noted."""
        value = self.use(key)
        if not _real(value):
            self.note(key, f"{value!r} is not a number; cgpolicy's default {fallback:g} is used")
            return fallback
        if not low <= value <= high:
            near = min(max(value, low), high)
            self.note(key, f"{value!r} is outside cgpolicy's range {low!r} to {high!r}: {near!r}")
            return float(near)
        return float(value) if isinstance(value, float) else int(value)

    def whitelist(self, table: str) -> tuple[list[str], str]:
        """``whitelist`` and ``whitelist_file``'s lines in ``table``, as cgpolicy takes them."""
        entries = self.use(f"{table}.whitelist", [])
        if not isinstance(entries, list):
            self.note(f"{table}.whitelist", f"{entries!r} is not a list; left out")
            entries = []
        file_key = f"{table}.whitelist_file"
        name = self.use(file_key, "")
        if name and isinstance(name, str):
            entries = entries + self._whitelist_file(file_key, name)
        elif name:
            self.note(file_key, f"{name!r} is not a file name; left out")
        valid: list[str] = []
        for entry in entries:
            if not isinstance(entry, str) or not entry or not is_whitelist_entry(entry):
                self.note(f"{table}.whitelist", f"{entry!r} names no program; left out")
            elif entry not in valid:
                valid.append(entry)
        return valid, f"{table}.whitelist" + (", whitelist_file" if name else "")

    def _whitelist_file(self, key: str, name: str) -> list[str]:
        if _SPECIAL_RE.search(name):
            self.note(key, f"{name!r} uses %H or ${{...}}: not read; add its entries by hand")
            return []
        # Arbiter2 reads relative paths from the directory of its program.
        path = Path(os.path.normpath(self.base_dir / name))
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, ValueError) as err:  # ValueError: undecodable, or a NUL in the name
            self.note(key, f"cannot read {path}: {err}; add its entries by hand")
            return []
        return [line.strip() for line in lines if line.strip()]

    def leaves(self, table: dict[str, Any], prefix: str = "") -> Iterator[str]:
        for key, value in table.items():
            if isinstance(value, dict):
                yield from self.leaves(value, f"{prefix}{key}.")
            else:
                yield prefix + key


def _real(value: Any) -> bool:
    """A finite number (TOML has inf and nan; true is no number)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def cpu_quota(percent_of_thread: float, tpc: int) -> tuple[str, str | None]:
    """An Arbiter2 cpu_quota as CPUQuota, and what was lost in the conversion, if anything."""
    percent = percent_of_thread / tpc
    if percent * 100 > PERMYRIAD_MAX:
        return "infinity", "above systemd's largest CPUQuota: no CPU limit and no CPU badness"
    permyriad = round(percent * 100)
    if permyriad < 1:
        return "0.01%", f"{percent:g}% is below systemd's smallest CPUQuota 0.01%"
    text = f"{permyriad // 100}%" if permyriad % 100 == 0 else f"{permyriad / 100:.2f}%"
    lost = None if permyriad == percent * 100 else f"{percent:g}% rounded to {text}"
    return text, lost


def memory_size(gb: float) -> int | str | None:
    """An Arbiter2 mem_quota (GB of 1024^3 bytes) as MemoryMax: exact, in the largest unit.

    None below one byte, which no limit can be.
    """
    if gb * GIB >= 2**64 - 1:
        return "infinity"
    size = round(gb * GIB)
    if size < 1:
        return None
    for suffix, unit in (("T", 1024**4), ("G", GIB), ("M", 1024**2), ("K", 1024)):
        if size % unit == 0:
            return f"{size // unit}{suffix}"
    return size


def import_site(
    config: dict[str, Any], base_dir: Path, tpc: int, sources: list[str], tpc_origin: str = "given"
) -> Imported:
    """The policy equivalent to ``config``; ``base_dir`` is where Arbiter2's program lives.

    ``tpc``: the login nodes' threads per core, and ``tpc_origin`` where it came from.
    """
    site = _Site(config, base_dir, tpc, tpc_origin)
    general, watch = _general(site)
    groups, order, fallback = _groups(site)
    main = [general, _status(order, fallback), _badness(site), _processes(site)]
    main += _penalty(site, config_groups(site.config), fallback, watch)
    main += [table for table in (_history(site), _notify(site), _sync(site)) if table]
    for key in site.leaves(config):
        if key in site.used:
            continue
        reason = NO_EQUIVALENT.get(key) or NO_EQUIVALENT.get(key.partition(".")[0])
        site.note(key, reason or "not a setting of Arbiter2 this importer knows; ignored")
    owners = "processes.proc_owner_whitelist"
    if owners not in site.used:  # absent: Arbiter2's default whitelists root's processes
        site.note(owners, f"{site.get(owners)!r}: {NO_EQUIVALENT[owners]}")
    files = {MAIN_FILE: _header(sources, site.notes, site.same) + tomlwrite.text(main)}
    for name, tables in groups.items():
        files[f"{GROUPS_DIR}/{name}.toml"] = tomlwrite.text(tables)
    return Imported(files, site.notes, site.same, site.secrets)


def config_groups(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Arbiter2's status groups: the tables of [status] but its penalty table."""
    status = config.get("status")
    if not isinstance(status, dict):
        return {}
    return {
        name: table
        for name, table in status.items()
        if isinstance(table, dict) and name != "penalty"
    }


def _general(site: _Site) -> tuple[Table, bool]:
    """[general], and whether the policy watches (Arbiter2's debug mode)."""
    table = Table("general")
    watch = site.flag("general.debug_mode")
    if not watch:
        site.matched("general.debug_mode")
    else:
        site.note(
            "general.debug_mode",
            "true: Arbiter2 limited nobody and mailed the admins alone; the imported [penalty] "
            'mode is "watch": cgpolicyd scores users, records their tiers and mails them to '
            "the admins alone, but lowers no limit. Unlike Arbiter2's debug mode, each group's "
            "own limits are set at login as ever (badness is judged against them), and the "
            'mail has no debug section. Set mode = "enforce" when the trial is over',
        )
    min_uid = int(site.number("general.min_uid", 1, ID_MAX, 1000))
    table.add("min_uid", min_uid, "general.min_uid")
    refresh = site.number("general.arbiter_refresh", 1, 3600, 10)
    table.add("interval", refresh, "general.arbiter_refresh")
    return table, watch


def _status(order: list[str], fallback: str) -> Table:
    table = Table("status")
    table.add("order", order, "status.order")
    table.add("fallback", fallback, "status.fallback_status")
    return table


def _groups(site: _Site) -> tuple[dict[str, list[Table]], list[str], str]:
    defined = config_groups(site.config)
    fallback = site.use("status.fallback_status")
    order = site.use("status.order", [])
    if not isinstance(order, list) or not all(isinstance(name, str) for name in order):
        raise SiteImportError(f"status.order must be a list of names, not {order!r}")
    if not isinstance(fallback, str) or fallback not in defined:
        raise SiteImportError(f"status.fallback_status {fallback!r} names no [status.NAME] table")
    if not is_group_name(fallback) or "." in fallback:
        raise SiteImportError(
            f"status.fallback_status {fallback!r} cannot name a group: use letters, digits, "
            "'_' and '-'"
        )
    div = site.flag("status.div_cpu_quotas_by_threads_per_core")
    if not div:
        site.matched("status.div_cpu_quotas_by_threads_per_core")
    else:
        site.notes.append(
            Note(
                "status.div_cpu_quotas_by_threads_per_core",
                f"true: every cpu_quota was divided by {site.tpc} threads per core "
                f"({site.tpc_origin})",
            )
        )
    tpc = site.tpc if div else 1
    groups: dict[str, list[Table]] = {}
    for name, table in defined.items():
        prefix = f"status.{name}"
        if not is_group_name(name) or "." in name:  # a dot would split its dotted keys
            site.note(prefix, "not a cgpolicy group name without dots; left out")
        elif name != fallback and name not in order:
            site.note(prefix, "not in status.order, so Arbiter2 never selected it; left out")
        elif name != fallback and not (_ids(table.get("uids")) or _ids(table.get("gids"))):
            site.note(prefix, "has no uids or gids, so it matches nobody; left out")
        else:
            groups[name] = _group(site, name, tpc)
            continue
        site.used.update(f"{prefix}.{key}" for key in table)
    for name in order:
        if name not in defined:
            site.note("status.order", f"{name!r} has no [status.{name}] table; left out")
    kept = list(dict.fromkeys(name for name in order if name in groups))  # first match wins
    return groups, kept or [fallback], fallback  # policy needs an order; all fall back anyway


def _group(site: _Site, name: str, tpc: int) -> list[Table]:
    prefix = f"status.{name}"
    rules = Table()
    rules.add("description", f"imported from [{prefix}]", prefix)
    for kind in ("uids", "gids"):
        ids = site.use(f"{prefix}.{kind}", [])
        valid = _ids(ids)
        if len(valid) != (len(ids) if isinstance(ids, list) else 1):
            site.note(f"{prefix}.{kind}", f"left out what is not an id from 0 to {ID_MAX}")
        if valid:
            rules.add(kind, valid, f"{prefix}.{kind}")
    whitelist, source = site.whitelist(prefix)
    if whitelist:
        rules.add("whitelist", whitelist, source)
    limits = Table("limits")
    cpu = site.use(f"{prefix}.cpu_quota")
    if _positive(cpu):
        quota, lost = cpu_quota(cpu, tpc)
        if lost:
            site.notes.append(Note(f"{prefix}.cpu_quota", lost))
        limits.add("CPUQuota", quota, f"{prefix}.cpu_quota = {cpu!r}" + (f" / {tpc}" * (tpc > 1)))
    else:
        site.note(f"{prefix}.cpu_quota", f"{cpu!r} is not a positive quota: no CPU limit")
    memory = site.use(f"{prefix}.mem_quota")
    size = memory_size(memory) if _positive(memory) else None
    if size is not None:
        limits.add("MemoryMax", size, f"{prefix}.mem_quota = {memory!r} GB")
    else:
        site.note(f"{prefix}.mem_quota", f"{memory!r} is not a quota of a byte or more: no limit")
    return [rules, limits]


def _ids(value: Any) -> list[int]:
    """The uids or gids in an Arbiter2 list: whole numbers within the kernel's range."""
    items = value if isinstance(value, list) else [] if value is None else [value]
    return [i for i in items if type(i) is int and 0 <= i <= ID_MAX]


def _positive(value: Any) -> bool:
    return _real(value) and value > 0


def _badness(site: _Site) -> Table:
    table = Table("badness")
    for ours, theirs in (
        ("cpu_threshold", "cpu_badness_threshold"),
        ("memory_threshold", "mem_badness_threshold"),
    ):
        key = f"badness.{theirs}"
        value = site.number(key, 0.01, 1, 0.5)
        table.add(ours, value, key)
    for key in ("time_to_max_bad", "time_to_min_bad"):
        table.add(key, site.number(f"badness.{key}", 1, 86400 * 7, 600), f"badness.{key}")
    if site.flag("badness.cap_badness_incr"):
        site.matched("badness.cap_badness_incr")
    else:
        site.note(
            "badness.cap_badness_incr",
            "false: cgpolicy always counts usage above the quota as the quota",
        )
    return table


def _processes(site: _Site) -> Table:
    table = Table("processes")
    whitelist, source = site.whitelist("processes")
    table.add("whitelist", whitelist, source)
    if whitelist:
        site.notes.append(
            Note(
                "processes.whitelist",
                'Arbiter2 trusted process names; cgpolicy\'s match = "executable" (its '
                "default) trusts a name only for a program owned by root in a root-only "
                'directory. match = "name" would trust names as Arbiter2 did',
            )
        )
    site.false_is_ours(
        "processes.memsw",
        "MemoryMax limits memory without swap; swap has its own limit, "
        "MemorySwapMax (cgroup v2), left unset",
    )
    site.false_is_ours(
        "processes.whitelist_other_processes",
        "cgpolicy charges all of a slice's CPU but whitelisted programs', "
        "short-lived processes it cannot name included",
    )
    return table


def _penalty(
    site: _Site, groups: dict[str, dict[str, Any]], fallback: str, watch: bool
) -> list[Table]:
    table = site.get("status.penalty")
    if not isinstance(table, dict):
        reason = "absent" if table is None else f"{table!r} is not a table"
        site.note("status.penalty", f"{reason}: nobody is ever penalized")
        return []
    head = Table("penalty")
    relative = site.flag("status.penalty.relative_quotas")
    if relative:
        site.matched("status.penalty.relative_quotas")
    else:
        site.notes.append(
            Note(
                "status.penalty.relative_quotas",
                "false: a cgpolicy tier scales each group's own limits; its factors are "
                f"the penalty's quotas as fractions of the fallback group {fallback!r}'s, "
                "so other groups get proportionally different limits than in Arbiter2",
            )
        )
    order = site.use("status.penalty.order", [])
    if not isinstance(order, list):
        raise SiteImportError(f"status.penalty.order must be a list of names, not {order!r}")
    tiers: dict[str, Table] = {}
    for name in map(str, order):
        tier = _tier(site, name, relative, groups[fallback])
        if tier is not None:
            tiers[name] = tier
    head.add("order", list(tiers), "status.penalty.order")
    timeout = site.number("status.penalty.occur_timeout", 1, 86400 * 365, 10800)
    head.add("occurrence_timeout", timeout, "status.penalty.occur_timeout")
    if watch:
        head.add("mode", "watch", "general.debug_mode = true")
    for key, value in table.items():
        if isinstance(value, dict) and key not in order:
            site.note(f"status.penalty.{key}", "not in status.penalty.order; left out")
            site.used.update(f"status.penalty.{key}.{k}" for k in value)
    if not tiers:
        site.notes.append(Note("status.penalty", "no tier could be imported: no penalties"))
        return []
    return [head, *tiers.values()]


def _tier(site: _Site, name: str, relative: bool, fallback: dict[str, Any]) -> Table | None:
    prefix = f"status.penalty.{name}"
    table = site.get(prefix)
    if not isinstance(table, dict) or name in ("order", "occurrence_timeout") or not name:
        site.note("status.penalty.order", f"{name!r} has no usable [{prefix}] table; left out")
        return None
    result = Table("penalty", name)
    result.add(
        "timeout", site.number(f"{prefix}.timeout", 1, 86400 * 365, 1800), f"{prefix}.timeout"
    )
    for ours, theirs in (("cpu_factor", "cpu_quota"), ("memory_factor", "mem_quota")):
        key = f"{prefix}.{theirs}"
        value = site.use(key)
        base = 1 if relative else fallback.get(theirs)
        if not _positive(value) or not _positive(base):
            site.note(key, f"{value!r} is not a positive quota; tier left out")
            return None
        factor = value if relative else round(value / base, 6)  # 6 digits: still readable
        source = key if relative else f"{key} = {value!r} / fallback's {base!r}"
        if factor > 1:
            site.notes.append(Note(key, f"{factor:g} raises the limit; a tier only lowers: 1"))
            factor = 1
        result.add(ours, factor, source)
    expression = site.use(f"{prefix}.expression", "")
    if isinstance(expression, str) and expression:
        result.add("message", expression, f"{prefix}.expression")
    for key in table:
        if f"{prefix}.{key}" not in site.used:
            site.note(f"{prefix}.{key}", NOT_IN_PENALTY)
    return result


def _history(site: _Site) -> Table | None:
    """[history] retention, when Arbiter2's plot window is longer than cgpolicy's default."""
    key = "badness.max_history_kept"
    kept = site.use(key)
    if kept is None:
        return None
    refresh = site.get("general.arbiter_refresh")
    per_refresh = site.get("general.history_per_refresh")
    if not all(_positive(v) for v in (kept, refresh, per_refresh)):
        site.note(key, f"{kept!r} with its refresh settings makes no span of time; left out")
        return None
    span = kept * refresh / per_refresh
    if span <= _RETENTION:
        site.note(
            key,
            f"Arbiter2 kept the last {kept:g} samples ({span:g} s) in memory for its plots; "
            f"cgpolicyd records each interval's usage on disk and keeps it for [history] "
            f"retention, left at its default of {_RETENTION / 86400:g} days, which covers it",
        )
        return None
    table = Table("history")
    source = f"{key} * general.arbiter_refresh / general.history_per_refresh, in seconds"
    if span > _RETENTION_MAX:
        site.note(key, f"{span:g} s is beyond [history] retention's largest, {_RETENTION_MAX}")
    table.add("retention", min(math.ceil(span), _RETENTION_MAX), source)
    return table


def _mail_server(server: Any) -> tuple[str, int | None] | None:
    """Arbiter2's mail_server as host and port, split as its smtplib does; None if none."""
    if not isinstance(server, str) or not server or any(c.isspace() for c in server):
        return None
    if server.count(":") != 1:  # no port, or an IPv6 address
        return server, None
    host, _, port = server.partition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return None
    return host, int(port)


def _notify(site: _Site) -> Table | None:
    """[email] as [notify]: Arbiter2 mails over plain SMTP, without login or TLS."""
    if not isinstance(site.get("email"), dict):
        return None
    server = _mail_server(site.use("email.mail_server"))
    sender = site.use("email.from_email")
    if isinstance(sender, str) and not is_address(sender):
        name, address = parseaddr(sender)  # "Arbiter <arbiter@example.org>"
        if name and is_address(address):
            sender = address
            site.notes.append(Note("email.from_email", f"{name!r} left out: From is {address}"))
    domain = site.use("email.email_domain")
    admins = site.use("email.admin_emails", [])
    if server is None:
        why = ("email.mail_server", f"{site.get('email.mail_server')!r} names no SMTP server")
    elif not isinstance(sender, str) or not is_address(sender):
        why = ("email.from_email", f"{sender!r} is not a plain mail address")
    elif not isinstance(domain, str) or not is_address(f"user@{domain}"):
        why = ("email.email_domain", f"{domain!r} makes no address of a user's name")
    else:
        why = None
    if why is not None:
        site.note(why[0], f"{why[1]}: no [notify] written, so cgpolicy sends no mail")
        return None
    assert server is not None and isinstance(sender, str) and isinstance(domain, str)
    if not isinstance(admins, list):
        admins = [admins]
    valid = [a for a in admins if isinstance(a, str) and is_address(a)]
    if len(valid) != len(admins):
        site.note("email.admin_emails", "left out what is not a plain mail address")
    table = Table("notify")
    table.add("host", server[0], "email.mail_server")
    if server[1] is not None:
        table.add("port", server[1], "email.mail_server")
    table.add("from", sender, "email.from_email")
    table.add("user_address", "{user}@" + domain, "email.email_domain")
    table.add("admins", list(dict.fromkeys(valid)), "email.admin_emails")
    site.notes.append(
        Note(
            "email.email_domain",
            "each user is mailed at NAME@" + domain + "; an address integrations.py's "
            "email_addr_of looked up another way is not carried over",
        )
    )
    site.notes.append(
        Note(
            "email",
            "the mail's text is cgpolicy's own (the tier's message in its subject, the limits, "
            "why, the top processes and a plot); integrations.py and the templates are not read",
        )
    )
    return table


def _sync(site: _Site) -> Table | None:
    """[database] as [sync], when Arbiter2's status database was a shared PostgreSQL one."""
    url_key, group_key = "database.statusdb_url", "database.statusdb_sync_group"
    url = site.use(url_key, "")
    group = site.use(group_key, "")
    if not isinstance(url, str) or not isinstance(group, str):
        site.note(url_key, "not a text: no [sync] written; nothing is shared between nodes")
        return None
    if not url:
        if group:
            site.note(group_key, f"{LOCAL}, so the group shared nothing")
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        site.note(url_key, "not a database URL: no [sync] written")
        return None
    dialect = parts.scheme.partition("+")[0]
    if dialect == "sqlite":
        site.note(url_key, f"{LOCAL}: nothing was shared")
        return None
    if dialect not in ("postgresql", "postgres"):
        site.note(
            url_key,
            f"a {dialect or 'nameless'} database: cgpolicy's nodes share penalties through "
            "PostgreSQL only ([sync]); none written, nothing is shared",
        )
        return None
    userinfo, _, location = parts.netloc.rpartition("@")
    name, has_password, _ = userinfo.partition(":")
    if _SPECIAL_RE.search(f"{name}@{location}{parts.path}?{parts.query}"):
        site.note(url_key, "uses %H or ${...}, expanded by Arbiter2 at run time: write [sync]")
        return None
    if "%H" in group:
        reason = "one group per host: Arbiter2 shared nothing, as cgpolicy without [sync]"
        site.note(group_key, reason)
        return None
    if _SPECIAL_RE.search(group) or any(c.isspace() for c in group):
        site.note(group_key, f"{group!r} has ${{...}} or spaces: write [sync] by hand")
        return None
    query = dict(parse_qsl(parts.query))
    host = query.pop("host", "") or unquote(parts.hostname or "")
    values = {"host": host, "database": unquote(parts.path.lstrip("/")), "user": unquote(name)}
    missing = [k for k, v in values.items() if not v or any(c.isspace() for c in v)]
    if missing:
        site.note(url_key, f"gives no {' or '.join(missing)}: no [sync] written; write it")
        return None
    table = Table("sync")
    for key, value in values.items():
        table.add(key, value, url_key)
    if port is not None:
        table.add("port", port, url_key)
    if has_password:
        path = SYNC_PASSWORD_FILE
        table.add("password_file", path, f"{url_key}'s password, not written here")
        site.secrets["sync.password_file"] = path
        site.notes.append(
            Note(
                url_key,
                f"its password is not written into the policy: create {path}, root's alone "
                "(mode 0600), with the password on its first line, before cgpolicyctl check",
            )
        )
    if group:
        table.add("group", group, group_key)
    else:
        table.add("group", DEFAULT_SYNC_GROUP, f'{group_key} = ""')
        reason = "empty: every Arbiter2 on the database shared; cgpolicy needs a name"
        site.notes.append(Note(group_key, f"{reason}, {DEFAULT_SYNC_GROUP!r} on every node"))
    if query.pop("sslpassword", None) is not None:
        site.notes.append(
            Note(
                url_key,
                "its sslpassword is not written into the policy, which anyone may "
                "read: give cgpolicyd a key without a passphrase",
            )
        )
    for key in SYNC_TLS_KEYS:
        if key in query:
            table.add(key, query.pop(key), f"{url_key}'s {key}")
    if query:
        left = ", ".join(sorted(query))
        site.note(url_key, f"its {left} not carried over: [sync] takes libpq's TLS options alone")
    return table


# --- writing ------------------------------------------------------------------------


def _header(sources: list[str], notes: list[Note], same: list[str]) -> str:
    lines = [
        "# Imported from an Arbiter2 configuration by cgpolicyctl import-arbiter2,",
        f"# from {', '.join(tomlwrite.comment(s) for s in sources)}.",
        "# Each value's comment names the Arbiter2 setting it comes from.",
    ]
    if same:
        lines.append("#\n# Settings that are cgpolicy's own behaviour, with nothing to write:")
        lines += textwrap.wrap(
            ", ".join(same), WIDTH, initial_indent="#   ", subsequent_indent="#   "
        )
    if notes:
        lines.append("#\n# Settings not carried over exactly:")
        for note in merged_notes(notes):
            lines += textwrap.wrap(
                tomlwrite.comment(str(note)),
                WIDTH,
                initial_indent="#   ",
                subsequent_indent="#     ",
            )
    return "\n".join(lines) + "\n\n"


def write_policy(imported: Imported, out: Path) -> None:
    """Write the files into ``out``, which must not exist or be empty.

    Modes are set, not left to the umask: the policy's own check refuses files
    anyone but their owner may write.
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SiteImportError(f"{out} exists and is not an empty directory")
    (out / GROUPS_DIR).mkdir(parents=True, exist_ok=True)
    for directory in (out, out / GROUPS_DIR):
        directory.chmod(0o755)
    for name, text in imported.files.items():
        path = out / name
        path.write_text(text, encoding="utf-8")
        path.chmod(0o644)
