"""The D-Bus API against a private dbus-daemon: contract, access, errors, timeouts, signals."""

from __future__ import annotations

import asyncio
import configparser
import inspect
import os
import pwd
import re
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from dbus_fast import ErrorType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.introspection import Interface, Node
from policyfiles import DAEMON_SECTIONS, GROUPS, MAIN, write_policy
from privatebus import Sent, connect_as, dbus_send, private_bus

from pam_cgpolicy import dbusapi, log
from pam_cgpolicy.daemon import Daemon
from pam_cgpolicy.dbusapi import (
    BUS_NAME,
    ERRORS,
    FAILED,
    INTERFACE,
    OBJECT_PATH,
    TIMEOUT,
    ManagerService,
    serve,
    to_vardict,
)
from pam_cgpolicy.errors import FreezeError, UnknownTier, UnknownUser
from pam_cgpolicy.policy import load_policy
from pam_cgpolicy.state import StateStore
from pam_cgpolicy.usage import UsageSampler

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = ROOT / "pam_cgpolicy" / "org.cgpolicy1.Manager.xml"  # shipped in the package
INSTALLED_CONTRACT = ROOT / "dbus" / "org.cgpolicy1.Manager.xml"  # what install.sh installs
BUS_POLICY = ROOT / "dbus" / "org.cgpolicy1.conf"
ACTIVATION = ROOT / "dbus" / "org.cgpolicy1.service"

IS_ROOT = os.geteuid() == 0
as_other_uids = pytest.mark.skipif(
    not IS_ROOT, reason="calling in as other uids, and owning org.cgpolicy1, needs root"
)
NOBODY = 65534
# The fake core makes this account an admin. dbus-daemon serves only uids NSS knows.
ADMIN = pwd.getpwnam("daemon").pw_uid
# The in-process client runs as this uid; when that is not root, the fake core makes it an admin.
CLIENT_ADMINS = frozenset() if IS_ROOT else frozenset({os.geteuid()})

ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"

USERS: dict[str, dict[str, Any]] = {
    "alice": {
        "user": "alice",
        "uid": 1000,
        "group": "students",
        "tier": "penalty1",
        "tier_expiry": 1_800_000_000.5,
        "occurrences": 1,
        "cpu_badness": 80.25,
        "memory_badness": 23.0,
        "limits": {"CPUQuota": "50%", "MemoryMax": "1G"},
        "frozen": False,
    },
    "nobody": {"user": "nobody", "uid": NOBODY, "group": "normal", "tier": None, "frozen": False},
}

METRICS = 'cgpolicy_user_tier{group="students",tier="",uid="2002",user="bob"} 0.0\n'
STATUS: dict[str, Any] = {
    "policy": "last good",
    "problems": ["/etc/cgpolicy/groups.d/a.toml:2: limits.CPUQuota: not a percentage"],
    "started": 1_800_000_000.25,
    "pending": ["alice"],
    "users": 2,
}


class FakeCore:
    """Records what it is asked; fails, hangs or admits admins as a test says."""

    def __init__(
        self,
        admins: frozenset[int] = CLIENT_ADMINS,
        raises: Exception | None = None,
        hangs: bool = False,
        problems: tuple[str, ...] = (),
    ) -> None:
        self.admins = admins
        self.raises = raises
        self.hangs = hangs
        self.problems = problems
        self.calls: list[tuple[str, ...]] = []
        self.asked_admin: list[int] = []

    async def _do(self, *call: str) -> None:
        self.calls.append(call)
        if self.hangs:
            await asyncio.Event().wait()
        if self.raises:
            raise self.raises

    async def get_user(self, name: str) -> dict[str, Any]:
        await self._do("get_user", name)
        if name not in USERS:
            raise UnknownUser(f"no such user: {name!r}")
        return USERS[name]

    async def list_users(self) -> list[dict[str, Any]]:
        await self._do("list_users")
        return list(USERS.values())

    async def freeze(self, name: str, actor: str) -> None:
        await self._do("freeze", name, actor)

    async def thaw(self, name: str, actor: str) -> None:
        await self._do("thaw", name, actor)

    async def penalize(self, name: str, tier: str, actor: str) -> None:
        await self._do("penalize", name, tier, actor)
        if tier != "penalty1":
            raise UnknownTier(f"no tier {tier!r}; the tiers are: penalty1")

    async def release(self, name: str, actor: str) -> None:
        await self._do("release", name, actor)

    async def apply_user(self, name: str, actor: str) -> str:
        await self._do("apply", name, actor)
        return f"user={name} action=applied"

    async def reload(self, actor: str) -> list[str]:
        await self._do("reload", actor)
        return list(self.problems)

    async def status(self) -> dict[str, Any]:
        await self._do("status")
        return STATUS

    async def metrics(self) -> str:
        await self._do("metrics")
        return METRICS

    async def send_mail(self, actor: str) -> None:
        await self._do("send_mail", actor)

    async def is_admin(self, uid: int) -> bool:
        self.asked_admin.append(uid)
        return uid in self.admins


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    # The real bus policy lets only root own the name, so it is in force only when we are root.
    with private_bus([BUS_POLICY] if IS_ROOT else []) as bus_address:
        yield bus_address


@pytest.fixture(autouse=True)
def logged(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What the service logs, kept from the machine's syslog."""
    lines: list[str] = []
    monkeypatch.setattr(log, "info", lambda _kind, text, **_who: lines.append(text))
    monkeypatch.setattr(log, "error", lambda _kind, text, **_who: lines.append(text))
    return lines


@asynccontextmanager
async def running(
    address: str, core: FakeCore, timeout: float = 5.0
) -> AsyncIterator[tuple[ManagerService, MessageBus]]:
    """The service on its own connection, and a client connection as this process's uid."""
    bus = await MessageBus(bus_address=address).connect()
    client = await MessageBus(bus_address=address).connect()
    service: ManagerService | None = None
    try:
        service = await serve(bus, core, timeout)
        yield service, client
    finally:
        if service:
            service.stop()
        client.disconnect()
        bus.disconnect()


T = TypeVar("T")


def run(scenario: Coroutine[Any, Any, T]) -> T:
    """Run a test's scenario on a fresh event loop; a stuck one fails, not hangs."""
    return asyncio.run(asyncio.wait_for(scenario, 20))


async def call(
    client: MessageBus,
    member: str,
    signature: str = "",
    body: list[Any] | None = None,
    interface: str = INTERFACE,
) -> Message:
    return await client.call(
        Message(
            destination=BUS_NAME,
            path=OBJECT_PATH,
            interface=interface,
            member=member,
            signature=signature,
            body=body or [],
        )
    )


def error_of(reply: Message) -> tuple[str | None, str]:
    assert reply.message_type == MessageType.ERROR, reply.body
    return reply.error_name, reply.body[0]


# dbus-send arguments of one call to every method.
EVERY_METHOD = {
    "GetUser": ["string:alice"],
    "ListUsers": [],
    "FreezeUser": ["string:alice"],
    "ThawUser": ["string:alice"],
    "Penalize": ["string:alice", "string:penalty1"],
    "Release": ["string:alice"],
    "Apply": ["string:alice"],
    "Reload": [],
    "Status": [],
    "Metrics": [],
    "SendMail": [],
}


async def send_as(address: str, uid: int, member: str, *args: str) -> Sent:
    return await dbus_send(address, uid, BUS_NAME, OBJECT_PATH, f"{INTERFACE}.{member}", *args)


# The contract


def shape(interface: Interface) -> dict[str, Any]:
    """What a caller depends on: names, argument names and types, directions, annotations."""

    def args(arguments: list[Any]) -> list[tuple[str | None, str]]:
        return [(arg.name, arg.signature) for arg in arguments]

    def notes(member: Any) -> Any:
        # Debian 12's dbus-fast (1.84) parses no annotations.
        return getattr(member, "annotations", None)

    return {
        "methods": {
            m.name: (args(m.in_args), args(m.out_args), notes(m)) for m in interface.methods
        },
        "signals": {s.name: (args(s.args), notes(s)) for s in interface.signals},
        "properties": {p.name: (p.signature, p.access) for p in interface.properties},
        "annotations": notes(interface),
    }


def contract() -> Interface:
    (interface,) = Node.parse(CONTRACT.read_text()).interfaces
    assert interface.name == INTERFACE
    return interface


def test_the_served_interface_is_the_contract(address: str) -> None:
    async def scenario() -> None:
        async with running(address, FakeCore()) as (_, client):
            node = await client.introspect(BUS_NAME, OBJECT_PATH)
            served = {interface.name: interface for interface in node.interfaces}
            assert shape(served[INTERFACE]) == shape(contract())
            assert set(served) == {
                INTERFACE,
                "org.freedesktop.DBus.Introspectable",
                "org.freedesktop.DBus.Peer",
                "org.freedesktop.DBus.Properties",
            }
            # busctl tree and the like find the object from the root.
            assert [n.name for n in (await client.introspect(BUS_NAME, "/")).nodes] == ["org"]
            assert [n.name for n in (await client.introspect(BUS_NAME, "/org")).nodes] == [
                "cgpolicy1"
            ]

    run(scenario())


def test_the_contract_names_every_error_the_service_gives() -> None:
    own = {name for _, name in ERRORS} | {TIMEOUT, FAILED}
    # The bus's standard errors the service itself answers with, wherever it names one.
    source = inspect.getsource(dbusapi)
    standard = {getattr(ErrorType, n).value for n in re.findall(r"ErrorType\.([A-Z_]+)", source)}
    assert {"org.freedesktop.DBus.Error.AccessDenied"} < standard
    listed = re.findall(r"org\.(?:cgpolicy1|freedesktop\.DBus)\.Error\.\w+", CONTRACT.read_text())
    assert set(listed) == own | standard


def test_the_interface_served_is_read_from_the_shipped_contract() -> None:
    assert shape(dbusapi.MANAGER) == shape(contract())
    assert dbusapi.contract_xml() == CONTRACT.read_text()
    # One file: install.sh's copy for the bus's interfaces directory is the same one.
    assert INSTALLED_CONTRACT.resolve() == CONTRACT.resolve()


def test_every_contract_method_has_its_handler() -> None:
    service = ManagerService(None, FakeCore())  # type: ignore[arg-type]
    assert set(service._handlers) == {method.name for method in contract().methods}
    assert dbusapi.handler_name("ListUsers") == "_list_users"
    assert dbusapi.handler_name("Status") == "_status"


def test_every_contract_method_answers_with_its_signature(address: str) -> None:
    bodies: dict[str, list[Any]] = {
        "GetUser": ["alice"],
        "FreezeUser": ["alice"],
        "ThawUser": ["alice"],
        "Penalize": ["alice", "penalty1"],
        "Release": ["alice"],
        "Apply": ["alice"],
    }

    async def scenario() -> None:
        async with running(address, FakeCore()) as (_, client):
            for method in contract().methods:
                body = bodies.get(method.name, [])
                reply = await call(client, method.name, method.in_signature, body)
                assert reply.message_type == MessageType.METHOD_RETURN, (method.name, reply.body)
                assert reply.signature == method.out_signature, method.name

    run(scenario())


def test_standard_interfaces_and_bad_calls(address: str) -> None:
    async def scenario() -> None:
        async with running(address, FakeCore()) as (_, client):
            properties = "org.freedesktop.DBus.Properties"
            reply = await call(client, "GetAll", "s", [INTERFACE], properties)
            assert reply.body == [{}]
            reply = await call(client, "Get", "ss", [INTERFACE, "Tier"], properties)
            assert error_of(reply)[0] == "org.freedesktop.DBus.Error.UnknownProperty"
            reply = await call(client, "Ping", interface="org.freedesktop.DBus.Peer")
            assert reply.message_type == MessageType.METHOD_RETURN
            reply = await call(client, "GetUser", "u", [1000])
            assert error_of(reply)[0] == "org.freedesktop.DBus.Error.InvalidArgs"
            reply = await call(client, "Explode")
            assert error_of(reply)[0] == "org.freedesktop.DBus.Error.UnknownMethod"

    run(scenario())


# Types


def test_to_vardict_types_and_leaves_out_none() -> None:
    assert to_vardict(USERS["alice"]) == {
        "user": Variant("s", "alice"),
        "uid": Variant("x", 1000),
        "group": Variant("s", "students"),
        "tier": Variant("s", "penalty1"),
        "tier_expiry": Variant("d", 1_800_000_000.5),
        "occurrences": Variant("x", 1),
        "cpu_badness": Variant("d", 80.25),
        "memory_badness": Variant("d", 23.0),
        "limits": Variant("a{ss}", {"CPUQuota": "50%", "MemoryMax": "1G"}),
        "frozen": Variant("b", False),
    }
    assert "tier" not in to_vardict(USERS["nobody"])
    assert to_vardict(STATUS)["problems"] == Variant("as", STATUS["problems"])
    assert to_vardict({"pending": ("bob", "carol")}) == {"pending": Variant("as", ["bob", "carol"])}


def test_status_is_for_admins_and_reaches_them_as_variants(address: str) -> None:
    async def scenario() -> Sent | None:
        async with running(address, FakeCore()) as (_, client):
            reply = await call(client, "Status")
            assert reply.body == [to_vardict(STATUS)]
            return await send_as(address, NOBODY, "Status") if IS_ROOT else None

    denied = run(scenario())
    if denied is not None:
        assert denied.error == ACCESS_DENIED and "Status is for root" in denied.text


def test_metrics_are_for_admins_and_reach_them_as_text(address: str) -> None:
    async def scenario() -> Sent | None:
        async with running(address, FakeCore()) as (_, client):
            reply = await call(client, "Metrics")
            assert reply.body == [METRICS]
            return await send_as(address, NOBODY, "Metrics") if IS_ROOT else None

    denied = run(scenario())
    if denied is not None:
        assert denied.error == ACCESS_DENIED and "Metrics is for root" in denied.text


def test_send_mail_is_for_admins_and_wakes_the_core(address: str) -> None:
    core = FakeCore()

    async def scenario() -> Sent | None:
        async with running(address, core) as (_, client):
            reply = await call(client, "SendMail")
            assert reply.message_type == MessageType.METHOD_RETURN and reply.body == []
            return await send_as(address, NOBODY, "SendMail") if IS_ROOT else None

    denied = run(scenario())
    assert [call[0] for call in core.calls] == ["send_mail"]  # the refused caller's never
    if denied is not None:
        assert denied.error == ACCESS_DENIED and "SendMail is for root" in denied.text


@pytest.mark.parametrize(
    ("value", "error"),
    [([1, 2], TypeError), ({"MemoryMax": 1}, TypeError), (2**64 - 1, ValueError)],
)
def test_to_vardict_refuses_what_has_no_documented_type(value: Any, error: type) -> None:
    with pytest.raises(error, match="key"):
        to_vardict({"key": value})


def test_get_user_reaches_the_caller_as_variants(address: str) -> None:
    async def scenario() -> None:
        async with running(address, FakeCore()) as (_, client):
            reply = await call(client, "GetUser", "s", ["alice"])
            assert reply.body == [to_vardict(USERS["alice"])]
            reply = await call(client, "ListUsers")
            assert reply.signature == "a(sxssdxddxxa{ss}b)"
            alice, nobody = map(list, reply.body[0])  # structs arrive as tuples
            assert alice == [
                "alice", 1000, "students", "penalty1", 1_800_000_000.5, 1, 80.25, 23.0,
                -1, -1, {"CPUQuota": "50%", "MemoryMax": "1G"}, False,
            ]  # fmt: skip
            assert nobody == ["nobody", NOBODY, "normal", "", -1, -1, -1, -1, -1, -1, {}, False]

    run(scenario())


def test_reload_answers_the_policy_problems(address: str) -> None:
    problems = ("/etc/cgpolicy/cgpolicy.toml:3: min_uid: must be a number",)

    async def scenario() -> None:
        async with running(address, FakeCore(problems=problems)) as (_, client):
            assert (await call(client, "Reload")).body == [list(problems)]

    run(scenario())


# Access


@as_other_uids
def test_root_may_call_everything_without_being_an_admin(address: str) -> None:
    core = FakeCore(admins=frozenset())

    async def scenario() -> list[Message]:
        async with running(address, core) as (_, client):
            return [
                await call(client, "GetUser", "s", ["alice"]),
                await call(client, "ListUsers"),
                await call(client, "FreezeUser", "s", ["alice"]),
                await call(client, "ThawUser", "s", ["alice"]),
                await call(client, "Penalize", "ss", ["alice", "penalty1"]),
                await call(client, "Release", "s", ["alice"]),
                await call(client, "Apply", "s", ["alice"]),
                await call(client, "Reload"),
            ]

    for reply in run(scenario()):
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    root = "uid 0 (root)"
    assert ("freeze", "alice", root) in core.calls
    assert ("penalize", "alice", "penalty1", root) in core.calls
    assert ("apply", "alice", root) in core.calls
    assert len(core.calls) == 8
    assert core.asked_admin == []


@as_other_uids
def test_an_unprivileged_user_may_only_ask_about_themselves(
    address: str, logged: list[str]
) -> None:
    core = FakeCore()

    async def scenario() -> dict[str, Sent]:
        async with running(address, core):
            sent = {
                member: await send_as(address, NOBODY, member, *args)
                for member, args in EVERY_METHOD.items()
            }
            sent["GetUser self"] = await send_as(address, NOBODY, "GetUser", "string:nobody")
            return sent

    sent = run(scenario())
    assert sent.pop("GetUser self").error is None
    for member, result in sent.items():
        assert result.error == ACCESS_DENIED, member
        assert "uid 65534 (nobody)" in result.text, member
    assert core.calls == [("get_user", "nobody")]  # refused calls never reach the core
    assert set(core.asked_admin) == {NOBODY}
    assert sum("denied" in line for line in logged) == len(EVERY_METHOD)


@as_other_uids
def test_access_fails_closed_when_the_admin_check_fails(address: str) -> None:
    core = FakeCore()

    async def broken_is_admin(uid: int) -> bool:
        raise RuntimeError("group lookup failed")

    core.is_admin = broken_is_admin  # type: ignore[method-assign]

    async def scenario() -> Sent:
        async with running(address, core):
            return await send_as(address, NOBODY, "FreezeUser", "string:alice")

    assert run(scenario()).error == "org.cgpolicy1.Error.Failed"
    assert core.calls == []


@as_other_uids
def test_an_admin_may_call_everything(address: str) -> None:
    core = FakeCore(admins=frozenset({ADMIN}))

    async def scenario() -> dict[str, Sent]:
        async with running(address, core):
            return {
                member: await send_as(address, ADMIN, member, *args)
                for member, args in EVERY_METHOD.items()
            }

    for member, result in run(scenario()).items():
        assert result.error is None, (member, result)
    assert ("freeze", "alice", f"uid {ADMIN} (daemon)") in core.calls
    assert len(core.calls) == len(EVERY_METHOD)


@as_other_uids
def test_the_bus_policy_lets_anyone_call_but_only_root_own(address: str) -> None:
    async def scenario() -> list[Sent]:
        async with running(address, FakeCore()):
            return [
                await dbus_send(
                    address,
                    NOBODY,
                    "org.freedesktop.DBus",
                    "/org/freedesktop/DBus",
                    "org.freedesktop.DBus.RequestName",
                    f"string:{BUS_NAME}",
                    "uint32:4",
                ),
                await dbus_send(
                    address,
                    NOBODY,
                    BUS_NAME,
                    OBJECT_PATH,
                    "org.freedesktop.DBus.ObjectManager.GetManagedObjects",
                ),
                await dbus_send(
                    address, NOBODY, BUS_NAME, OBJECT_PATH, "org.freedesktop.DBus.Peer.Ping"
                ),
                await dbus_send(
                    address,
                    NOBODY,
                    BUS_NAME,
                    OBJECT_PATH,
                    "org.freedesktop.DBus.Introspectable.Introspect",
                ),
            ]

    own, other_interface, ping, introspect = run(scenario())
    assert own.error == ACCESS_DENIED
    assert other_interface.error == ACCESS_DENIED
    assert "Rejected send message" in other_interface.text  # the bus refused, not cgpolicyd
    assert ping.error is None
    assert introspect.error is None and INTERFACE in introspect.output


def test_the_activation_file_starts_cgpolicyd() -> None:
    parser = configparser.ConfigParser()
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(ACTIVATION.read_text())
    assert dict(parser["D-BUS Service"]) == {
        "Name": BUS_NAME,
        "Exec": "/bin/false",
        "User": "root",
        "SystemdService": "cgpolicyd.service",
    }


# Errors


@pytest.mark.parametrize(
    ("raises", "member", "body", "error", "text"),
    [
        (None, "GetUser", ["zed"], "NoSuchUser", "no such user: 'zed'"),
        (
            None,
            "Penalize",
            ["alice", "penalty9"],
            "NoSuchTier",
            "no tier 'penalty9'; the tiers are: penalty1",
        ),
        (
            FreezeError("alice: not logged in"),
            "FreezeUser",
            ["alice"],
            "Failed",
            "alice: not logged in",
        ),
    ],
)
def test_the_project_errors_become_named_errors_with_their_message(
    address: str, raises: Exception | None, member: str, body: list[str], error: str, text: str
) -> None:
    async def scenario() -> tuple[str | None, str]:
        async with running(address, FakeCore(raises=raises)) as (_, client):
            return error_of(await call(client, member, "s" * len(body), body))

    assert run(scenario()) == (f"org.cgpolicy1.Error.{error}", text)


def test_an_unexpected_error_is_logged_and_the_caller_told_only_failed(
    address: str, logged: list[str]
) -> None:
    core = FakeCore(raises=RuntimeError("secret detail at /srv/cgpolicyd/core.py"))

    async def scenario() -> tuple[str | None, str]:
        async with running(address, core) as (_, client):
            return error_of(await call(client, "ThawUser", "s", ["alice"]))

    name, text = run(scenario())
    assert name == "org.cgpolicy1.Error.Failed"
    assert text == "ThawUser failed unexpectedly; cgpolicyd's log has the details"
    (entry,) = logged
    assert "Traceback" in entry and "secret detail" in entry


def test_a_stuck_core_answers_timeout_within_the_handler_timeout(address: str) -> None:
    async def scenario() -> tuple[float, tuple[str | None, str]]:
        async with running(address, FakeCore(hangs=True), timeout=0.3) as (_, client):
            start = time.monotonic()
            reply = await call(client, "Release", "s", ["alice"])
            return time.monotonic() - start, error_of(reply)

    elapsed, (name, text) = run(scenario())
    assert name == "org.cgpolicy1.Error.Timeout"
    assert text == "cgpolicyd did not finish Release in 0.3s"
    assert 0.3 <= elapsed < 2


# Signals


SUBSCRIBE = f"type='signal',sender='{BUS_NAME}',interface='{INTERFACE}'"
BARRIER = "org.cgpolicy1.Test"  # a signal the test itself sends after the service's


class Listener:
    """A connection subscribed to the service's signals, as a client would."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self.signals: list[Message] = []
        self.barriers: asyncio.Queue[Message] = asyncio.Queue()
        bus.add_message_handler(self._on_message)

    def _on_message(self, msg: Message) -> bool:
        if msg.message_type == MessageType.SIGNAL:
            if msg.interface == INTERFACE:
                self.signals.append(msg)
            elif msg.interface == BARRIER:
                self.barriers.put_nowait(msg)
        return False

    async def subscribe(self) -> None:
        reply = await self.bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="AddMatch",
                signature="s",
                body=[SUBSCRIBE],
            )
        )
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body

    async def everything_sent_before(self, sender: MessageBus) -> list[Message]:
        """The service's signals this listener got, once all ``sender`` sent so far arrived.

        The bus keeps one sender's messages to one receiver in order, so when the
        barrier arrives, every signal sent to this listener before it has arrived.
        """
        sender.send(
            Message(
                message_type=MessageType.SIGNAL,
                destination=self.bus.unique_name,
                path=OBJECT_PATH,
                interface=BARRIER,
                member="Barrier",
            )
        )
        await asyncio.wait_for(self.barriers.get(), 5)
        signals, self.signals = self.signals, []
        return signals


def bodies(signals: list[Message]) -> list[tuple[str | None, list[Any]]]:
    return [(signal.member, signal.body) for signal in signals]


@as_other_uids
def test_signals_reach_root_and_admins_but_no_other_user(address: str) -> None:
    core = FakeCore(admins=frozenset({ADMIN}))

    async def scenario() -> dict[str, list[Message]]:
        bus = await MessageBus(bus_address=address).connect()
        service = await serve(bus, core, 5.0)
        listeners = {
            "root": Listener(await MessageBus(bus_address=address).connect()),
            "admin": Listener(await connect_as(address, ADMIN)),
            "nobody": Listener(await connect_as(address, NOBODY)),
        }
        try:
            for listener in listeners.values():
                await listener.subscribe()
            await service.emit_tier_changed("alice", None, "penalty1", "badness 103.2 >= 100")
            await service.emit_freezer_changed("alice", "frozen")
            return {
                who: await listener.everything_sent_before(bus)
                for who, listener in listeners.items()
            }
        finally:
            service.stop()
            for listener in listeners.values():
                listener.bus.disconnect()
            bus.disconnect()

    got = run(scenario())
    assert got["nobody"] == []
    expected = [
        ("UserTierChanged", ["alice", "", "penalty1", "badness 103.2 >= 100"]),
        ("UserFreezerChanged", ["alice", "frozen"]),
    ]
    assert bodies(got["root"]) == bodies(got["admin"]) == expected
    tier = got["admin"][0]
    assert (tier.path, tier.signature, tier.sender) == (OBJECT_PATH, "ssss", got["root"][0].sender)
    assert NOBODY in core.asked_admin  # it was asked, and said no


@as_other_uids
def test_admin_rights_are_looked_up_at_each_signal(address: str) -> None:
    core = FakeCore(admins=frozenset())

    async def scenario() -> tuple[list[Message], list[Message], list[Message]]:
        bus = await MessageBus(bus_address=address).connect()
        service = await serve(bus, core, 5.0)
        admin = Listener(await connect_as(address, ADMIN))
        try:
            await admin.subscribe()
            await service.emit_freezer_changed("alice", "frozen")
            before = await admin.everything_sent_before(bus)
            core.admins = frozenset({ADMIN})  # added to the admin group meanwhile
            await service.emit_freezer_changed("alice", "running")
            after = await admin.everything_sent_before(bus)
            core.admins = frozenset()  # and taken out again
            await service.emit_freezer_changed("alice", "frozen")
            return before, after, await admin.everything_sent_before(bus)
        finally:
            service.stop()
            admin.bus.disconnect()
            bus.disconnect()

    before, after, removed = run(scenario())
    assert (before, removed) == ([], [])
    assert bodies(after) == [("UserFreezerChanged", ["alice", "running"])]


@as_other_uids
def test_a_stuck_admin_check_delays_a_signal_but_never_fails_its_caller(
    address: str, logged: list[str]
) -> None:
    core = FakeCore()

    async def stuck(uid: int) -> bool:
        await asyncio.Event().wait()
        return True

    core.is_admin = stuck  # type: ignore[method-assign]

    async def scenario() -> list[Message]:
        bus = await MessageBus(bus_address=address).connect()
        service = await serve(bus, core, 0.3)
        admin = Listener(await connect_as(address, ADMIN))
        try:
            await admin.subscribe()
            await service.emit_freezer_changed("alice", "frozen")  # returns, raises nothing
            return await admin.everything_sent_before(bus)
        finally:
            service.stop()
            admin.bus.disconnect()
            bus.disconnect()

    assert run(scenario()) == []
    assert logged == ["UserFreezerChanged not sent: could not tell its recipients in 0.3s"]


# cgpolicyd itself behind the API: actions that would not take effect


@pytest.fixture
def daemon_core(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    """cgpolicyd's own core; nobody is exempt, daemon (uid 1) is below min_uid."""
    groups = dict(GROUPS, admins='users = ["nobody"]\nexempt = true\n')
    config = write_policy(tmp_path / "etc", MAIN + DAEMON_SECTIONS, groups)
    monkeypatch.setenv("CGPOLICY_CONFIG_DIR", str(config))
    monkeypatch.setenv("CGPOLICY_STATE_DIR", str(tmp_path))
    with StateStore.open(tmp_path / "state.db") as store:
        # Refusals come before systemd is asked anything: there is none to ask.
        yield Daemon(load_policy(config), store, None, UsageSampler())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("member", "body", "error", "text"),
    [
        (
            "Penalize",
            ["root", "penalty1"],
            "NotManaged",
            "root (uid 0) cannot be penalized: root is never limited; nothing was recorded",
        ),
        (
            "Penalize",
            ["daemon", "penalty1"],
            "NotManaged",
            "daemon (uid 1) cannot be penalized: uid below min_uid 1000; nothing was recorded",
        ),
        (
            "Penalize",
            ["nobody", "penalty1"],
            "NotManaged",
            f"nobody (uid {NOBODY}) cannot be penalized: group admins is exempt; "
            "nothing was recorded",
        ),
        (
            "Penalize",
            ["no-such-user-x", "penalty1"],
            "NoSuchUser",
            "no such user: 'no-such-user-x'",
        ),
        ("Penalize", ["nobody", "penalty9"], "NoSuchTier", None),
        (
            "Release",
            ["nobody"],
            "NotPenalized",
            f"nobody (uid {NOBODY}) is in no penalty tier; nothing to release",
        ),
        ("Release", ["no-such-user-x"], "NoSuchUser", "no such user: 'no-such-user-x'"),
        (
            "FreezeUser",
            ["root"],
            "NotManaged",
            "root (uid 0) is never frozen: root is never limited",
        ),
        (
            "FreezeUser",
            ["daemon"],
            "NotManaged",
            "daemon (uid 1) is never frozen: uid below min_uid 1000",
        ),
        ("ThawUser", ["root"], "NotManaged", "root (uid 0) is never frozen: root is never limited"),
    ],
)
def test_cgpolicyd_refuses_actions_that_would_not_take_effect_and_records_nothing(
    address: str,
    daemon_core: Daemon,
    member: str,
    body: list[str],
    error: str,
    text: str | None,
) -> None:
    async def scenario() -> tuple[tuple[str | None, str], list[Message]]:
        async with running(address, daemon_core) as (service, client):  # type: ignore[arg-type]
            daemon_core.service = service
            listener = Listener(client)
            await listener.subscribe()
            reply = await call(client, member, "s" * len(body), body)
            return error_of(reply), await listener.everything_sent_before(service._bus)

    (name, said), signals = run(scenario())
    assert name == f"org.cgpolicy1.Error.{error}"
    if text is not None:
        assert said == text
    assert signals == []
    assert daemon_core.store.history() == [] and daemon_core.store.all() == {}
