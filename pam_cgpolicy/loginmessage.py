"""The line a penalized or frozen user sees when logging in, and the one about evicted jobs.

The hook writes it to its stdout, which pam_exec's ``stdout`` option turns
into a PAM text message (PAM_TEXT_INFO). sshd shows those with the login
messages to a login shell on a terminal (not after ~/.hushlogin), and never
writes them into a session's data (scp, sftp, rsync, ``ssh host command``).
Users who are neither penalized nor frozen, and have no evicted job waiting,
get no line at all.

The line says what slicelimits decided (the tier and the limits it sent),
until when, and why (the tier's message and what put the user in it, from
cgpolicyd's penalties copy). It is one line of printable text: the reason
holds words of the policy and numbers, but nothing reaches a terminal raw.
A user whose job an admin evicted (evict.py) reads, besides, one line naming
its checkpoint until it is restored.

Imported by the hook: builtin modules only (see hook.py).
"""

from __future__ import annotations

import os
import time

from .constants import CHECKPOINT_INVENTORY, CHECKPOINT_META

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .slicelimits import SliceLimits

PREFIX = "cgpolicy: "


def printable(text: str) -> str:
    """``text`` with every control or unprintable character as a space: one line, no escapes."""
    return "".join(c if c.isprintable() else " " for c in text)


def until_text(expiry: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(expiry))


def penalty_line(limits: SliceLimits, expiry: float, why: str) -> str | None:
    """The line for a user in a penalty tier; None when the limits are the group's own."""
    if limits.tier is None:
        return None
    text = limits.limits_text()
    line = f"{PREFIX}your limits are lowered to penalty tier {limits.tier}"
    if text:
        line += f" ({text})"
    line += f" until {until_text(expiry)}"
    if why:
        line += f": {why}"
    return printable(line)


FROZEN_LINE = (
    f"{PREFIX}an administrator has frozen your processes on this node; "
    "this login goes on when they are thawed"
)


def waiting_checkpoints(checkpoints: str, uid: int) -> list[str]:
    """The ids of ``uid``'s checkpoints waiting for their restore, oldest first.

    Read from the directory alone (see evict.py): each is named UID-TIME-TOKEN
    and holds its record and its inventory image. Nothing there: an empty list.
    """
    prefix = f"{uid}-"
    try:
        names = sorted(name for name in os.listdir(checkpoints) if name.startswith(prefix))
    except OSError:
        return []
    return [
        name
        for name in names
        if os.path.isfile(os.path.join(checkpoints, name, CHECKPOINT_META))
        and os.path.isfile(os.path.join(checkpoints, name, CHECKPOINT_INVENTORY))
    ]


def evicted_line(ids: list[str]) -> str | None:
    """The line for a user whose evicted jobs wait on disk; None when none does."""
    if not ids:
        return None
    several = len(ids) > 1
    return printable(
        f"{PREFIX}an administrator evicted {'jobs' if several else 'a job'} of yours to disk "
        f"(checkpoint{'s' if several else ''} {', '.join(ids)}); "
        f"{'they are' if several else 'it is'} not running, and an administrator can "
        f"restore {'them' if several else 'it'} on this node"
    )


def show(line: str) -> None:
    """Write ``line`` to the hook's stdout; a closed or odd stdout is no reason to fail."""
    try:
        os.write(1, (line + "\n").encode("utf-8", "replace"))
    except OSError:
        return
