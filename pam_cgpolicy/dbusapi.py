"""cgpolicyd's D-Bus API: org.cgpolicy1.Manager at /org/cgpolicy1, transport only.

Each method checks the caller, converts types, calls the core and maps its
errors to named D-Bus errors; the decisions are the core's (ManagerCore, which
cgpolicyd implements). org.cgpolicy1.Manager.xml, shipped in this package, is
the contract: MANAGER below is read from it, each of its methods is answered by
the handler of the same name in snake case (GetUser: ``_get_user``), and every
error name this module returns is listed in it (tests/unit/test_dbusapi.py).

Access is decided from the caller's uid as the bus reports it, never from an
argument: root and the policy's admin group may call everything; anyone else
may only call GetUser about themselves. ListUsers is admins only, as it shows
who is penalized. For the same reason the signals are not broadcast: each goes
to root's and the admins' connections only, addressed to each (dbus-daemon
delivers a signal with a destination to that connection alone, without a match
rule; on the system bus only root may eavesdrop on messages meant for others).
Admin rights are looked up again at each signal.

Why a message handler and not a dbus_fast ServiceInterface: a service method is
not told who called. A handler added with MessageBus.add_message_handler gets
the whole Message, so each call carries its own sender to GetConnectionUnixUser,
with no "current message" state that concurrent calls could mix up, and only
public dbus_fast API. The cost is answering Introspect and Properties for our
object here; dbus_fast still answers Peer.

cgpolicyd starts it with ``service = await serve(bus, core)`` and announces
changes with ``await service.emit_tier_changed(...)`` and ``emit_freezer_changed(...)``.
"""

from __future__ import annotations

import asyncio
import pwd
import re
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

from dbus_fast import (
    DBusError,
    ErrorType,
    Message,
    MessageFlag,
    MessageType,
    NameFlag,
    RequestNameReply,
    Variant,
)
from dbus_fast.aio import MessageBus
from dbus_fast.introspection import Interface, Method, Node

from . import log, userrows
from .constants import CGPOLICY_BUS_NAME, CGPOLICY_INTERFACE, CGPOLICY_PATH
from .errors import (
    CgpolicyError,
    Denied,
    NotManaged,
    NotPenalized,
    PolicyError,
    UnknownTier,
    UnknownUser,
)

BUS_NAME = CGPOLICY_BUS_NAME
OBJECT_PATH = CGPOLICY_PATH
INTERFACE = CGPOLICY_INTERFACE
# Under the 25 s a D-Bus client waits by default, so callers get our Timeout error.
DEFAULT_TIMEOUT = 20.0

NO_SUCH_USER = "org.cgpolicy1.Error.NoSuchUser"
NO_SUCH_TIER = "org.cgpolicy1.Error.NoSuchTier"
NOT_MANAGED = "org.cgpolicy1.Error.NotManaged"
NOT_PENALIZED = "org.cgpolicy1.Error.NotPenalized"
INVALID_POLICY = "org.cgpolicy1.Error.InvalidPolicy"
TIMEOUT = "org.cgpolicy1.Error.Timeout"  # the name systemd.py gives its own timeouts
FAILED = "org.cgpolicy1.Error.Failed"
ACCESS_DENIED = ErrorType.ACCESS_DENIED.value

INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
PROPERTIES = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"


class ManagerCore(Protocol):
    """What cgpolicyd does behind the API. ``actor`` says who asked, for its log."""

    async def get_user(self, name: str) -> dict[str, Any]:
        """GetUser's keys (see the contract); UnknownUser for a name NSS does not know."""
        ...

    async def list_users(self) -> list[dict[str, Any]]: ...

    async def freeze(self, name: str, actor: str) -> None: ...

    async def thaw(self, name: str, actor: str) -> None: ...

    async def penalize(self, name: str, tier: str, actor: str) -> None:
        """UnknownTier when the policy has no such tier."""
        ...

    async def release(self, name: str, actor: str) -> None: ...

    async def apply_user(self, name: str, actor: str) -> str:
        """Set the user's limits now from their standing; the log line of what was sent."""
        ...

    async def reload(self, actor: str) -> list[str]:
        """The new policy's problems; empty when it is now in force."""
        ...

    async def status(self) -> dict[str, Any]:
        """Status's keys (see the contract): the policy in force, problems, pending sends."""
        ...

    async def metrics(self) -> str:
        """The last cycle's series in the Prometheus text format."""
        ...

    async def send_mail(self, actor: str) -> None:
        """Wake the mail sender: what is due in the queue goes now."""
        ...

    async def is_admin(self, uid: int) -> bool:
        """Whether ``uid`` is in the policy's admin group now. Never asked about root."""
        ...


CONTRACT = "org.cgpolicy1.Manager.xml"


def contract_xml() -> str:
    return resources.files(__package__).joinpath(CONTRACT).read_text(encoding="utf-8")


def _interface(xml: str) -> Interface:
    (interface,) = (i for i in Node.parse(xml).interfaces if i.name == INTERFACE)
    return interface


MANAGER = _interface(contract_xml())


def handler_name(member: str) -> str:
    """The ManagerService method that answers ``member``: GetUser -> _get_user."""
    return "_" + re.sub(r"(?<!^)(?=[A-Z])", "_", member).lower()


# First match wins: the project's own errors carry messages written for an admin.
ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (UnknownUser, NO_SUCH_USER),
    (UnknownTier, NO_SUCH_TIER),
    (NotManaged, NOT_MANAGED),
    (NotPenalized, NOT_PENALIZED),
    (PolicyError, INVALID_POLICY),
    (CgpolicyError, FAILED),
)

INT64 = range(-(2**63), 2**63)


def to_vardict(values: Mapping[str, Any]) -> dict[str, Variant]:
    """The core's plain dict as a{sv}: str s, bool b, int x, float d, dict[str, str] a{ss},
    list or tuple of str as.

    Keys whose value is None are left out. Any other type, or an int beyond
    int64, is the core's bug: TypeError or ValueError, which callers see as Failed.
    """
    return {key: _variant(key, value) for key, value in values.items() if value is not None}


def _variant(key: str, value: Any) -> Variant:
    if isinstance(value, bool):  # before int: bool is an int
        return Variant("b", value)
    if isinstance(value, int):
        if value not in INT64:
            raise ValueError(f"{key}: {value} does not fit D-Bus type x")
        return Variant("x", value)
    if isinstance(value, float):
        return Variant("d", value)
    if isinstance(value, str):
        return Variant("s", value)
    if isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        return Variant("a{ss}", dict(value))
    if isinstance(value, Sequence) and all(isinstance(item, str) for item in value):
        return Variant("as", list(value))
    raise TypeError(f"{key}: no D-Bus type for {type(value).__name__} {value!r}")


@dataclass(frozen=True)
class Caller:
    """Who sent a method call, as the bus knows them."""

    uid: int
    name: str | None  # None when NSS does not know the uid

    @property
    def actor(self) -> str:
        return f"uid {self.uid} ({self.name})" if self.name else f"uid {self.uid}"


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def introspection_xml(path: str) -> str | None:
    """What Introspect answers at ``path``: our object, or a node on the way to it."""
    if path == OBJECT_PATH:
        standard = [i for i in Node.default().interfaces if i.name != OBJECT_MANAGER]
        return Node(path, [*standard, MANAGER]).tostring()
    prefix = path.rstrip("/") + "/"
    if OBJECT_PATH.startswith(prefix):
        node = Node(path)
        node.nodes = [Node(OBJECT_PATH[len(prefix) :].split("/")[0], is_root=False)]
        return node.tostring()
    return None


def _bus_message(member: str, signature: str = "", body: list[Any] | None = None) -> Message:
    """A call to the bus itself."""
    return Message(
        destination="org.freedesktop.DBus",
        path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus",
        member=member,
        signature=signature,
        body=body or [],
    )


Handler = Callable[..., Awaitable[list[Any]]]


class ManagerService:
    """org.cgpolicy1.Manager on one bus connection, answering from ``core``.

    Every call is answered within ``timeout`` seconds, a stuck core included:
    the handler is cancelled, so the core must keep its records consistent at
    every await (it records before it applies, and reconciles at start-up).
    """

    def __init__(self, bus: MessageBus, core: ManagerCore, timeout: float = DEFAULT_TIMEOUT):
        self._bus = bus
        self._core = core
        self.timeout = timeout
        self._methods = {method.name: method for method in MANAGER.methods}
        self._signals = {signal.name: signal for signal in MANAGER.signals}
        # A method of the contract without its handler fails here, at start.
        self._handlers: dict[str, Handler] = {
            name: getattr(self, handler_name(name)) for name in self._methods
        }
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._bus.add_message_handler(self._on_message)

    def stop(self) -> None:
        """Stop answering; calls in progress get no reply."""
        self._bus.remove_message_handler(self._on_message)
        for task in self._tasks:
            task.cancel()

    # Signals

    async def emit_tier_changed(
        self, user: str, old_tier: str | None, new_tier: str | None, reason: str
    ) -> None:
        """No tier (None) goes out as ""."""
        await self._emit("UserTierChanged", [user, old_tier or "", new_tier or "", reason])

    async def emit_freezer_changed(self, user: str, state: str) -> None:
        await self._emit("UserFreezerChanged", [user, state])

    async def _emit(self, member: str, body: list[Any]) -> None:
        """Send the signal to each connection of root and of an admin; never raises."""
        signature = self._signals[member].signature
        try:
            async with asyncio.timeout(self.timeout):
                recipients = await self._admin_connections()
            for destination in recipients:
                self._bus.send(
                    Message(
                        message_type=MessageType.SIGNAL,
                        destination=destination,
                        path=OBJECT_PATH,
                        interface=INTERFACE,
                        member=member,
                        signature=signature,
                        body=body,
                    )
                )
        except TimeoutError:
            text = f"{member} not sent: could not tell its recipients in {self.timeout:g}s"
            log.error("signal-failed", text)
        except Exception as err:  # a signal lost must not fail what it announces
            log.error("signal-failed", f"{member} not sent: {type(err).__name__}: {err}")

    async def _admin_connections(self) -> list[str]:
        """The bus's connections (but ours) whose uid is root's or an admin's at this moment."""
        reply = await self._bus.call(_bus_message("ListNames"))
        if reply.message_type == MessageType.ERROR:
            raise CgpolicyError(f"the bus did not list its connections ({reply.error_name})")
        names = [n for n in reply.body[0] if n.startswith(":") and n != self._bus.unique_name]
        uids = await asyncio.gather(*(self._connection_uid(name) for name in names))
        admins = {uid for uid in set(uids) if uid is not None and await self._admin_uid(uid)}
        return [name for name, uid in zip(names, uids, strict=True) if uid in admins]

    async def _admin_uid(self, uid: int) -> bool:
        if uid == 0:
            return True
        try:
            return await self._core.is_admin(uid)
        except Exception:  # fail closed, as for a method call
            text = f"cannot tell whether uid {uid} is an admin\n{traceback.format_exc()}"
            log.error("call-failed", text, uid=uid)
            return False

    async def _connection_uid(self, sender: str) -> int | None:
        """The uid the bus knows for a connection; None when it has gone."""
        reply = await self._bus.call(_bus_message("GetConnectionUnixUser", "s", [sender]))
        if reply.message_type == MessageType.ERROR:
            return None
        return int(reply.body[0])

    # Dispatch

    def _on_message(self, msg: Message) -> Message | bool:
        """Claim method calls to our object; everything else goes on to dbus_fast."""
        if msg.message_type != MessageType.METHOD_CALL:
            return False
        if msg.path == OBJECT_PATH and (
            msg.interface == INTERFACE or (msg.interface is None and msg.member in self._methods)
        ):
            task = asyncio.get_running_loop().create_task(self._answer(msg))
            self._tasks.add(task)  # the loop keeps only a weak reference
            task.add_done_callback(self._tasks.discard)
            return True
        if msg.interface == INTROSPECTABLE and msg.member == "Introspect" and not msg.signature:
            xml = introspection_xml(msg.path or "")
            if xml is None:
                return False
            return self._reply(msg, Message.new_method_return(msg, "s", [xml]))
        if msg.path == OBJECT_PATH and msg.interface == PROPERTIES:
            return self._reply(msg, self._properties(msg))
        return False

    @staticmethod
    def _properties(msg: Message) -> Message:
        """The interface has no properties; say so the standard way."""
        if msg.member == "GetAll" and msg.signature == "s":
            return Message.new_method_return(msg, "a{sv}", [{}])
        if (msg.member, msg.signature) in (("Get", "ss"), ("Set", "ssv")):
            return Message.new_error(
                msg, ErrorType.UNKNOWN_PROPERTY, f"{msg.body[0]} has no property {msg.body[1]!r}"
            )
        return Message.new_error(msg, ErrorType.UNKNOWN_METHOD, f"{PROPERTIES}.{msg.member}")

    @staticmethod
    def _reply(msg: Message, reply: Message) -> Message | bool:
        return True if msg.flags & MessageFlag.NO_REPLY_EXPECTED else reply

    async def _answer(self, msg: Message) -> None:
        member = msg.member or ""
        method = self._methods.get(member)
        if method is None:
            reply = Message.new_error(msg, ErrorType.UNKNOWN_METHOD, f"{INTERFACE} has no {member}")
        elif msg.signature != method.in_signature:
            reply = Message.new_error(
                msg,
                ErrorType.INVALID_ARGS,
                f"{member} takes ({method.in_signature}), not ({msg.signature})",
            )
        else:
            reply = await self._call(msg, method)
        if msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            return
        try:
            self._bus.send(reply)
        except Exception:  # the core's value would not marshal; answer all the same
            log.error(
                "call-failed",
                log.fields(
                    call=member, error="cannot send the reply", traceback=traceback.format_exc()
                ),
            )
            self._bus.send(Message.new_error(msg, FAILED, f"{member} failed; see cgpolicyd's log"))

    async def _call(self, msg: Message, method: Method) -> Message:
        caller: Caller | None = None
        timer = asyncio.timeout(self.timeout)
        try:
            async with timer:
                caller = await self._caller(msg)
                body = await self._handlers[method.name](caller, *msg.body)
            return Message.new_method_return(msg, method.out_signature, body)
        except Exception as err:
            who = caller.actor if caller else f"sender {msg.sender}"
            name, text = self._error(method.name, who, err, timer.expired())
            return Message.new_error(msg, name, text)

    def _error(self, member: str, who: str, err: Exception, expired: bool) -> tuple[str, str]:
        """The D-Bus error for what a call raised; the unexpected ones go to the log."""
        if isinstance(err, Denied):
            log.info("denied", log.fields(event="denied", call=member, caller=who, error=err))
            return ACCESS_DENIED, str(err)
        if expired and isinstance(err, TimeoutError):
            text = f"did not finish in {self.timeout:g}s"
            log.error("call-failed", log.fields(call=member, caller=who, error=text))
            return TIMEOUT, f"cgpolicyd did not finish {member} in {self.timeout:g}s"
        for error_type, name in ERRORS:
            if isinstance(err, error_type):
                return name, str(err)
        log.error(
            "call-failed",
            log.fields(
                call=member,
                caller=who,
                error="internal",
                traceback="".join(traceback.format_exception(err)),
            ),
        )
        return FAILED, f"{member} failed unexpectedly; cgpolicyd's log has the details"

    async def _caller(self, msg: Message) -> Caller:
        if not msg.sender:
            raise Denied("the call has no sender to check")
        uid = await self._connection_uid(msg.sender)
        if uid is None:
            raise Denied(f"the bus does not know who {msg.sender} is")
        # NSS may be remote (LDAP, sssd): off the loop, and under the call's timeout.
        return Caller(uid, await asyncio.to_thread(_user_name, uid))

    async def _require_admin(self, caller: Caller, what: str) -> None:
        if caller.uid == 0 or await self._core.is_admin(caller.uid):
            return
        raise Denied(
            f"{what} is for root and the policy's admin group; {caller.actor} is in neither"
        )

    # Methods: check, convert, call the core.

    async def _get_user(self, caller: Caller, user: str) -> list[Any]:
        if user != caller.name:
            await self._require_admin(caller, "GetUser about another user")
        return [to_vardict(await self._core.get_user(user))]

    async def _list_users(self, caller: Caller) -> list[Any]:
        await self._require_admin(caller, "ListUsers")
        return [[userrows.row(user) for user in await self._core.list_users()]]

    async def _freeze_user(self, caller: Caller, user: str) -> list[Any]:
        await self._require_admin(caller, "FreezeUser")
        await self._core.freeze(user, caller.actor)
        return []

    async def _thaw_user(self, caller: Caller, user: str) -> list[Any]:
        await self._require_admin(caller, "ThawUser")
        await self._core.thaw(user, caller.actor)
        return []

    async def _penalize(self, caller: Caller, user: str, tier: str) -> list[Any]:
        await self._require_admin(caller, "Penalize")
        await self._core.penalize(user, tier, caller.actor)
        return []

    async def _release(self, caller: Caller, user: str) -> list[Any]:
        await self._require_admin(caller, "Release")
        await self._core.release(user, caller.actor)
        return []

    async def _apply(self, caller: Caller, user: str) -> list[Any]:
        await self._require_admin(caller, "Apply")
        return [await self._core.apply_user(user, caller.actor)]

    async def _reload(self, caller: Caller) -> list[Any]:
        await self._require_admin(caller, "Reload")
        return [[str(problem) for problem in await self._core.reload(caller.actor)]]

    async def _status(self, caller: Caller) -> list[Any]:
        await self._require_admin(caller, "Status")  # it names the users pending
        return [to_vardict(await self._core.status())]

    async def _metrics(self, caller: Caller) -> list[Any]:
        await self._require_admin(caller, "Metrics")  # every user's usage and tier
        return [await self._core.metrics()]

    async def _send_mail(self, caller: Caller) -> list[Any]:
        await self._require_admin(caller, "SendMail")
        await self._core.send_mail(caller.actor)
        return []


async def serve(
    bus: MessageBus, core: ManagerCore, timeout: float = DEFAULT_TIMEOUT
) -> ManagerService:
    """Answer org.cgpolicy1.Manager calls on ``bus`` from ``core``, and own org.cgpolicy1.

    Returns the service, for its signal emitters. CgpolicyError when the name
    cannot be ours: another cgpolicyd has it, or the bus policy refuses.
    """
    service = ManagerService(bus, core, timeout)
    # Answer before owning the name: the call that activated us is waiting for it.
    service.start()
    try:
        reply = await asyncio.wait_for(bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE), timeout)
    except (DBusError, TimeoutError) as err:
        service.stop()
        raise CgpolicyError(f"cannot own {BUS_NAME}: {err or 'the bus did not answer'}") from None
    if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
        service.stop()
        raise CgpolicyError(f"{BUS_NAME} is owned by another process: is cgpolicyd running?")
    return service
