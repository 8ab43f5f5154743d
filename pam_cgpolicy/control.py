"""Freeze, thaw and status of one user's slice: the CLI's actions through systemd."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import TYPE_CHECKING, Any

from . import limits
from .cgroups import cgroup_mode
from .constants import SYSTEMD_SLICE, SYSTEMD_UNIT, slice_name
from .errors import FreezeError, SystemdError
from .freezer import V1Freezer
from .slicelimits import INFINITY

if TYPE_CHECKING:
    from .systemd import Systemd

# One v1 freezer action at a time in this process: a sweep must not refill a
# group that a thaw is emptying.
_V1_LOCK = threading.Lock()


def _v1(action: Any, *args: Any) -> Any:
    with _V1_LOCK:
        return action(*args)


async def freeze_user(systemd: Systemd, uid: int) -> str:
    """Freeze the whole slice; returns which mechanism did it."""
    try:
        await systemd.freeze_slice(uid)
        return "systemd"
    except SystemdError:
        if cgroup_mode() == "unified":
            raise
    # cgroup v1: systemd cannot freeze here, the kernel's v1 freezer can.
    if await systemd.unit_path(slice_name(uid)) is None:
        raise FreezeError(f"uid {uid} has no {slice_name(uid)}: not logged in")
    await asyncio.to_thread(_v1, V1Freezer().freeze, uid)
    return "v1 freezer"


async def thaw_user(systemd: Systemd, uid: int) -> str:
    freezer = V1Freezer()
    if os.path.isdir(freezer.group_dir(uid)):
        await asyncio.to_thread(_v1, freezer.thaw, uid)
        return "v1 freezer"
    await systemd.thaw_slice(uid)
    return "systemd"


def hold_frozen() -> dict[int, int]:
    """cgpolicyd's sweep on cgroup v1: what entered a frozen user's slice joins the
    frozen group. How many tasks it held, per uid."""
    freezer = V1Freezer()
    held = {uid: _v1(freezer.sweep, uid) for uid in freezer.frozen_uids()}
    return {uid: count for uid, count in held.items() if count}


USAGE_PROPERTIES = ("CPUUsageNSec", "MemoryCurrent", "TasksCurrent")


async def slice_status(systemd: Systemd, uid: int) -> dict[str, Any]:
    """Limits in force, usage and freezer state of one user slice, as systemd reports them."""
    return await slice_status_at(systemd, uid, await systemd.unit_path(slice_name(uid)))


async def slice_status_at(systemd: Systemd, uid: int, path: str | None) -> dict[str, Any]:
    """slice_status of the slice systemd has at object ``path`` (None: no slice loaded)."""
    if path is None:
        return {"uid": uid, "slice": slice_name(uid), "active": False}
    unit, props = await asyncio.gather(
        systemd.properties(path, SYSTEMD_UNIT), systemd.properties(path, SYSTEMD_SLICE)
    )
    in_force = {
        key: limits.format_in_force(key, props.get(spec.show))
        for key, spec in limits.SPECS.items()
        if spec.show in props
    }
    usage = {name: _number_or_none(props.get(name)) for name in USAGE_PROPERTIES}
    if cgroup_mode() == "unified":
        freezer = str(unit.get("FreezerState", "unknown"))
    else:
        freezer = V1Freezer().state(uid)
    return {
        "uid": uid,
        "slice": slice_name(uid),
        "active": unit.get("ActiveState") == "active",
        "limits": in_force,
        "usage": usage,
        "freezer": freezer,
    }


async def memory_room(systemd: Systemd, uid: int) -> int | None:
    """Bytes the user's slice can still take under its MemoryMax; None when it has no
    MemoryMax or is not loaded (a slice started anew gets its limits at the login)."""
    path = await systemd.unit_path(slice_name(uid))
    if path is None:
        return None
    props = await systemd.properties(path, SYSTEMD_SLICE)
    limit = _number_or_none(props.get("MemoryMax"))
    if limit is None:
        return None
    return limit - (_number_or_none(props.get("MemoryCurrent")) or 0)


def _number_or_none(value: Any) -> int | None:
    """systemd reports 'unknown' usage as UINT64_MAX."""
    return value if isinstance(value, int) and value < INFINITY else None
