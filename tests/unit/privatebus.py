"""A private dbus-daemon for tests, and dbus-send or a connection as another uid against it."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dbus_fast.aio import MessageBus
from dbus_fast.auth import AuthExternal

# Session-like, but any uid may connect: the tests call in as other users.
CONFIG = """\
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
  </policy>
{includes}
</busconfig>
"""


@contextmanager
def private_bus(includes: Sequence[Path] = ()) -> Iterator[str]:
    """A running dbus-daemon's address; ``includes`` are bus policy files added to its own."""
    directory = Path(tempfile.mkdtemp(prefix="cgpolicy-bus-"))
    try:
        directory.chmod(0o755)  # other uids reach the socket through it
        config = directory / "bus.conf"
        config.write_text(
            CONFIG.format(
                socket=directory / "socket",
                includes="\n".join(f"  <include>{path}</include>" for path in includes),
            )
        )
        with (directory / "stderr").open("w") as stderr:
            process = subprocess.Popen(
                [
                    "dbus-daemon",
                    f"--config-file={config}",
                    "--nofork",
                    "--nopidfile",
                    "--nosyslog",
                    "--print-address=1",
                ],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        try:
            assert process.stdout is not None
            address = process.stdout.readline().strip()  # printed once it listens
            if not address:
                process.wait(5)
                raise RuntimeError(
                    f"dbus-daemon did not start: {(directory / 'stderr').read_text()}"
                )
            yield address
        finally:
            process.terminate()
            process.wait(5)
            assert process.stdout is not None
            process.stdout.close()
    finally:
        shutil.rmtree(directory)


@dataclass(frozen=True)
class Sent:
    """What dbus-send reported: the reply, or the error's name and text."""

    output: str
    error: str | None = None
    text: str = ""


async def dbus_send(
    address: str,
    uid: int,
    destination: str,
    path: str,
    member: str,
    *args: str,
    timeout: float = 5.0,
) -> Sent:
    """dbus-send --print-reply as ``uid`` (and gid ``uid``, no other groups).

    ``member`` is interface.member; ``args`` are dbus-send's (string:alice).
    Asynchronous, so a service on the caller's event loop can answer.
    """
    process = await asyncio.create_subprocess_exec(
        "dbus-send",
        f"--bus={address}",
        "--print-reply",
        f"--reply-timeout={int(timeout * 1000)}",
        f"--dest={destination}",
        path,
        member,
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        user=uid,
        group=uid,
        extra_groups=[],
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout + 1)
    if process.returncode == 0:
        return Sent(stdout.decode())
    # dbus-send's own format: "Error org.example.Name: text"
    first, _, text = stderr.decode().strip().partition(": ")
    return Sent(stdout.decode(), first.removeprefix("Error "), text)


async def connect_as(address: str, uid: int) -> MessageBus:
    """A connection in this process that the bus knows as ``uid`` (the caller is root).

    The bus takes a connection's uid from the socket's credentials, which are the
    effective uid's when it connects; the uid given to EXTERNAL must match them.
    """
    os.seteuid(uid)
    try:
        return await MessageBus(bus_address=address, auth=AuthExternal(uid)).connect()
    finally:
        os.seteuid(0)
