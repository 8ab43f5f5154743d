"""The policy on disk: ``cgpolicy.toml`` and one ``groups.d/NAME.toml`` per status group.

``load_policy`` reads and validates everything and either returns a Policy or
raises PolicyError listing every problem, each with file, line and key. It
never returns a half-valid policy: callers keep the last good one instead.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from . import limits as limits_mod
from .badness import ENFORCE, PENALTY_MODES, WATCH, BadnessParams, PenaltyParams, Tier
from .constants import GROUPS_DIR, MAIN_FILE, policy_files
from .errors import LimitError, PolicyError, Problem, policy_error
from .slicelimits import INFINITY, TIER_LOWERS
from .trust import why_unsafe
from .usage import MATCH_EXECUTABLE, MATCH_MODES

DEFAULT_BADNESS = BadnessParams(
    cpu_threshold=0.8, memory_threshold=0.5, time_to_max_bad=300, time_to_min_bad=1800
)
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")  # a group's name, its file's stem
_RANGE_RE = re.compile(r"\s*(\d{1,10})\s*-\s*(\d{1,10})\s*", re.ASCII)
ID_MAX = 2**32 - 2  # the largest uid or gid; 2^32-1 is the kernel's "no id"
NAME_RULE = "letters, digits, '_', '-' and '.', not first, at most 64 characters"
_TOML_LINE_RE = re.compile(r"at line (\d+)")
_TABLE_RE = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]")


def is_group_name(name: str) -> bool:
    """Whether ``name`` may name a status group (and its file's stem)."""
    return _NAME_RE.fullmatch(name) is not None


@dataclass(frozen=True)
class General:
    min_uid: int = 1000
    hook_timeout: float = 2.0
    interval: float = 10.0  # seconds between the daemon's evaluations
    admin_group: str = ""  # its members may call every method of the daemon's D-Bus API


# Debian's prometheus-node-exporter reads *.prom files here (its textfile collector).
DEFAULT_TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"


@dataclass(frozen=True)
class MetricsSettings:
    """[metrics]: where cgpolicyd writes its series each cycle; "" writes none."""

    textfile_dir: str = DEFAULT_TEXTFILE_DIR


@dataclass(frozen=True)
class Notify:
    """[notify]: how mail about penalties reaches users and admins, over SMTP.

    The password is not kept here: it is read from ``password_file`` when a mail
    is sent, so that it never lands in the compiled copy of the policy.
    """

    host: str
    port: int = 25
    starttls: bool = False
    user: str = ""  # SMTP login; empty: none
    password_file: str = ""  # root-only file holding the SMTP password
    sender: str = ""  # the From address ("from" in the file)
    user_address: str = ""  # the user's address; {user} stands for the account's name
    admins: tuple[str, ...] = ()  # in Bcc of every mail; alone for watched events
    timeout: float = 30.0  # seconds for one SMTP conversation


@dataclass(frozen=True)
class Sync:
    """[sync]: the PostgreSQL database through which the login nodes of a group share
    their penalties (sync.py). Like [notify]'s, the password stays in its file."""

    host: str
    database: str
    user: str
    group: str  # the sync group: nodes of one group share their standings
    node: str  # this node's name in the group; by default the host name
    port: int = 5432
    password_file: str = ""  # root-only file holding the database password
    timeout: float = 3.0  # seconds to connect, and for one statement
    tls: tuple[tuple[str, str], ...] = ()  # libpq's sslmode, sslrootcert, ... as given


@dataclass(frozen=True)
class StatusGroup:
    name: str
    description: str = ""
    users: tuple[str, ...] = ()
    uids: tuple[tuple[int, int], ...] = ()  # inclusive ranges; a single uid is (n, n)
    groups: tuple[str, ...] = ()
    gids: tuple[int, ...] = ()
    exempt: bool = False
    limits: dict[str, int | str] = field(default_factory=dict)
    whitelist: tuple[str, ...] = ()  # process names whose CPU is not held against members
    penalty_mode: str | None = None  # "enforce" or "watch"; None: [penalty] mode

    def matches_nobody(self) -> bool:
        return not (self.users or self.uids or self.groups or self.gids)


@dataclass(frozen=True)
class HistoryParams:
    """[history]: how long cgpolicyd keeps its usage samples (usagehistory.py)."""

    retention: float = 7 * 86400  # seconds


@dataclass(frozen=True)
class Policy:
    general: General
    order: tuple[str, ...]
    fallback: str
    groups: dict[str, StatusGroup]
    badness: BadnessParams = DEFAULT_BADNESS
    whitelist: tuple[str, ...] = ()  # for every group: [processes].whitelist
    penalty: PenaltyParams | None = None  # no [penalty] table: nobody is ever penalized
    whitelist_match: str = MATCH_EXECUTABLE  # [processes].match: what decides a whitelist entry
    history: HistoryParams = HistoryParams()
    notify: Notify | None = None  # no [notify] table: no mail
    metrics: MetricsSettings = MetricsSettings()
    sync: Sync | None = None  # no [sync] table: a single node

    def watched(self, group: str) -> bool:
        """True if the group's penalties are watched only: judged and recorded, never applied.

        The one rule: the group's own penalty_mode, else [penalty] mode. The
        compiled policy carries its answer per group (slicelimits.is_watched).
        """
        if self.penalty is None:
            return False
        return (self.groups[group].penalty_mode or self.penalty.mode) == WATCH

    def managed_keys(self) -> set[str]:
        """The limits some group sets: the ones cgpolicy owns on every user slice.

        With penalties, also the ones a tier lowers, so that a group's limits
        lift a tier's MemoryHigh even when no group sets one.
        """
        keys = {key for group in self.groups.values() for key in group.limits}
        return keys | (set(TIER_LOWERS) if self.penalty else set())

    def to_data(self) -> dict[str, Any]:
        """The whole policy as plain data (marshal can save it); ``from_data`` reads it back."""
        return asdict(self)

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Policy:
        """The policy ``to_data`` gave; the sections' own checks run again."""
        penalty = data["penalty"]
        return cls(
            general=General(**data["general"]),
            order=tuple(data["order"]),
            fallback=data["fallback"],
            groups={name: StatusGroup(**group) for name, group in data["groups"].items()},
            badness=BadnessParams(**data["badness"]),
            whitelist=tuple(data["whitelist"]),
            penalty=None
            if penalty is None
            else PenaltyParams(
                tuple(Tier(**tier) for tier in penalty["tiers"]),
                penalty["occurrence_timeout"],
                penalty["mode"],
            ),
            whitelist_match=data["whitelist_match"],
            history=HistoryParams(**data["history"]),
            notify=None
            if data.get("notify") is None
            else Notify(**{**data["notify"], "admins": tuple(data["notify"]["admins"])}),
            # absent from a copy saved before [metrics] existed
            metrics=MetricsSettings(**data.get("metrics", {})),
            sync=None
            if data.get("sync") is None
            else Sync(**{**data["sync"], "tls": tuple(tuple(o) for o in data["sync"]["tls"])}),
        )

    def compile(self) -> dict[str, Any]:
        """The compiled form the hook and the CLI act on: plain data, D-Bus values ready.

        ``tiers``: each penalty tier's (cpu_factor, memory_factor), for slice_limits.

        Under "policy", the whole policy: the saved copy of the last good one is
        what cgpolicyd starts on when the files are broken (daemon sections too).
        """
        managed = self.managed_keys()
        tiers = self.penalty.tiers if self.penalty else ()
        return {
            "policy": self.to_data(),
            "min_uid": self.general.min_uid,
            "hook_timeout": self.general.hook_timeout,
            "order": self.order,
            "fallback": self.fallback,
            "tiers": {tier.name: (tier.cpu_factor, tier.memory_factor) for tier in tiers},
            "groups": {
                name: {
                    "name": name,
                    "description": group.description,
                    "users": group.users,
                    "uids": group.uids,
                    "groups": group.groups,
                    "gids": group.gids,
                    "exempt": group.exempt,
                    "limits": dict(group.limits),
                    "whitelist": group.whitelist,
                    "watch": self.watched(name),
                    "properties": tuple(
                        (p.name, p.signature, p.value)
                        for p in limits_mod.properties_for(group.limits, managed)
                    ),
                }
                for name, group in self.groups.items()
            },
        }


class _File:
    """One TOML file being validated: its text, its data and the problems found in it."""

    def __init__(self, path: Path, problems: list[Problem]) -> None:
        self.path = path
        self.problems = problems
        self.data: dict[str, Any] | None = None
        try:
            self.text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            self.text = ""
            self.report(f"cannot read: {err}")
            return
        try:
            self.data = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as err:
            found = _TOML_LINE_RE.search(str(err))
            line = int(found.group(1)) if found else None
            self.problems.append(Problem(str(path), f"not valid TOML: {err}", line=line))
        except (RecursionError, ValueError) as err:  # nested too deep, a number too long
            self.report(f"not valid TOML: {type(err).__name__}: {err}")

    def line_of(self, key: str) -> int | None:
        """The line that sets ``key`` ("table.name"), found by reading the text.

        Failing that, the line of its table's header: an absent key is missing there.
        """
        table, _, name = key.rpartition(".")
        current = ""
        pattern = re.compile(rf"^\s*(\"?){re.escape(name)}\1\s*[=.]")
        headers: dict[str, int] = {}
        for number, text in enumerate(self.text.splitlines(), start=1):
            header = _TABLE_RE.match(text)
            if header:
                current = header.group(1).replace('"', "")
                headers.setdefault(current, number)
                headers.setdefault(current.partition(".")[0], number)
            elif current == table and pattern.match(text):
                return number
        return headers.get(key) or headers.get(table)

    def report(self, message: str, key: str | None = None) -> None:
        line = self.line_of(key) if key else None
        self.problems.append(Problem(str(self.path), message, key=key, line=line))

    def check_keys(self, table: dict[str, Any], known: set[str], prefix: str = "") -> None:
        for key in table:
            if key not in known:
                self.report(
                    f"unknown key; expected one of: {', '.join(sorted(known))}", prefix + key
                )

    def get(
        self,
        table: dict[str, Any],
        key: str,
        kind: type | tuple[type, ...],
        default: Any,
        prefix: str = "",
    ) -> Any:
        value = table.get(key, default)
        wrong_bool = isinstance(value, bool) and bool not in _as_tuple(kind)
        if value is not default and (wrong_bool or not isinstance(value, kind)):
            self.report(f"must be {_type_name(kind)}, not {_describe(value)}", prefix + key)
            return default
        return value

    def number(
        self,
        table: dict[str, Any],
        key: str,
        default: float,
        low: float,
        high: float,
        prefix: str = "",
    ) -> float:
        value = self.get(table, key, (int, float), default, prefix)
        if not low <= value <= high:
            self.report(f"must be from {low:g} to {high:g}, not {value!r}", prefix + key)
            return default
        return float(value)

    def fraction(self, table: dict[str, Any], key: str, default: float, prefix: str = "") -> float:
        value = self.get(table, key, (int, float), default, prefix)
        if not 0 < value <= 1:
            self.report(
                f"must be a fraction more than 0 and at most 1, not {value!r}", prefix + key
            )
            return default
        return float(value)

    def string_list(self, table: dict[str, Any], key: str, prefix: str = "") -> tuple[str, ...]:
        values = self.get(table, key, list, [], prefix)
        for value in values:
            if not isinstance(value, str) or not value:
                self.report(f"must be a list of names, found {_describe(value)}", prefix + key)
                return ()
        return tuple(values)


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _type_name(kind: type | tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "a whole number",
        float: "a number",
        bool: "true or false",
        list: "a list",
        dict: "a table",
    }
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))


def _describe(value: object) -> str:
    return f"{type(value).__name__} {value!r}"


def _check_ownership(path: Path, trusted_uids: set[int], problems: list[Problem]) -> None:
    """Only root may be able to change what the hook, run as root, will do."""
    reason = why_unsafe(str(path), trusted_uids)
    if reason is not None:
        problems.append(Problem(str(path), f"owner/permissions: {reason}"))


def _parse_general(main: _File, data: dict[str, Any]) -> General:
    table = main.get(data, "general", dict, {})
    main.check_keys(table, {"min_uid", "hook_timeout", "interval", "admin_group"}, "general.")
    defaults = General()
    min_uid = main.get(table, "min_uid", int, defaults.min_uid, "general.")
    if not 1 <= min_uid <= ID_MAX:
        main.report(f"must be from 1 to {ID_MAX}: root is never limited", "general.min_uid")
        min_uid = defaults.min_uid
    timeout = main.number(table, "hook_timeout", defaults.hook_timeout, 0.1, 60, "general.")
    interval = main.number(table, "interval", defaults.interval, 1, 3600, "general.")
    admin_group = main.get(table, "admin_group", str, defaults.admin_group, "general.")
    return General(min_uid, timeout, interval, admin_group)


def _parse_badness(main: _File, data: dict[str, Any]) -> BadnessParams:
    table = main.get(data, "badness", dict, {})
    main.check_keys(table, {f.name for f in fields(BadnessParams)}, "badness.")
    d = DEFAULT_BADNESS
    return BadnessParams(
        cpu_threshold=main.fraction(table, "cpu_threshold", d.cpu_threshold, "badness."),
        memory_threshold=main.fraction(table, "memory_threshold", d.memory_threshold, "badness."),
        time_to_max_bad=main.number(
            table, "time_to_max_bad", d.time_to_max_bad, 1, 86400 * 7, "badness."
        ),
        time_to_min_bad=main.number(
            table, "time_to_min_bad", d.time_to_min_bad, 1, 86400 * 7, "badness."
        ),
    )


def is_whitelist_entry(entry: str) -> bool:
    """A program's name ("rsync"), or its absolute path as the kernel reports it: plain, no "."."""
    if "\0" in entry:
        return False
    if "/" in entry:
        plain = entry.startswith("/") and not entry.startswith("//")
        return plain and os.path.normpath(entry) == entry != "/"
    return entry not in (".", "..")


def _parse_whitelist(file: _File, table: dict[str, Any], prefix: str = "") -> tuple[str, ...]:
    """Program names ("rsync": that name in a root-only directory) or absolute paths."""
    entries = file.string_list(table, "whitelist", prefix)
    for entry in entries:
        if not is_whitelist_entry(entry):
            file.report(
                f"{entry!r} is neither a program's name nor its absolute path, "
                'e.g. "rsync" or "/usr/bin/rsync"',
                prefix + "whitelist",
            )
            return ()
    return entries


def _parse_metrics(main: _File, data: dict[str, Any]) -> MetricsSettings:
    table = main.get(data, "metrics", dict, {})
    main.check_keys(table, {f.name for f in fields(MetricsSettings)}, "metrics.")
    default = MetricsSettings().textfile_dir
    directory = main.get(table, "textfile_dir", str, default, "metrics.")
    # Root writes there: a plain absolute path, no "..", as the kernel would resolve it.
    plain = directory.startswith("/") and os.path.normpath(directory) == directory != "/"
    if directory and (not plain or directory.startswith("//") or "\0" in directory):
        main.report(
            f"{directory[:200]!r} is not a directory's absolute path, e.g. {default!r} "
            '(or "" to write no metrics file)',
            "metrics.textfile_dir",
        )
        directory = default
    return MetricsSettings(directory)


def _parse_penalty(main: _File, data: dict[str, Any]) -> PenaltyParams | None:
    if "penalty" not in data:
        return None
    table = main.get(data, "penalty", dict, {})
    order = main.string_list(table, "order", "penalty.")
    known = {"order", "occurrence_timeout", "mode", *order}
    main.check_keys(table, known, "penalty.")
    occurrence_timeout = main.number(table, "occurrence_timeout", 10800, 1, 86400 * 365, "penalty.")
    mode = _penalty_mode(main, table, "penalty.") or ENFORCE
    if "mode" in order:
        main.report("'mode' is a setting of [penalty], not a tier's name", "penalty.order")
        return None
    tiers = []
    for name in order:
        prefix = f"penalty.{name}."
        tier = main.get(table, name, dict, None, "penalty.")
        if tier is None:
            main.report(
                f"tier {name!r} is in penalty.order but has no [penalty.{name}] table",
                "penalty.order",
            )
            continue
        main.check_keys(tier, {"timeout", "cpu_factor", "memory_factor", "message"}, prefix)
        tiers.append(
            Tier(
                name=name,
                timeout=main.number(tier, "timeout", 1800, 1, 86400 * 365, prefix),
                cpu_factor=main.fraction(tier, "cpu_factor", 1.0, prefix),
                memory_factor=main.fraction(tier, "memory_factor", 1.0, prefix),
                message=main.get(tier, "message", str, "", prefix),
            )
        )
    if not order:
        main.report("must list at least one tier", "penalty.order")
    if not tiers or len(set(order)) != len(order):
        if len(set(order)) != len(order):
            main.report("a tier is listed more than once", "penalty.order")
        return None
    return PenaltyParams(tuple(tiers), occurrence_timeout, mode)


def _penalty_mode(file: _File, table: dict[str, Any], prefix: str = "") -> str | None:
    """A penalty mode, "enforce" or "watch"; None when the key is absent (or wrong)."""
    key = "mode" if prefix else "penalty_mode"
    mode: str | None = file.get(table, key, str, None, prefix)
    if mode is not None and mode not in PENALTY_MODES:
        file.report(
            f"must be one of {', '.join(map(repr, PENALTY_MODES))}, not {mode!r}", prefix + key
        )
        return None
    return mode


def _parse_history(main: _File, data: dict[str, Any]) -> HistoryParams:
    table = main.get(data, "history", dict, {})
    main.check_keys(table, {"retention"}, "history.")
    default = HistoryParams().retention
    return HistoryParams(main.number(table, "retention", default, 3600, 86400 * 366, "history."))


_ADDRESS_RE = re.compile(r"[^@\s<>(),;:\"\[\]\\]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
NOTIFY_KEYS = {
    "host",
    "port",
    "starttls",
    "user",
    "password_file",
    "from",
    "user_address",
    "admins",
    "timeout",
}


def is_address(text: str) -> bool:
    """A plain mail address, local@domain, with nothing a header could be steered by."""
    return bool(_ADDRESS_RE.fullmatch(text))


def _why_readable(path: str) -> str | None:
    """Why others than root could read a secret at ``path``; None when they cannot."""
    mode = os.lstat(path).st_mode & 0o777
    if mode & 0o077:
        return f"mode {mode:04o} lets others read it: make it 0600 or 0400"
    return None


def _server_section(
    main: _File, data: dict[str, Any], name: str, keys: set[str], example: str, port: int
) -> tuple[dict[str, Any], str, int] | None:
    """A section naming a server ([notify], [sync]): its table, host and port; None if absent."""
    if name not in data:
        return None
    table = main.get(data, name, dict, {})
    p = name + "."
    main.check_keys(table, keys, p)
    host = main.get(table, "host", str, "", p)
    if not host or any(c.isspace() for c in host):
        main.report(f"must name the {example}", p + "host")
    port = main.get(table, "port", int, port, p)
    if not 1 <= port <= 65535:
        main.report(f"must be from 1 to 65535, not {port!r}", p + "port")
    return table, host, port


def _secret_file(main: _File, table: dict[str, Any], p: str, trusted_uids: set[int]) -> str:
    """A section's password_file: absolute, root's alone to write and to read."""
    password_file: str = main.get(table, "password_file", str, "", p)
    if password_file:
        if not os.path.isabs(password_file):
            main.report(f"{password_file!r} must be an absolute path", p + "password_file")
        else:
            reason = why_unsafe(password_file, trusted_uids) or _why_readable(password_file)
            if reason is not None:
                main.report(f"{password_file}: {reason}", p + "password_file")
    return password_file


def _parse_notify(main: _File, data: dict[str, Any], trusted_uids: set[int]) -> Notify | None:
    section = _server_section(
        main, data, "notify", NOTIFY_KEYS, 'SMTP server, e.g. "localhost"', 25
    )
    if section is None:
        return None
    table, host, port = section
    p = "notify."
    user = main.get(table, "user", str, "", p)
    password_file = _secret_file(main, table, p, trusted_uids)
    if bool(user) != bool(password_file):
        main.report("user and password_file go together: give both or neither", p + "user")
    sender = main.get(table, "from", str, "", p)
    if not is_address(sender):
        main.report(
            f'must be a mail address like "cgpolicy@example.org", not {sender!r}', p + "from"
        )
    template = main.get(table, "user_address", str, "", p)
    try:
        example = template.format(user="bob")
    except (KeyError, IndexError, ValueError):
        example = ""
    if "{user}" not in template or not is_address(example):
        main.report(
            f'must make an address of {{user}}, e.g. "{{user}}@example.org", not {template!r}',
            p + "user_address",
        )
    admins = main.string_list(table, "admins", p)
    for admin in admins:
        if not is_address(admin):
            main.report(f"{admin!r} is not a mail address", p + "admins")
    timeout = main.number(table, "timeout", 30, 1, 600, p)
    return Notify(
        host,
        port,
        starttls=main.get(table, "starttls", bool, False, p),
        user=user,
        password_file=password_file,
        sender=sender,
        user_address=template,
        admins=admins,
        timeout=timeout,
    )


# libpq's TLS options, passed through as given (libpq checks their values).
SYNC_TLS_KEYS = ("sslmode", "sslrootcert", "sslcert", "sslkey", "sslcrl", "sslpassword")
SYNC_KEYS = {
    "host",
    "port",
    "database",
    "user",
    "password_file",
    "group",
    "node",
    "timeout",
    *SYNC_TLS_KEYS,
}


def _parse_sync(main: _File, data: dict[str, Any], trusted_uids: set[int]) -> Sync | None:
    example = 'PostgreSQL server, e.g. "db.example.org"'
    section = _server_section(main, data, "sync", SYNC_KEYS, example, 5432)
    if section is None:
        return None
    table, host, port = section
    p = "sync."
    names = {}
    for key in ("database", "user", "group"):
        names[key] = main.get(table, key, str, "", p)
        if not names[key] or any(c.isspace() for c in names[key]):
            main.report("must be given, without spaces", p + key)
    node = main.get(table, "node", str, "", p) or socket.gethostname()
    if not _NAME_RE.fullmatch(node):
        main.report(f"{node[:80]!r} is not a node's name: {NAME_RULE}", p + "node")
    password_file = _secret_file(main, table, p, trusted_uids)
    tls = tuple((key, main.get(table, key, str, "", p)) for key in SYNC_TLS_KEYS if key in table)
    return Sync(
        host,
        names["database"],
        names["user"],
        names["group"],
        node,
        port=port,
        password_file=password_file,
        timeout=main.number(table, "timeout", 3, 1, 60, p),
        tls=tls,
    )


def _parse_uids(gfile: _File, data: dict[str, Any]) -> tuple[tuple[int, int], ...]:
    ranges: list[tuple[int, int]] = []
    for item in gfile.get(data, "uids", list, []):
        match = _RANGE_RE.fullmatch(item) if isinstance(item, str) else None
        if isinstance(item, int) and not isinstance(item, bool) and 0 <= item <= ID_MAX:
            ranges.append((item, item))
        elif match and int(match.group(1)) <= int(match.group(2)) <= ID_MAX:
            ranges.append((int(match.group(1)), int(match.group(2))))
        else:
            gfile.report(
                f'{item!r} is neither a uid nor an inclusive range like "3000-3999" '
                f"(uids are 0 to {ID_MAX})",
                "uids",
            )
    return tuple(ranges)


def _parse_gids(gfile: _File, data: dict[str, Any]) -> tuple[int, ...]:
    gids = gfile.get(data, "gids", list, [])
    for gid in gids:
        if isinstance(gid, bool) or not isinstance(gid, int) or not 0 <= gid <= ID_MAX:
            gfile.report(f"{gid!r} is not a gid: use whole numbers from 0 to {ID_MAX}", "gids")
            return ()
    return tuple(gids)


def _parse_limits(gfile: _File, data: dict[str, Any]) -> dict[str, int | str]:
    table = gfile.get(data, "limits", dict, {})
    result: dict[str, int | str] = {}
    for key, value in table.items():
        try:
            limits_mod.convert(key, value)
        except LimitError as err:
            gfile.report(str(err), f"limits.{key}")
            continue
        result[key] = value
    high, hard = result.get("MemoryHigh"), result.get("MemoryMax")
    if high is not None and hard is not None and _absolute_bytes(high) > _absolute_bytes(hard):
        gfile.report(
            f"MemoryHigh {high!r} is above MemoryMax {hard!r}: it would never act",
            "limits.MemoryHigh",
        )
    return result


def _absolute_bytes(value: int | str) -> float:
    """Bytes of an absolute size; -inf for a percentage or infinity, which never compare."""
    (prop,) = limits_mod.convert("MemoryMax", value)
    if prop.name == "MemoryMax" and isinstance(prop.value, int) and prop.value < INFINITY:
        return prop.value
    return float("-inf")


GROUP_KEYS = {
    "description",
    "users",
    "uids",
    "groups",
    "gids",
    "exempt",
    "limits",
    "whitelist",
    "penalty_mode",
}


def _parse_group(path: Path, problems: list[Problem]) -> StatusGroup | None:
    gfile = _File(path, problems)
    if gfile.data is None:
        return None
    data = gfile.data
    gfile.check_keys(data, GROUP_KEYS)
    return StatusGroup(
        name=path.stem,
        description=gfile.get(data, "description", str, ""),
        users=gfile.string_list(data, "users"),
        uids=_parse_uids(gfile, data),
        groups=gfile.string_list(data, "groups"),
        gids=_parse_gids(gfile, data),
        exempt=gfile.get(data, "exempt", bool, False),
        limits=_parse_limits(gfile, data),
        whitelist=_parse_whitelist(gfile, data),
        penalty_mode=_penalty_mode(gfile, data),
    )


def load_policy(config_dir: Path, trusted_uids: set[int] | None = None) -> Policy:
    """Read and validate the whole policy; PolicyError lists every problem found.

    Total: whatever the files hold, the only exception it raises is PolicyError.
    """
    try:
        return _load_policy(config_dir, trusted_uids)
    except Exception as err:
        raise policy_error(err, str(config_dir / MAIN_FILE)) from None


def _load_policy(config_dir: Path, trusted_uids: set[int] | None) -> Policy:
    if trusted_uids is None:
        trusted_uids = {0, os.geteuid()}
    problems: list[Problem] = []
    main_path = config_dir / MAIN_FILE
    paths = [Path(p) for p in policy_files(str(config_dir))]
    for path in [config_dir, *paths]:
        if os.path.lexists(path):
            _check_ownership(path, trusted_uids, problems)
    main = _File(main_path, problems)
    data = main.data or {}
    main.check_keys(
        data,
        {
            "general",
            "status",
            "badness",
            "processes",
            "penalty",
            "history",
            "notify",
            "metrics",
            "sync",
        },
    )
    general = _parse_general(main, data)
    status = main.get(data, "status", dict, {})
    main.check_keys(status, {"order", "fallback"}, "status.")
    order = main.string_list(status, "order", "status.")
    fallback = main.get(status, "fallback", str, "", "status.")

    groups: dict[str, StatusGroup] = {}
    for path in paths[2:]:
        if not _NAME_RE.fullmatch(path.stem):
            problems.append(Problem(str(path), f"a group's name (the file's stem): {NAME_RULE}"))
            continue
        group = _parse_group(path, problems)
        if group is not None:
            groups[group.name] = group

    if main.data is not None:
        _check_order(main, order, fallback, groups, config_dir / GROUPS_DIR)
    badness = _parse_badness(main, data)
    processes = main.get(data, "processes", dict, {})
    main.check_keys(processes, {"whitelist", "match"}, "processes.")
    whitelist = _parse_whitelist(main, processes, "processes.")
    match = main.get(processes, "match", str, MATCH_EXECUTABLE, "processes.")
    if match not in MATCH_MODES:
        main.report(
            f"must be one of {', '.join(map(repr, MATCH_MODES))}, not {match!r}", "processes.match"
        )
    penalty = _parse_penalty(main, data)
    history = _parse_history(main, data)
    notify = _parse_notify(main, data, trusted_uids)
    metrics = _parse_metrics(main, data)
    sync = _parse_sync(main, data, trusted_uids)
    if problems:
        raise PolicyError(problems)
    return Policy(
        general,
        tuple(order),
        fallback,
        groups,
        badness,
        whitelist,
        penalty,
        match,
        history,
        notify,
        metrics,
        sync,
    )


def _check_order(
    main: _File,
    order: tuple[str, ...],
    fallback: str,
    groups: dict[str, StatusGroup],
    groups_dir: Path,
) -> None:
    if not order:
        main.report("must list at least one status group", "status.order")
    for name in sorted({n for n in order if order.count(n) > 1}):
        main.report(f"group {name!r} is listed more than once", "status.order")

    def check_name(name: str, key: str) -> None:
        # A file that exists but failed to parse was reported already.
        if not _NAME_RE.fullmatch(name):
            main.report(f"{name[:80]!r} is not a group's name: {NAME_RULE}", key)
        elif name not in groups and not (groups_dir / f"{name}.toml").exists():
            main.report(f"group {name!r} has no file {groups_dir / (name + '.toml')}", key)

    for name in order:
        check_name(name, "status.order")
    if not fallback:
        main.report("must name the group for users no other group matches", "status.fallback")
    else:
        check_name(fallback, "status.fallback")
    for name, group in sorted(groups.items()):
        path = str(groups_dir / f"{name}.toml")
        if name not in order and name != fallback:
            main.problems.append(
                Problem(
                    path,
                    f"group {name!r} is not in status.order in {main.path}, so it would "
                    "never match: add it there or remove the file",
                )
            )
        elif name != fallback and group.matches_nobody():
            main.problems.append(
                Problem(path, "matches nobody: give at least one of users, uids, groups or gids")
            )
