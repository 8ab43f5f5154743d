"""The project's error types: one base, each with a message an admin can act on.

Every error class of the project lives here. Two keep the builtin they stand
for as their base, so that code catching the builtin still catches them:
LimitError is a ValueError, Untrusted an OSError (EPERM).

Imported by the login hook: no imports beyond the builtins.
"""

from __future__ import annotations

import errno


class CgpolicyError(Exception):
    """Base of every error cgpolicy raises on purpose."""


class Problem:
    """One thing wrong in the policy, located as precisely as the file allows."""

    __slots__ = ("file", "key", "line", "message")

    def __init__(
        self, file: str, message: str, key: str | None = None, line: int | None = None
    ) -> None:
        self.file = file
        self.message = message
        self.key = key
        self.line = line

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class PolicyError(CgpolicyError):
    """The policy on disk is not valid; ``problems`` lists every error found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def policy_error(err: Exception, where: str) -> PolicyError:
    """Any failure while loading a policy, as the PolicyError it stands for.

    A bug or an input no check foresaw must not crash the hook or the daemon:
    it is one more reason the policy in ``where`` is not valid.
    """
    if isinstance(err, PolicyError):
        return err
    return PolicyError([Problem(where, f"cannot be loaded: {type(err).__name__}: {err}")])


class SiteImportError(CgpolicyError):
    """A configuration to import cannot be read, or cannot make a policy at all."""


class UnknownUser(CgpolicyError):
    """The name does not resolve through NSS."""


class UnknownTier(CgpolicyError):
    """The policy has no penalty tier by that name."""


class NotManaged(CgpolicyError):
    """The user is one cgpolicy never limits (or never freezes): an action would not take effect."""


class NotPenalized(CgpolicyError):
    """The user is in no penalty tier: there is nothing to release."""


class SystemdError(CgpolicyError):
    """systemd answered a call with an error, or did not answer in time."""

    def __init__(self, name: str, text: str) -> None:
        self.name = name
        self.text = text
        super().__init__(f"{text} ({name})" if text else name)


class FreezeError(CgpolicyError):
    """A user's session could not be frozen or thawed."""


class EvictError(CgpolicyError):
    """A job could not be checkpointed or restored; nothing of it was killed."""


class StateError(CgpolicyError):
    """The state database cannot be opened, read or written."""


class LimitError(ValueError):
    """A limit value that systemd would not accept; the message says what would."""


class Untrusted(OSError):
    """A state directory or file root must not trust: a link, or not root's alone to write."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EPERM, message)

    def __str__(self) -> str:
        return str(self.strerror)


ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
# Nobody owns cgpolicyd's name: the bus could not start it, or it has just exited.
NOT_RUNNING = (
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
)


class DaemonError(CgpolicyError):
    """cgpolicyd answered a call with an error, or did not answer in time."""

    def __init__(self, name: str, text: str) -> None:
        self.name = name
        self.text = text
        if name == ACCESS_DENIED:
            message = f"access denied: {text or 'cgpolicyd refused the call'}"
        elif name in NOT_RUNNING or name.startswith("org.freedesktop.DBus.Error.Spawn"):
            message = f"cgpolicyd is not running: {text}" if text else "cgpolicyd is not running"
        else:
            message = text or "cgpolicyd refused the call"
        super().__init__(f"{message} ({name})")


class Denied(Exception):
    """cgpolicyd's API: the caller may not do this; the text says why.

    Not a CgpolicyError: the service answers it with AccessDenied, never as the
    core's own failure.
    """


class MailError(CgpolicyError):
    """A mail could not be sent; ``permanent`` when the server refused it for good."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class SyncError(CgpolicyError):
    """The sync group's database could not be reached, or refused this node."""
