"""ListUsers' rows: GetUser's dictionary as a D-Bus struct, one typed field per key.

A list of a{sv} carries each key's name and a variant per value: with thousands
of users that reply is built, sent and read value by value and costs more than
cgpolicyd's own work. A struct of fixed fields is half the size and marshalled
in one piece. The fields, in order, are GetUser's keys (org.cgpolicy1.Manager.xml).

A key without a value travels as its field's empty value: "" for a string, -1
for a number (uids, times, counts, badness and bytes are never negative), an
empty a{ss} for limits. frozen is read with the limits: without them it has none.
cgpolicyd encodes with ``row`` and cgpolicyctl decodes with ``info``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

FIELDS: tuple[tuple[str, str], ...] = (
    ("user", "s"),
    ("uid", "x"),
    ("group", "s"),
    ("tier", "s"),
    ("tier_expiry", "d"),
    ("occurrences", "x"),
    ("cpu_badness", "d"),
    ("memory_badness", "d"),
    ("memory_max_in_force", "x"),
    ("memory_max_target", "x"),
    ("limits", "a{ss}"),
    ("frozen", "b"),
)
SIGNATURE = "(" + "".join(kind for _, kind in FIELDS) + ")"
KEYS = frozenset(key for key, _ in FIELDS)

_EMPTY: dict[str, Any] = {"s": "", "x": -1, "d": -1.0, "a{ss}": {}, "b": False}
_FLOATS = {key for key, kind in FIELDS if kind == "d"}


def row(info: Mapping[str, Any]) -> list[Any]:
    """GetUser's dictionary as one ListUsers row.

    A key the row has no field for is the core's bug (TypeError, which callers
    see as Failed), never silently dropped.
    """
    unknown = info.keys() - KEYS
    if unknown:
        raise TypeError(f"no ListUsers field for {', '.join(sorted(unknown))}")
    fields = []
    for key, kind in FIELDS:
        value = info.get(key)
        if value is None:
            value = _EMPTY[kind]
        elif key in _FLOATS:
            value = float(value)
        fields.append(value)
    return fields


def info(fields: Sequence[Any]) -> dict[str, Any]:
    """One ListUsers row as GetUser's dictionary: keys without a value left out."""
    found = {
        key: value
        for (key, kind), value in zip(FIELDS, fields, strict=True)
        if value != _EMPTY[kind]
    }
    if "limits" not in found:
        found.pop("frozen", None)
    elif "frozen" not in found:
        found["frozen"] = False
    return found
