"""The actions on one user, shared by the PAM hook and the CLI.

Apply the user's group limits, freeze, thaw, and report status. Each takes a
connected Systemd client and plain data, so both callers do exactly the same.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import limits
from .accounts import Account
from .cgroups import V1Freezer, cgroup_mode
from .classify import Classification, classify
from .constants import SYSTEMD_SLICE, SYSTEMD_UNIT, slice_name
from .errors import FreezeError, SystemdError
from .model import Policy

if TYPE_CHECKING:
    from .systemd import Systemd


def skip_reason(policy: Policy, account: Account) -> str | None:
    """Why a user is never touched, or None if the policy applies to them."""
    if account.uid == 0:
        return "root is never limited"
    if account.uid < policy.general.min_uid:
        return f"uid below min_uid {policy.general.min_uid}"
    return None


def describe_limits(group_limits: dict[str, int | str]) -> str:
    return " ".join(f"{key}={value}" for key, value in group_limits.items()) or "none"


@dataclass
class Decision:
    """What was decided for one user, for the log line and the CLI."""

    account: Account
    action: str  # "applied", "exempt" or "skipped"
    reason: str = ""
    classification: Classification | None = None
    properties: list[limits.BusProperty] = field(default_factory=list)

    def log_line(self) -> str:
        parts = [f"user={self.account.name}", f"uid={self.account.uid}"]
        if self.classification:
            group = self.classification.group
            parts += [
                f"group={group.name}",
                f'rule="{self.classification.rule}"',
                f'limits="{describe_limits(group.limits)}"',
            ]
        parts.append(f"action={self.action}")
        if self.reason:
            parts.append(f'reason="{self.reason}"')
        return " ".join(parts)


def decide(policy: Policy, account: Account) -> Decision:
    """Everything up to, not including, the call to systemd: pure."""
    reason = skip_reason(policy, account)
    if reason:
        return Decision(account, "skipped", reason)
    found = classify(policy, account)
    if found.group.exempt:
        return Decision(account, "exempt", "group is exempt", found)
    props = limits.properties_for(found.group.limits, policy.managed_keys())
    return Decision(account, "applied", "", found, props)


async def apply_limits(systemd: Systemd, policy: Policy, account: Account) -> Decision:
    decision = decide(policy, account)
    if decision.action == "applied":
        await systemd.set_slice_properties(account.uid, decision.properties)
    return decision


async def freeze_user(systemd: Systemd, uid: int) -> str:
    """Freeze the whole slice; returns which mechanism did it."""
    try:
        await systemd.freeze_slice(uid)
        return "systemd"
    except SystemdError:
        if cgroup_mode() == "unified":
            raise
    # cgroup v1: systemd cannot freeze here, the kernel's v1 freezer can.
    control_group = await _control_group(systemd, uid)
    await asyncio.to_thread(V1Freezer().freeze, uid, control_group)
    return "v1 freezer"


async def thaw_user(systemd: Systemd, uid: int) -> str:
    freezer = V1Freezer()
    if freezer.group_dir(uid).is_dir():
        await asyncio.to_thread(freezer.thaw, uid)
        return "v1 freezer"
    await systemd.thaw_slice(uid)
    return "systemd"


async def _control_group(systemd: Systemd, uid: int) -> str:
    path = await systemd.unit_path(slice_name(uid))
    if path is None:
        raise FreezeError(f"uid {uid} has no {slice_name(uid)}: not logged in")
    return str((await systemd.properties(path, SYSTEMD_SLICE))["ControlGroup"])


USAGE_PROPERTIES = ("CPUUsageNSec", "MemoryCurrent", "TasksCurrent")


async def slice_status(systemd: Systemd, uid: int) -> dict[str, Any]:
    """Limits in force, usage and freezer state of one user slice, as systemd reports them."""
    path = await systemd.unit_path(slice_name(uid))
    if path is None:
        return {"uid": uid, "slice": slice_name(uid), "active": False}
    unit = await systemd.properties(path, SYSTEMD_UNIT)
    props = await systemd.properties(path, SYSTEMD_SLICE)
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


def _number_or_none(value: Any) -> int | None:
    """systemd reports 'unknown' usage as UINT64_MAX."""
    return value if isinstance(value, int) and value < limits.INFINITY else None
