"""Stand-ins on a private bus for the client tests: cgpolicyd's core, and a small systemd."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from pam_cgpolicy.dbusapi import BUS_NAME, ManagerService, serve
from pam_cgpolicy.errors import UnknownTier, UnknownUser

NOBODY = 65534
MiB = 1024**2

USERS: dict[str, dict[str, Any]] = {
    "nobody": {
        "user": "nobody",
        "uid": NOBODY,
        "group": "normal",
        "tier": "penalty1",
        "tier_expiry": 1_800_000_000.5,
        "occurrences": 2,
        "cpu_badness": 80.25,
        "memory_badness": 23.0,
        "limits": {"CPUQuota": "50%"},
        "frozen": False,
    },
    "daemon": {"user": "daemon", "uid": 1, "group": "normal"},  # no slice: no limits, no freezer
}


METRICS = (
    "# HELP cgpolicy_user_tier tier\n# TYPE cgpolicy_user_tier gauge\n"
    'cgpolicy_user_tier{group="students",tier="penalty1",uid="2002",user="bob"} 1.0\n'
)


class FakeCore:
    """cgpolicyd's core as dbusapi sees it: records each call; hangs when told."""

    def __init__(
        self,
        problems: tuple[str, ...] = (),
        hangs: bool = False,
        status: dict[str, Any] | None = None,
    ) -> None:
        self.problems = problems
        self.hangs = hangs
        self.status_info = status or {"policy": "files", "started": 1_800_000_000.0, "users": 2}
        self.calls: list[tuple[str, ...]] = []

    async def _do(self, *call: str) -> None:
        self.calls.append(call)
        if self.hangs:
            await asyncio.Event().wait()

    async def get_user(self, name: str) -> dict[str, Any]:
        await self._do("get_user", name)
        if name not in USERS:
            raise UnknownUser(f"no such user: {name!r}")
        return USERS[name]

    async def list_users(self) -> list[dict[str, Any]]:
        await self._do("list_users")
        return list(USERS.values())

    async def freeze(self, name: str, actor: str) -> None:
        await self._do("freeze", name)

    async def thaw(self, name: str, actor: str) -> None:
        await self._do("thaw", name)

    async def penalize(self, name: str, tier: str, actor: str) -> None:
        await self._do("penalize", name, tier)
        if tier != "penalty1":
            raise UnknownTier(f"no tier {tier!r}; the tiers are: penalty1")

    async def release(self, name: str, actor: str) -> None:
        await self._do("release", name)

    async def apply_user(self, name: str, actor: str) -> str:
        await self._do("apply", name)
        return f"user={name} tier=penalty1 limits=CPUQuota=160% action=applied"

    async def reload(self, actor: str) -> list[str]:
        await self._do("reload")
        return list(self.problems)

    async def status(self) -> dict[str, Any]:
        await self._do("status")
        return self.status_info

    async def metrics(self) -> str:
        await self._do("metrics")
        return METRICS

    async def send_mail(self, actor: str) -> None:
        await self._do("send_mail")

    async def is_admin(self, uid: int) -> bool:
        return True  # whoever runs the tests; access itself is test_dbusapi's


@asynccontextmanager
async def cgpolicyd(address: str, core: FakeCore) -> AsyncIterator[ManagerService]:
    """org.cgpolicy1 served from ``core`` on its own connection."""
    bus = await MessageBus(bus_address=address).connect()
    service: ManagerService | None = None
    try:
        service = await serve(bus, core, timeout=5.0)
        yield service
    finally:
        if service:
            service.stop()
        bus.disconnect()


@asynccontextmanager
async def denying_cgpolicyd(address: str, text: str) -> AsyncIterator[None]:
    """An org.cgpolicy1 that refuses every call with AccessDenied, as it does a non-admin."""
    bus = await MessageBus(bus_address=address).connect()

    def refuse(msg: Message) -> Message | bool:
        if msg.message_type != MessageType.METHOD_CALL or msg.destination != BUS_NAME:
            return False
        return Message.new_error(msg, "org.freedesktop.DBus.Error.AccessDenied", text)

    bus.add_message_handler(refuse)
    try:
        await bus.request_name(BUS_NAME)
        yield
    finally:
        bus.disconnect()


SYSTEMD = "org.freedesktop.systemd1"
UNIT_PATH = "/org/freedesktop/systemd1/unit/user_2d65534_2eslice"

# What systemd reports for nobody's slice: CPUQuota 50%, MemoryMax 512M.
UNIT = {"ActiveState": Variant("s", "active"), "FreezerState": Variant("s", "running")}
SLICE = {
    "CPUQuotaPerSecUSec": Variant("t", 500_000),
    "MemoryMax": Variant("t", 512 * MiB),
    "CPUUsageNSec": Variant("t", 2_500_000_000),
    "MemoryCurrent": Variant("t", 10 * MiB),
    "TasksCurrent": Variant("t", 3),
    "ControlGroup": Variant("s", "/user.slice/user-65534.slice"),
}


@asynccontextmanager
async def fake_systemd(address: str) -> AsyncIterator[list[tuple[str, ...]]]:
    """A systemd with one user slice, nobody's; yields the calls it got."""
    bus = await MessageBus(bus_address=address).connect()
    calls: list[tuple[str, ...]] = []

    def answer(msg: Message) -> Message | bool:
        if msg.message_type != MessageType.METHOD_CALL or msg.destination != SYSTEMD:
            return False
        if msg.member == "SetUnitProperties":  # unit, then name=value of each property
            unit, _runtime, props = msg.body
            calls.append((msg.member, unit, *(f"{name}={value.value}" for name, value in props)))
            return Message.new_method_return(msg)
        calls.append((msg.member or "", *map(str, msg.body)))
        if msg.member == "ListUnitsByPatterns":
            unit = ("user-65534.slice", "", "loaded", "active", "active", "", UNIT_PATH, 0, "", "/")
            return Message.new_method_return(msg, "a(ssssssouso)", [[unit]])
        if msg.member == "GetUnit":
            if msg.body == ["user-65534.slice"]:
                return Message.new_method_return(msg, "o", [UNIT_PATH])
            return Message.new_error(
                msg, f"{SYSTEMD}.NoSuchUnit", f"Unit {msg.body[0]} not loaded."
            )
        if msg.member == "GetAll":
            values = UNIT if msg.body == [f"{SYSTEMD}.Unit"] else SLICE
            return Message.new_method_return(msg, "a{sv}", [values])
        if msg.member in ("FreezeUnit", "ThawUnit"):
            return Message.new_method_return(msg)
        return Message.new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod", "not faked")

    bus.add_message_handler(answer)
    try:
        await bus.request_name(SYSTEMD)
        yield calls
    finally:
        bus.disconnect()
