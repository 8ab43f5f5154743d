"""client.py and bus.py against a private dbus-daemon serving a fake cgpolicyd."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from dbus_fast.aio import MessageBus
from fakeservices import USERS, FakeCore, cgpolicyd, denying_cgpolicyd
from privatebus import private_bus

from pam_cgpolicy import bus
from pam_cgpolicy.client import Daemon, daemon_running
from pam_cgpolicy.errors import DaemonError, SystemdError

T = TypeVar("T")


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    with private_bus() as bus_address:
        yield bus_address


def run(scenario: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(scenario, 20))


@asynccontextmanager
async def connected(address: str) -> AsyncIterator[MessageBus]:
    connection = await bus.connect(5.0, DaemonError, address)
    try:
        yield connection
    finally:
        connection.disconnect()


def test_every_method_reaches_the_core_and_answers_plain_values(address: str) -> None:
    core = FakeCore(problems=("a.toml:3: min_uid: must be a number",))

    async def scenario() -> tuple[Any, ...]:
        async with cgpolicyd(address, core), connected(address) as connection:
            daemon = Daemon(connection, timeout=5.0)
            info = await daemon.get_user("nobody")
            users = await daemon.list_users()
            await daemon.freeze("nobody")
            await daemon.thaw("nobody")
            await daemon.penalize("nobody", "penalty1")
            await daemon.release("nobody")
            problems = await daemon.reload()
            await daemon.send_mail()
            return info, users, problems

    info, users, problems = run(scenario())
    assert info == USERS["nobody"]  # Variants unwrapped, a{ss} a plain dict
    assert users == list(USERS.values())
    assert problems == ["a.toml:3: min_uid: must be a number"]
    assert core.calls == [
        ("get_user", "nobody"),
        ("list_users",),
        ("freeze", "nobody"),
        ("thaw", "nobody"),
        ("penalize", "nobody", "penalty1"),
        ("release", "nobody"),
        ("reload",),
        ("send_mail",),
    ]


def test_daemon_running_asks_the_bus_without_starting_anything(address: str) -> None:
    async def scenario() -> tuple[bool, bool]:
        async with connected(address) as connection:
            before = await daemon_running(connection)
            async with cgpolicyd(address, FakeCore()):
                return before, await daemon_running(connection)

    assert run(scenario()) == (False, True)


@pytest.mark.parametrize(
    ("member", "args", "name", "message"),
    [
        ("get_user", ("zed",), "NoSuchUser", "no such user: 'zed'"),
        ("penalize", ("nobody", "penalty9"), "NoSuchTier", "no tier 'penalty9'"),
    ],
)
def test_error_replies_become_daemon_errors_with_their_name(
    address: str, member: str, args: tuple[str, ...], name: str, message: str
) -> None:
    async def scenario() -> None:
        async with cgpolicyd(address, FakeCore()), connected(address) as connection:
            await getattr(Daemon(connection), member)(*args)

    with pytest.raises(DaemonError, match=message) as caught:
        run(scenario())
    assert caught.value.name == f"org.cgpolicy1.Error.{name}"
    assert str(caught.value).endswith(f"(org.cgpolicy1.Error.{name})")


def test_access_denied_says_so(address: str) -> None:
    refusal = "Penalize is for root and the policy's admin group; uid 65534 (nobody) is in neither"

    async def scenario() -> None:
        async with denying_cgpolicyd(address, refusal), connected(address) as connection:
            await Daemon(connection).penalize("nobody", "penalty1")

    with pytest.raises(DaemonError) as caught:
        run(scenario())
    assert str(caught.value) == (
        f"access denied: {refusal} (org.freedesktop.DBus.Error.AccessDenied)"
    )


def test_a_call_without_a_daemon_says_it_is_not_running(address: str) -> None:
    async def scenario() -> None:
        async with connected(address) as connection:
            await Daemon(connection).release("nobody")

    with pytest.raises(DaemonError, match=r"^cgpolicyd is not running: ") as caught:
        run(scenario())
    assert caught.value.name == "org.freedesktop.DBus.Error.ServiceUnknown"


def test_a_stuck_daemon_times_out_at_the_clients_timeout(address: str) -> None:
    async def scenario() -> float:
        async with cgpolicyd(address, FakeCore(hangs=True)), connected(address) as connection:
            started = time.monotonic()
            with pytest.raises(DaemonError) as caught:
                await Daemon(connection, timeout=0.3).release("nobody")
            assert caught.value.name == "org.cgpolicy1.Error.Timeout"
            assert caught.value.text == "cgpolicyd did not answer Release in 0.3s"
            return time.monotonic() - started

    assert run(scenario()) < 2


# bus.connect: the error type it is given, for a dead and a silent bus.


def test_connect_to_a_dead_bus_is_no_server(tmp_path: Path) -> None:
    with pytest.raises(SystemdError, match="cannot reach the system bus") as caught:
        run(bus.connect(1.0, SystemdError, f"unix:path={tmp_path}/none"))
    assert caught.value.name == bus.NO_SERVER


def test_connect_to_a_silent_bus_times_out(tmp_path: Path) -> None:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "bus"))
    server.listen(1)
    try:
        with pytest.raises(DaemonError, match=r"no answer from the system bus in 0\.3s") as caught:
            run(bus.connect(0.3, DaemonError, f"unix:path={tmp_path}/bus"))
        assert caught.value.name == bus.TIMEOUT
    finally:
        server.close()
