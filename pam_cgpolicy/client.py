"""A client of cgpolicyd's D-Bus API (org.cgpolicy1.Manager.xml), for cgpolicyctl.

Plain messages with a timeout, like systemd.py, through the same bus.py helper.
An error reply becomes DaemonError with its D-Bus name; its message says plainly
when cgpolicyd refused the caller or is not running.
"""

from __future__ import annotations

from typing import Any

from dbus_fast import Message, Variant
from dbus_fast.aio import MessageBus

from . import bus, userrows
from .constants import CGPOLICY_BUS_NAME, CGPOLICY_INTERFACE, CGPOLICY_PATH
from .errors import DaemonError

# Longer than cgpolicyd's own 20 s limit per call (dbusapi.DEFAULT_TIMEOUT), so a
# stuck daemon answers with its Timeout error, which says what it was doing.
DEFAULT_TIMEOUT = 25.0

DBUS = "org.freedesktop.DBus"


def _unwrap(value: Any) -> Any:
    return value.value if isinstance(value, Variant) else value


def _plain(info: dict[str, Variant]) -> dict[str, Any]:
    return {key: _unwrap(value) for key, value in info.items()}


async def daemon_running(connection: MessageBus, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Whether org.cgpolicy1 has an owner now. Asking does not start cgpolicyd."""
    (has_owner,) = await bus.call(
        connection,
        Message(
            destination=DBUS,
            path="/org/freedesktop/DBus",
            interface=DBUS,
            member="NameHasOwner",
            signature="s",
            body=[CGPOLICY_BUS_NAME],
        ),
        timeout,
        DaemonError,
        "the bus",
    )
    return bool(has_owner)


class Daemon:
    """org.cgpolicy1.Manager over one bus connection, which the caller owns."""

    def __init__(self, connection: MessageBus, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._bus = connection
        self.timeout = timeout

    async def call(
        self, member: str, signature: str = "", body: list[Any] | None = None
    ) -> list[Any]:
        message = Message(
            destination=CGPOLICY_BUS_NAME,
            path=CGPOLICY_PATH,
            interface=CGPOLICY_INTERFACE,
            member=member,
            signature=signature,
            body=body or [],
        )
        return await bus.call(self._bus, message, self.timeout, DaemonError, "cgpolicyd")

    async def get_user(self, name: str) -> dict[str, Any]:
        """GetUser's dictionary, plain values; keys without a value are absent."""
        (info,) = await self.call("GetUser", "s", [name])
        return _plain(info)

    async def list_users(self) -> list[dict[str, Any]]:
        """GetUser's dictionary for every user, from ListUsers' typed rows."""
        (users,) = await self.call("ListUsers")
        return [userrows.info(row) for row in users]

    async def freeze(self, name: str) -> None:
        await self.call("FreezeUser", "s", [name])

    async def thaw(self, name: str) -> None:
        await self.call("ThawUser", "s", [name])

    async def penalize(self, name: str, tier: str) -> None:
        await self.call("Penalize", "ss", [name, tier])

    async def release(self, name: str) -> None:
        await self.call("Release", "s", [name])

    async def apply(self, name: str) -> str:
        """The log line of the limits cgpolicyd set."""
        (line,) = await self.call("Apply", "s", [name])
        return str(line)

    async def reload(self) -> list[str]:
        """The policy's problems; empty when the new policy is in force."""
        (problems,) = await self.call("Reload")
        return [str(problem) for problem in problems]

    async def status(self) -> dict[str, Any]:
        """cgpolicyd's own state: the policy in force, its problems, sends pending."""
        (info,) = await self.call("Status")
        return _plain(info)

    async def metrics(self) -> str:
        """The series of cgpolicyd's last cycle, in the Prometheus text format."""
        (text,) = await self.call("Metrics")
        return str(text)

    async def send_mail(self) -> None:
        """Have cgpolicyd send the queued mail that is due now."""
        await self.call("SendMail")
