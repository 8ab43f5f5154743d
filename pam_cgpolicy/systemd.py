"""The systemd adapter: what cgpolicy reads from systemd, and freeze and thaw.

systemd owns the user slices' cgroups, so limits and freezing go through it.
The one write, SetUnitProperties, is in setprops.py (the login hook's path).
Every call has a timeout; an error reply becomes SystemdError with systemd's
error name (bus.py does both, for client.py too).
"""

from __future__ import annotations

from typing import Any

from dbus_fast import Message, Variant
from dbus_fast.aio import MessageBus

from . import bus
from .constants import (
    PROPERTIES,
    SYSTEMD_BUS_NAME,
    SYSTEMD_MANAGER,
    SYSTEMD_PATH,
    SYSTEMD_SERVICE,
    slice_name,
)
from .errors import SystemdError

NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"
NOT_SUPPORTED = "org.freedesktop.DBus.Error.NotSupported"
TIMEOUT = bus.TIMEOUT


def _unwrap(value: Any) -> Any:
    return value.value if isinstance(value, Variant) else value


class Systemd:
    """A connection to the system bus, speaking to systemd's manager."""

    def __init__(self, bus: MessageBus, timeout: float) -> None:
        self._bus = bus
        self.timeout = timeout

    @classmethod
    async def connect(cls, timeout: float, address: str | None = None) -> Systemd:
        return cls(await bus.connect(timeout, SystemdError, address), timeout)

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
        return await bus.call(self._bus, message, self.timeout, SystemdError, "systemd")

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

    async def service_property(self, unit: str, name: str) -> Any:
        """A property of a service unit, loaded for the asking if it is not."""
        (path,) = await self.call("LoadUnit", "s", [unit])
        (value,) = await self.call(
            "Get", "ss", [SYSTEMD_SERVICE, name], path=path, interface=PROPERTIES
        )
        return _unwrap(value)

    async def manager_property(self, name: str) -> Any:
        (value,) = await self.call("Get", "ss", [SYSTEMD_MANAGER, name], interface=PROPERTIES)
        return _unwrap(value)

    async def user_slices(self) -> list[int]:
        """The uids of every user slice systemd has loaded."""
        return sorted(await self.user_slice_paths())

    async def user_slice_paths(self) -> dict[int, str]:
        """uid -> object path of every user slice systemd has loaded, in one call."""
        (units,) = await self.call("ListUnitsByPatterns", "asas", [[], ["user-*.slice"]])
        paths = {}
        for unit in units:
            number = unit[0].removeprefix("user-").removesuffix(".slice")
            if number.isdigit():
                paths[int(number)] = str(unit[6])
        return paths
