"""Limit values: from the policy's systemd syntax to D-Bus properties, and back.

A group's ``[limits]`` use systemd's own names and the value forms that
``systemctl set-property`` accepts. This module converts them exactly as
systemctl does, so that an admin who knows one knows the other, and formats
what systemd reports for display. Pure functions only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .errors import LimitError
from .slicelimits import (
    INFINITY,
    UINT32_MAX,
    UINT64_MAX,
    USEC_PER_SEC,
    format_quota,
    format_size,
)

# A limit that has no value in the policy is lifted with these: systemd's "infinity"
# (INFINITY) and "default", the same values `systemctl set-property KEY=` sends.

_SIZE_SUFFIXES = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}
# ASCII digits only, and few enough that no number is absurd before it is checked.
_SIZE_RE = re.compile(r"(\d{1,20})(?:\.(\d{1,20}))?\s*([A-Za-z]?)", re.ASCII)
_PERCENT_RE = re.compile(r"(\d{1,20}(?:\.\d{1,2})?)%", re.ASCII)
_CPU_LIST_RE = re.compile(r"\d{1,5}(-\d{1,5})?", re.ASCII)
_NUMBER_RE = re.compile(r"\d{1,20}", re.ASCII)
# systemctl's own bound for a percentage (an int of permyriad); CPUQuota above it is refused.
PERMYRIAD_MAX = 2**31 - 1


@dataclass(frozen=True)
class BusProperty:
    """One ``(sv)`` entry of a SetUnitProperties call."""

    name: str
    signature: str
    value: int | bool | bytes


def _permyriad(text: str) -> int | None:
    """'150%' -> 15000, like systemd's parse_permyriad; None if not a percentage."""
    match = _PERCENT_RE.fullmatch(text)
    if not match:
        return None
    whole, _, frac = match.group(1).partition(".")
    return int(whole) * 100 + int((frac + "00")[:2])


def parse_size(text: str) -> int:
    """'1800M' -> bytes, with systemd's 1024-based suffixes; exact, without floats."""
    match = _SIZE_RE.fullmatch(text.strip())
    if not match or match.group(3) not in _SIZE_SUFFIXES:
        raise LimitError(
            f"invalid size {text!r}: use bytes or a number with K, M, G or T "
            "(powers of 1024), a percentage of RAM, or 'infinity'"
        )
    whole, fraction = match.group(1), match.group(2) or ""
    unit = _SIZE_SUFFIXES[match.group(3)]
    return int(whole + fraction) * unit // int("1" + "0" * len(fraction))


def _number(value: object) -> object:
    """A string of ASCII digits as the number it spells; anything else as it is."""
    if isinstance(value, str) and _NUMBER_RE.fullmatch(value):
        return int(value)
    return value


def _is_infinity(value: object) -> bool:
    return value == "infinity"


def _cpu_quota(value: object) -> list[BusProperty]:
    if _is_infinity(value):
        return [BusProperty("CPUQuotaPerSecUSec", "t", INFINITY)]
    permyriad = _permyriad(value) if isinstance(value, str) else None
    if not permyriad or permyriad > PERMYRIAD_MAX:
        raise LimitError(
            f"invalid CPU quota {value!r}: use a percentage of one CPU from 0.01% to "
            f"{PERMYRIAD_MAX / 100:.2f}%, e.g. \"150%\" for one and a half cores, or 'infinity'"
        )
    return [BusProperty("CPUQuotaPerSecUSec", "t", permyriad * USEC_PER_SEC // 10000)]


def _weight(name: str, allow_idle: bool) -> Callable[[object], list[BusProperty]]:
    def convert(value: object) -> list[BusProperty]:
        if allow_idle and value == "idle":
            return [BusProperty(name, "t", 0)]
        value = _number(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10000:
            idle = ", or 'idle'" if allow_idle else ""
            raise LimitError(f"invalid weight {value!r}: use a whole number from 1 to 10000{idle}")
        return [BusProperty(name, "t", value)]

    return convert


def _memory(name: str, least: int) -> Callable[[object], list[BusProperty]]:
    """``least``: the smallest byte count systemd takes for this property (0 or 1)."""

    def convert(value: object) -> list[BusProperty]:
        if _is_infinity(value):
            return [BusProperty(name, "t", INFINITY)]
        if isinstance(value, bool):
            raise LimitError(f'invalid size {value!r}: use bytes or a string such as "2G"')
        if isinstance(value, str):
            permyriad = _permyriad(value)
            if permyriad is not None:
                if not 0 < permyriad <= 10000:
                    raise LimitError(
                        f"invalid size {value!r}: a percentage of RAM is more than 0% "
                        "and at most 100%"
                    )
                return [BusProperty(name + "Scale", "u", permyriad * UINT32_MAX // 10000)]
            value = parse_size(value)
        if not isinstance(value, int):
            raise LimitError(f'invalid size {value!r}: use bytes or a string such as "2G"')
        if not least <= value <= UINT64_MAX:
            raise LimitError(
                f"invalid size {value!r}: use from {least} bytes to 16E (2^64-1), or 'infinity'"
            )
        return [BusProperty(name, "t", value)]

    return convert


def _tasks_max(value: object) -> list[BusProperty]:
    if _is_infinity(value):
        return [BusProperty("TasksMax", "t", INFINITY)]
    if isinstance(value, str):
        permyriad = _permyriad(value)
        # systemd takes a scale below UINT32_MAX only: 100% is refused, as is 0%.
        if permyriad is not None and 0 < permyriad < 10000:
            return [BusProperty("TasksMaxScale", "u", permyriad * UINT32_MAX // 10000)]
        value = _number(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= UINT64_MAX:
        raise LimitError(
            f"invalid task limit {value!r}: use a positive number, a percentage "
            "of the system's limit below 100% such as \"10%\", or 'infinity'"
        )
    return [BusProperty("TasksMax", "t", value)]


def parse_cpu_list(text: str) -> set[int]:
    """'0-3,6' -> {0, 1, 2, 3, 6}, like systemd's parse_cpu_set (commas or spaces)."""
    cpus: set[int] = set()
    for item in re.split(r"[\s,]+", text.strip()):
        if not _CPU_LIST_RE.fullmatch(item):
            raise LimitError(f'invalid CPU list {text!r}: use numbers and ranges, e.g. "0-3,6"')
        first, _, last = item.partition("-")
        low, high = int(first), int(last or first)
        if low > high or high >= 8192:
            raise LimitError(f"invalid CPU range {item!r} in {text!r}")
        cpus.update(range(low, high + 1))
    return cpus


def cpu_mask(cpus: set[int]) -> bytes:
    """The byte array systemd takes for AllowedCPUs: bit i of byte n is CPU 8n+i."""
    mask = bytearray((max(cpus) // 8 + 1) if cpus else 0)
    for cpu in cpus:
        mask[cpu // 8] |= 1 << (cpu % 8)
    return bytes(mask)


def cpus_from_mask(mask: bytes) -> list[int]:
    return [n * 8 + bit for n, byte in enumerate(mask) for bit in range(8) if byte >> bit & 1]


def format_cpu_list(cpus: list[int]) -> str:
    ranges: list[str] = []
    for cpu in sorted(cpus):
        if ranges and cpu == int(ranges[-1].split("-")[-1]) + 1:
            ranges[-1] = f"{ranges[-1].split('-')[0]}-{cpu}"
        else:
            ranges.append(str(cpu))
    return ",".join(ranges)


def _allowed_cpus(value: object) -> list[BusProperty]:
    if not isinstance(value, str) or not value.strip():
        raise LimitError(f'invalid CPU list {value!r}: use a string such as "0-3,6"')
    return [BusProperty("AllowedCPUs", "ay", cpu_mask(parse_cpu_list(value)))]


def _format_number(value: int) -> str:
    return "infinity" if value >= INFINITY else str(value)


def _format_weight(value: int) -> str:
    return "default" if value >= INFINITY else str(value)


@dataclass(frozen=True)
class LimitSpec:
    """How one policy key maps to systemd: conversion, lifting, and display."""

    key: str
    convert: Callable[[object], list[BusProperty]]
    lift: BusProperty  # sets the property back to systemd's unlimited/default value
    show: str  # the property systemd reports the limit in force with
    format: Callable[[int], str]


def _spec(
    key: str,
    convert: Callable[[object], list[BusProperty]],
    show: str,
    fmt: Callable[[int], str],
    signature: str = "t",
    lifted: int | bytes = INFINITY,
) -> LimitSpec:
    return LimitSpec(key, convert, BusProperty(show, signature, lifted), show, fmt)


SPECS: dict[str, LimitSpec] = {
    spec.key: spec
    for spec in (
        _spec("CPUQuota", _cpu_quota, "CPUQuotaPerSecUSec", format_quota),
        _spec("CPUWeight", _weight("CPUWeight", allow_idle=True), "CPUWeight", _format_weight),
        _spec("IOWeight", _weight("IOWeight", allow_idle=False), "IOWeight", _format_weight),
        _spec("MemoryMax", _memory("MemoryMax", 1), "MemoryMax", format_size),
        _spec("MemoryHigh", _memory("MemoryHigh", 1), "MemoryHigh", format_size),
        _spec("MemorySwapMax", _memory("MemorySwapMax", 0), "MemorySwapMax", format_size),
        _spec("TasksMax", _tasks_max, "TasksMax", _format_number),
        _spec("AllowedCPUs", _allowed_cpus, "AllowedCPUs", str, "ay", b""),
    )
}

LIMIT_KEYS = tuple(SPECS)

# Accounting must be on for the usage that `cgpolicyctl status` reports.
ACCOUNTING = (
    BusProperty("CPUAccounting", "b", True),
    BusProperty("MemoryAccounting", "b", True),
    BusProperty("TasksAccounting", "b", True),
)


def convert(key: str, value: object) -> list[BusProperty]:
    """The D-Bus properties for one policy limit; LimitError if systemd would refuse it."""
    spec = SPECS.get(key)
    if spec is None:
        raise LimitError(f"unknown limit {key!r}; known limits: {', '.join(LIMIT_KEYS)}")
    return spec.convert(value)


def properties_for(limits: Mapping[str, object], managed: set[str]) -> list[BusProperty]:
    """Everything one SetUnitProperties call sends for a group.

    ``managed`` are the keys any group of the policy sets: those this group
    leaves out are lifted, so that a user who changes group keeps no stale limit.
    """
    props = list(ACCOUNTING)
    for key in LIMIT_KEYS:
        if key in limits:
            props.extend(convert(key, limits[key]))
        elif key in managed:
            props.append(SPECS[key].lift)
    return props


def format_in_force(key: str, value: object) -> str:
    """What systemd reports for a limit, in the policy's notation."""
    spec = SPECS[key]
    if isinstance(value, (bytes, list)):
        return format_cpu_list(cpus_from_mask(bytes(value))) or "all"
    if isinstance(value, int):
        return spec.format(value)
    return str(value)
