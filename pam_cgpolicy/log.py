"""One log stream for the hook, the CLI and cgpolicyd: the journal, syslog when it is absent.

Each entry is a line of ``key=value`` text and, in the journal, fields of its
own (CGPOLICY_EVENT, CGPOLICY_USER, CGPOLICY_UID, CGPOLICY_TIER and the event
kind's MESSAGE_ID), sent with the journal's native protocol: one datagram to
its socket, no library (the hook imports only builtin modules). Without that
socket the same line goes to syslog.

Values come from users (a name, a reason, an error text, a process name). In
the text, ``fields`` quotes them, since a raw newline, quote or ``key=`` would
forge fields or lines; in the journal, a value with a newline is sent in the
protocol's length-prefixed form, so it cannot start a field of its own.
"""

from __future__ import annotations

import _socket
import errno
import os
import sys
import syslog

JOURNAL_SOCKET = "/run/systemd/journal/socket"
_AUTHPRIV = 10  # syslog's facility number: the journal's SYSLOG_FACILITY
_ERR, _INFO = 3, 6

# Each event kind's MESSAGE_ID (journalctl MESSAGE_ID=...). Fixed: a site's
# saved queries use them. A new kind gets a new random UUID here.
MESSAGE_IDS = {
    # a decision on a user's slice, at login or by cgpolicyd / cgpolicyctl
    "applied": "255e5fbe4e36426ba424d18eea48bcb9",
    "exempt": "03dbf9d84e04491da49c042a9032e524",
    "skipped": "2c8da8b5fae54a068d966a3e33325d4d",
    "failed": "0667f8c441ac4b8bb5440cf2d482a069",
    "timeout": "5703bc91d7d54727b41febdb26bbfb1b",
    "reapplied": "cf46bfc0cc034085941a5c7b529b3e0c",
    "memory-step": "4f7649f3d30f46289536de3b854de5e0",
    # penalties
    "penalized": "4ac56945c8814c3783d920ce3936b50c",
    "released": "2710e71388ac40459cd99f19fce0aa76",
    "forgiven": "891c689da0284eac8fe4dba07803390a",
    # the freezer
    "frozen": "98e88c97a3ff4ddd818cc37e85c8f829",
    "thawed": "e9bc12aa05c04edd8d27268a4ee79b72",
    "held": "2885a4c387504df88e7a62fc2d0d2290",
    # the policy and cgpolicy's own files
    "policy-error": "b916a3f55a544fb08cc6db604d9e33d2",
    "reloaded": "277eadd43a0a4f989959b6ee95997dd6",
    "reload-refused": "f4fe5d7be17448999490cfa6881e994e",
    "state-file-error": "630c9db9035d4f9bb78cfca5c5c97a64",
    "pam-line": "a765088a8d5a46538faa667873f0eae2",
    "salvaged": "e2a6effbd23041c5b01aff3e96aa7d84",
    # cgpolicyd's life and its API
    "started": "694b67ad36704249b33fcaf263164251",
    "start-degraded": "c5d86f22d9f94db9858dcd1a674e5b09",
    "stopped": "3d6bcba28a004ffda6e7ed81a8c86960",
    "cycle-failed": "f517b88d4ed749ac95b0a6c743708d65",
    "clock-step": "0ef76d4bcfa645f4a9239061cc59ef53",
    "state-unwritable": "574385e9ce2c4e98ab505810edc4fedc",
    "state-writable": "6bd6cd9e352a413085bd79a83179108b",
    "busctl-missing": "99a42a05e2814f6f823187f7a9f3101b",
    "busctl-found": "fccfd80788804ea4854ec5c457d5ff12",
    "denied": "aec13f451b2e4a418c9b837d03d801d7",
    "call-failed": "c29b98fd926d4d869912803da6545ffc",
    "signal-failed": "80f5b12bc34148a7b067ee1f0d5a922a",
    # usage history
    "history-failed": "6b0f3d1c2e8a4c52a1f7d9e04b3c6a18",
    # mail
    "mail-queued": "1d2c8e6a7b3f4a0c9e5d2b8f6a4c1e37",
    "mail-sent": "8a3e5c1f2d6b4e7a9c0f3b5d7e1a2c48",
    "mail-failed": "4e7b2a9c6d1f4b3e8a5c0d2f7b9e6a15",
    "mail-skipped": "c3f8a1d6e2b94c7a5f0e3d8b1a6c2f94",
    "mail-plot-failed": "5b9d2e7f1a3c4e8b6d0f2a9c7e1b3d56",
    "mail-queue-failed": "f2a6c9e3b8d14f7a0c5e2b9d6f3a8c71",
    # several login nodes ([sync])
    "sync-down": "d2af4c2041d34b74b90567c71733362f",
    "sync-up": "b8844d792ab54c1fa6ba5aa79441e1e1",
    "sync-failed": "0c1ab9b3ba144213b77fb1d73f4098bc",
    "sync-duplicate": "60c3c8c149784324877d271a3df8b133",
    "sync-duplicate-gone": "a0f4314d0e044c918a94bd639f6481e6",
    # [notify] or [sync] needs TCP, which the unit refuses cgpolicyd
    "network-denied": "568cd519e9ad49b9ab1a71105ba05e81",
    # eviction to a checkpoint
    "evicted": "7e2b9f4c1a6d4e3b8c5f0a2d9e6b3c17",
    "restored": "3c8f1e6a9b2d4f7c0e5a3b8d1f6c9e24",
    "evict-failed": "d1a7e4c9f3b64a2e8f5c0b7d3a9e6f58",
    # metrics
    "metrics-not-written": "9c4e1a7f3b2d4c8e6a0f5d9b2e7c1a63",
    "metrics-written": "2f7d9b3e6c1a4f5b8d0e2a7c9f3b6e14",
    "metrics-failed": "b6e3f9a2c7d14e8b5a0c3f6d9e2b7a41",
}

# Characters a bare value may hold; anything else is quoted and escaped.
_BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.,:/%@+-")
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def quote(value: object) -> str:
    """``value`` as one field value: bare when plain, else in double quotes, escaped."""
    text = str(value)
    if text and all(c in _BARE for c in text):
        return text
    out = []
    for c in text:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif c < " " or c == "\x7f" or not c.isprintable():
            out.append(f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def fields(**values: object) -> str:
    """``key=value`` pairs in order, each value quoted as needed; None leaves a key out."""
    return " ".join(f"{key}={quote(value)}" for key, value in values.items() if value is not None)


def journal_field(name: str, value: object) -> bytes:
    """One field in the native protocol: ``NAME=value``, length-prefixed if it has a newline."""
    data = str(value).encode("utf-8", "backslashreplace")
    key = name.encode("ascii")
    if b"\n" in data:
        return key + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
    return key + b"=" + data + b"\n"


TYPE_CHECKING = False  # typing itself is too slow an import for the hook
if TYPE_CHECKING:
    from typing import Protocol

    class Writer(Protocol):
        def __call__(
            self,
            event: str,
            message: str,
            user: str | None = ...,
            uid: int | None = ...,
            tier: str | None = ...,
        ) -> None: ...


class _Log:
    ident = "cgpolicy"
    echo = False
    socket: _socket.socket | None = None


def open_log(ident: str, echo: bool = False) -> None:
    """``echo`` copies each line to stderr, for a hook run by hand."""
    _Log.ident, _Log.echo = ident, echo
    syslog.openlog(ident, syslog.LOG_PID, syslog.LOG_AUTHPRIV)


def close_log() -> None:
    """Close the journal's socket; the next entry opens it again."""
    if _Log.socket is not None:
        _Log.socket.close()
        _Log.socket = None


def entry(
    priority: int,
    event: str,
    message: str,
    user: str | None = None,
    uid: int | None = None,
    tier: str | None = None,
) -> bytes:
    """The datagram of one entry: the message and its fields."""
    parts = [
        journal_field("MESSAGE", message),
        journal_field("PRIORITY", priority),
        journal_field("SYSLOG_FACILITY", _AUTHPRIV),
        journal_field("SYSLOG_IDENTIFIER", _Log.ident),
        journal_field("SYSLOG_PID", os.getpid()),
        journal_field("CGPOLICY_EVENT", event),
    ]
    if event in MESSAGE_IDS:
        parts.append(journal_field("MESSAGE_ID", MESSAGE_IDS[event]))
    for name, value in (("CGPOLICY_USER", user), ("CGPOLICY_UID", uid), ("CGPOLICY_TIER", tier)):
        if value is not None:
            parts.append(journal_field(name, value))
    return b"".join(parts)


def _send_memfd(sock: _socket.socket, datagram: bytes) -> None:
    """An entry too big for one datagram: the journal takes it as a sealed memfd."""
    import fcntl  # only here: a rare, large entry (a traceback)

    fd = os.memfd_create("cgpolicy-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(datagram)
        while view:
            view = view[os.write(fd, view) :]
        seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        rights = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fd.to_bytes(4, sys.byteorder))]
        sock.sendmsg([], rights, 0, JOURNAL_SOCKET)
    finally:
        os.close(fd)


def _to_journal(datagram: bytes) -> bool:
    """Whether the journal took the entry."""
    try:
        if _Log.socket is None:
            _Log.socket = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
        try:
            _Log.socket.sendto(datagram, JOURNAL_SOCKET)
        except OSError as err:
            if err.errno not in (errno.EMSGSIZE, errno.ENOBUFS):  # too big for a datagram
                raise
            _send_memfd(_Log.socket, datagram)
    except OSError:
        return False
    return True


def _at(priority: int) -> Writer:
    def write(
        event: str,
        message: str,
        user: str | None = None,
        uid: int | None = None,
        tier: str | None = None,
    ) -> None:
        """An entry of kind ``event`` (a key of MESSAGE_IDS); who it is about, when someone."""
        if _Log.echo:
            sys.stderr.write(f"{_Log.ident}[{os.getpid()}]: {message}\n")
            sys.stderr.flush()
        if not _to_journal(entry(priority, event, message, user, uid, tier)):
            syslog.syslog(priority, message)

    return write


info = _at(_INFO)
error = _at(_ERR)


class Outage:
    """A fault of the whole node, logged once when it starts and once when it ends,
    however many tries fail meanwhile; the daemon keeps trying every cycle.
    ``context`` (a node's name, say) goes into both lines."""

    def __init__(self, lost: str, back: str, **context: object) -> None:
        self.lost = lost  # the event kinds of its two log lines
        self.back = back
        self.context = context
        self.error: str | None = None  # the first failure's, while it lasts

    def failed(self, err: Exception | str) -> None:
        if self.error is None:
            text = fields(event=self.lost, **self.context, error=err, retry="every-cycle")
            error(self.lost, text)
            self.error = str(err)

    def ended(self) -> None:
        if self.error is not None:
            info(self.back, fields(event=self.back, **self.context, since_error=self.error))
            self.error = None
