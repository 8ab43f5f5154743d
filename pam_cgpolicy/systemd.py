"""The systemd adapter: what cgpolicy reads from systemd, and freeze and thaw.

systemd owns the user slices' cgroups, so limits and freezing go through it.
The one write, SetUnitProperties, is in setprops.py (the login hook's path).
Every call has a timeout; an error reply becomes SystemdError with systemd's
error name. Calls are plain messages, without an introspection round trip.
"""

from __future__ import annotations

import asyncio
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from .constants import (
    PROPERTIES,
    SYSTEMD_BUS_NAME,
    SYSTEMD_MANAGER,
    SYSTEMD_PATH,
    slice_name,
)
from .errors import SystemdError

NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"
NOT_SUPPORTED = "org.freedesktop.DBus.Error.NotSupported"
TIMEOUT = "org.cgpolicy1.Error.Timeout"


def _unwrap(value: Any) -> Any:
    return value.value if isinstance(value, Variant) else value


class Systemd:
    """A connection to the system bus, speaking to systemd's manager."""

    def __init__(self, bus: MessageBus, timeout: float) -> None:
        self._bus = bus
        self.timeout = timeout

    @classmethod
    async def connect(cls, timeout: float, address: str | None = None) -> Systemd:
        bus = MessageBus(bus_address=address, bus_type=BusType.SYSTEM, auth_timeout=timeout)
        try:
            await asyncio.wait_for(bus.connect(), timeout)
        except TimeoutError:
            bus.disconnect()
            raise SystemdError(TIMEOUT, f"no answer from the system bus in {timeout:g}s") from None
        except OSError as err:
            raise SystemdError(
                "org.freedesktop.DBus.Error.NoServer", f"cannot reach the system bus: {err}"
            ) from None
        return cls(bus, timeout)

    def close(self) -> None:
        self._bus.disconnect()

    async def call(
        self,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
        *,
        path: str = SYSTEMD_PATH,
        interface: str = SYSTEMD_MANAGER,
    ) -> list[Any]:
        message = Message(
            destination=SYSTEMD_BUS_NAME,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=body or [],
        )
        try:
            reply = await asyncio.wait_for(self._bus.call(message), self.timeout)
        except TimeoutError:
            raise SystemdError(
                TIMEOUT, f"systemd did not answer {member} in {self.timeout:g}s"
            ) from None
        if reply is None:
            raise SystemdError("org.freedesktop.DBus.Error.NoReply", f"no reply to {member}")
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body else ""
            raise SystemdError(reply.error_name or "unknown", str(text))
        return list(reply.body)

    async def freeze_slice(self, uid: int) -> None:
        await self.call("FreezeUnit", "s", [slice_name(uid)])

    async def thaw_slice(self, uid: int) -> None:
        await self.call("ThawUnit", "s", [slice_name(uid)])

    async def unit_path(self, unit: str) -> str | None:
        """The unit's object path, or None when systemd has no such unit loaded."""
        try:
            (path,) = await self.call("GetUnit", "s", [unit])
        except SystemdError as err:
            if err.name == NO_SUCH_UNIT:
                return None
            raise
        return str(path)

    async def properties(self, path: str, interface: str) -> dict[str, Any]:
        (values,) = await self.call("GetAll", "s", [interface], path=path, interface=PROPERTIES)
        return {name: _unwrap(value) for name, value in values.items()}

    async def manager_property(self, name: str) -> Any:
        (value,) = await self.call("Get", "ss", [SYSTEMD_MANAGER, name], interface=PROPERTIES)
        return _unwrap(value)

    async def user_slices(self) -> list[int]:
        """The uids of every user slice systemd has loaded."""
        (units,) = await self.call("ListUnitsByPatterns", "asas", [[], ["user-*.slice"]])
        uids = []
        for unit in units:
            number = unit[0].removeprefix("user-").removesuffix(".slice")
            if number.isdigit():
                uids.append(int(number))
        return sorted(uids)
