"""The one write cgpolicy makes to systemd: SetUnitProperties on user-UID.slice.

It is sent with systemd's own D-Bus client, busctl, rather than from Python:
the login hook must stay cheap, and importing a Python D-Bus stack (with
asyncio) costs several times a bare interpreter's start, while busctl ships
with systemd and answers in a few milliseconds. Everything else cgpolicy asks
systemd (reads, freeze, thaw) goes through the dbus-fast client in systemd.py.

Imported by the hook: builtin modules only.
"""

from __future__ import annotations

import _signal  # not signal.py, which imports enum: see hook.py
import os

from .constants import SYSTEMD_BUS_NAME, SYSTEMD_MANAGER, SYSTEMD_PATH, slice_name
from .errors import SystemdError
from .slicelimits import NO_PENALTY, SliceLimits, Standing, slice_limits

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

    from .accounts import Account

# The error of a node without busctl: cgpolicyd says it once, not once a user.
NO_BUSCTL = "org.cgpolicy1.Error.NoBusctl"
BUSCTL_PATHS = ("/usr/bin/busctl", "/bin/busctl")
# busctl's whole environment, whoever calls: the hook's own is partly the
# user's, and a DBUS_SYSTEM_BUS_ADDRESS (or SYSTEMD_*) there would steer it.
BUSCTL_ENV = {"LC_ALL": "C"}


def _busctl() -> str:
    for path in BUSCTL_PATHS:
        if os.access(path, os.X_OK):
            return path
    raise SystemdError(NO_BUSCTL, "busctl not found: is systemd installed?")


def _value_words(signature: str, value: Any) -> list[str]:
    if signature == "b":
        return ["true" if value else "false"]
    if signature in ("t", "u"):
        return [str(int(value))]
    if signature == "ay":
        return [str(len(value)), *(str(byte) for byte in value)]
    raise ValueError(f"no busctl form for D-Bus signature {signature!r}")


def busctl_argv(
    uid: int, props: Iterable[tuple[str, str, Any]], timeout: float, bus: str | None = None
) -> list[str]:
    """The busctl command line for one SetUnitProperties call, at runtime only.

    ``bus``: the address of the system bus when not the standard one; only
    ever a caller's own setting (an argument or the CLI's environment).
    """
    props = list(props)
    argv = [
        _busctl(),
        f"--address={bus}" if bus else "--system",
        "--quiet",
        f"--timeout={max(timeout, 0.1):.3f}s",
        "call",
        SYSTEMD_BUS_NAME,
        SYSTEMD_PATH,
        SYSTEMD_MANAGER,
        "SetUnitProperties",
        "sba(sv)",
        slice_name(uid),
        "true",
        str(len(props)),
    ]
    for name, signature, value in props:
        argv += [name, signature, *_value_words(signature, value)]
    return argv


class _Child:
    """The busctl process in flight, so a deadline can end it."""

    pid = 0


def kill_pending() -> None:
    if _Child.pid:
        try:
            os.kill(_Child.pid, _signal.SIGKILL)
        except ProcessLookupError:
            return  # it finished meanwhile


def set_slice_properties(
    uid: int, props: Iterable[tuple[str, str, Any]], timeout: float, bus: str | None = None
) -> None:
    """Set runtime properties on user-UID.slice; SystemdError with systemd's words on failure."""
    argv = busctl_argv(uid, props, timeout, bus)
    try:
        read_end, write_end = os.pipe()
    except OSError as err:
        raise SystemdError("org.cgpolicy1.Error.NoResources", f"cannot run busctl: {err}") from err
    try:
        with open(os.devnull, "rb") as null:
            pid = os.posix_spawn(
                argv[0],
                argv,
                BUSCTL_ENV,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, null.fileno(), 0),
                    (os.POSIX_SPAWN_DUP2, write_end, 1),
                    (os.POSIX_SPAWN_DUP2, write_end, 2),
                    (os.POSIX_SPAWN_CLOSE, read_end),
                ],
            )
    except OSError as err:  # EAGAIN, ENOMEM...: said like systemd's refusals, nothing left open
        os.close(read_end)
        raise SystemdError("org.cgpolicy1.Error.NoResources", f"cannot run busctl: {err}") from err
    finally:
        os.close(write_end)
    _Child.pid = pid  # for the hook's deadline; the daemon may run several at once
    with os.fdopen(read_end, "rb") as output:
        said = output.read().decode(errors="replace").strip()
    _, status = os.waitpid(pid, 0)
    _Child.pid = 0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemdError(
            "org.cgpolicy1.Error.SetUnitProperties", said or f"busctl exited with {code}"
        )


def apply_limits(
    policy: dict[str, Any],
    account: Account,
    timeout: float,
    standing: Standing | None = None,
    bus: str | None = None,
) -> SliceLimits:
    """What happens at login: decide for the user (slice_limits), then set that.

    ``standing`` is the penalty cgpolicyd has the user in (from its copy for the
    hook): its tier's limits take the group's place, so logging in again does
    not end a penalty. When systemd refuses, the result says "failed" with
    systemd's error, so its log line still tells which limits were meant.
    """
    limits = slice_limits(policy, account, standing or NO_PENALTY)
    if limits.properties:
        try:
            set_slice_properties(account.uid, limits.properties, timeout, bus)
        except SystemdError as err:
            limits.fail(err)
    return limits
