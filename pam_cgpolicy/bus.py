"""The system bus as cgpolicy's clients use it: connect, and call one method, each with a timeout.

systemd.py (systemd's manager) and client.py (cgpolicyd) both go through here, so
every call has a timeout and an error reply always becomes the caller's own
exception type, built from the D-Bus error's name and text. Calls are plain
messages, without an introspection round trip.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from .errors import CgpolicyError

# Called with the D-Bus error's name and its text: SystemdError, client.DaemonError.
ErrorType = Callable[[str, str], CgpolicyError]

TIMEOUT = "org.cgpolicy1.Error.Timeout"
NO_SERVER = "org.freedesktop.DBus.Error.NoServer"
NO_REPLY = "org.freedesktop.DBus.Error.NoReply"


async def connect(timeout: float, error: ErrorType, address: str | None = None) -> MessageBus:
    """The system bus (or ``address``), connected and authenticated within ``timeout``.

    The timeout is ours, not dbus-fast's: its auth_timeout argument came after
    the dbus-fast Debian 12 ships (1.84); wait_for bounds the whole connect.
    """
    try:
        # Older dbus-fast (Debian 12's) opens the socket already here, so a dead
        # bus raises here too.
        bus = MessageBus(bus_address=address, bus_type=BusType.SYSTEM)
        await asyncio.wait_for(bus.connect(), timeout)
    except TimeoutError:
        bus.disconnect()
        raise error(TIMEOUT, f"no answer from the system bus in {timeout:g}s") from None
    except OSError as err:
        raise error(NO_SERVER, f"cannot reach the system bus: {err}") from None
    return bus


async def call(
    bus: MessageBus, message: Message, timeout: float, error: ErrorType, peer: str
) -> list[Any]:
    """Send ``message`` and return its reply's body; ``peer`` names the callee in messages."""
    try:
        reply = await asyncio.wait_for(bus.call(message), timeout)
    except TimeoutError:
        raise error(TIMEOUT, f"{peer} did not answer {message.member} in {timeout:g}s") from None
    if reply is None:
        raise error(NO_REPLY, f"no reply to {message.member}")
    if reply.message_type == MessageType.ERROR:
        text = reply.body[0] if reply.body else ""
        raise error(reply.error_name or "unknown", str(text))
    return list(reply.body)
