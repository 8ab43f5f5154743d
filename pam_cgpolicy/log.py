"""One syslog stream for the hook and the CLI; the journal picks it up."""

from __future__ import annotations

import syslog


def open_log(ident: str, echo: bool = False) -> None:
    """``echo`` copies each line to stderr, for a hook run by hand."""
    options = syslog.LOG_PID | (syslog.LOG_PERROR if echo else 0)
    syslog.openlog(ident, options, syslog.LOG_AUTHPRIV)


def info(message: str) -> None:
    syslog.syslog(syslog.LOG_INFO, message)


def error(message: str) -> None:
    syslog.syslog(syslog.LOG_ERR, message)
