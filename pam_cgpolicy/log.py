"""One syslog stream for the hook and the CLI; the journal picks it up."""

from __future__ import annotations

import syslog


def open_log(ident: str) -> None:
    syslog.openlog(ident, syslog.LOG_PID, syslog.LOG_AUTHPRIV)


def info(message: str) -> None:
    syslog.syslog(syslog.LOG_INFO, message)


def error(message: str) -> None:
    syslog.syslog(syslog.LOG_ERR, message)
