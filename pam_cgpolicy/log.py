"""One syslog stream for the hook, the CLI and cgpolicyd; the journal picks it up.

Every ``key=value`` line goes through ``fields``: values come from users (a
name, a reason, an error text), and a raw newline, quote or ``key=`` in one
would forge fields or whole lines for whoever reads the journal.
"""

from __future__ import annotations

import syslog

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


def open_log(ident: str, echo: bool = False) -> None:
    """``echo`` copies each line to stderr, for a hook run by hand."""
    options = syslog.LOG_PID | (syslog.LOG_PERROR if echo else 0)
    syslog.openlog(ident, options, syslog.LOG_AUTHPRIV)


def info(message: str) -> None:
    syslog.syslog(syslog.LOG_INFO, message)


def error(message: str) -> None:
    syslog.syslog(syslog.LOG_ERR, message)
