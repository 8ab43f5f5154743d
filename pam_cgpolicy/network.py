"""Whether cgpolicyd may reach, over TCP, the servers its policy names.

The unit as shipped lets cgpolicyd open unix sockets only (the bus, the
journal). [notify]'s mail server, and [sync]'s database unless it is a unix
socket's directory, are reached over TCP, which needs the drop-in the packages
ship at NETWORK_DROPIN. cgpolicyd (at start and on each reload, from the socket
it is refused) and cgpolicyctl doctor (from the unit's settings) say so in
the words of ``denied``.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence

from .constants import NETWORK_DROPIN, NETWORK_DROPIN_ACTIVE
from .policy import Policy

# The README gives the same two commands.
ENABLE = (
    f"install -D -m 0644 {NETWORK_DROPIN} {NETWORK_DROPIN_ACTIVE}",
    "systemctl daemon-reload && systemctl restart cgpolicyd",
)


def needs(policy: Policy) -> tuple[str, ...]:
    """The policy's sections that reach their server over TCP."""
    sections = []
    if policy.notify is not None:  # smtplib speaks TCP only
        sections.append("[notify]")
    if policy.sync is not None and not policy.sync.host.startswith("/"):
        sections.append("[sync]")  # libpq: a host starting with / is a socket's directory
    return tuple(sections)


def denied(sections: Sequence[str]) -> str:
    """What to do when ``sections`` need TCP and the unit does not allow it."""
    reach = "reaches its server" if len(sections) == 1 else "reach their servers"
    return (
        f"{' and '.join(sections)} {reach} over TCP, which cgpolicyd's unit does not "
        f"allow (RestrictAddressFamilies=); allow it with the drop-in {NETWORK_DROPIN}: "
        + " && ".join(ENABLE)
    )


def refused() -> OSError | None:
    """Why this process may not open a TCP socket, if it may not; None when it may.

    Only the refusal RestrictAddressFamilies= gives counts: a full file table,
    say, is no lasting fault of the unit.
    """
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
    except OSError as err:
        if err.errno == errno.EAFNOSUPPORT:
            return err
    return None


def unit_allows(allow_list: bool, families: Sequence[str]) -> bool:
    """Whether the unit's RestrictAddressFamilies, as systemd's D-Bus API gives it (an
    allow list, or a deny list when ``allow_list`` is false; none at all is an empty
    deny list), lets AF_INET through."""
    return ("AF_INET" in families) == allow_list


def doctor_warning(
    sections: Sequence[str], allow_list: bool, families: Sequence[str]
) -> str | None:
    """doctor's warning, or None: the policy (its ``needs``) needs no TCP, or the unit
    allows it."""
    if not sections or unit_allows(allow_list, families):
        return None
    return denied(sections)
