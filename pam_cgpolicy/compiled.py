"""The compiled copy of the last good policy: what the hook and the CLI act on.

Each successful load is saved, in the interpreter's own marshal format, with a
fingerprint of the files it came from (contents, owner, mode, ACL). While the
files are unchanged the hook loads that copy, which costs a fraction of a
millisecond and imports neither the TOML parser nor the validator. When an admin breaks a
file the copy stays in force: a broken policy never unlimits anyone.

The compiled form is plain data (see ``Policy.compile``): per group its match
rules and the exact D-Bus properties to set. Imported by the hook, so this
module loads only builtin modules.
"""

from __future__ import annotations

import marshal
import os
import stat
import sys

from .constants import MAIN_FILE, policy_files
from .trust import acl_xattr

TYPE_CHECKING = False  # typing itself is too slow an import for the hook
if TYPE_CHECKING:
    from typing import Any, TypeAlias

    from .errors import PolicyError

    Compiled: TypeAlias = dict[str, Any]

# marshal's format belongs to the interpreter: another version recompiles.
FORMAT = (2, *sys.version_info[:2])


def fingerprint(config_dir: str) -> list[tuple[Any, ...]]:
    """What changes when any policy file is edited, replaced, chowned, chmodded or ACLed.

    The files' contents themselves, not their mtime, which anyone who can write a
    file can set back: the files are small, and reading them costs less than a
    stat-only check that misses an edit.
    """
    marks: list[tuple[Any, ...]] = []
    for path in [config_dir, *policy_files(config_dir)]:
        try:
            info = os.lstat(path)
            acl = acl_xattr(path)
            content = None if stat.S_ISDIR(info.st_mode) else _content(path)
        except OSError:
            marks.append((path, None))
            continue
        marks.append(
            (
                path,
                info.st_ino,
                info.st_uid,
                info.st_gid,
                info.st_mode,
                info.st_ctime_ns,
                acl,
                content,
            )
        )
    return marks


def _content(path: str) -> bytes:
    with open(path, "rb") as source:
        return source.read()


def _read(cache_file: str) -> tuple[list[tuple[Any, ...]], Compiled] | None:
    try:
        with open(cache_file, "rb") as source:
            data = marshal.load(source)
        if data["format"] != FORMAT:
            return None
        return data["fingerprint"], data["policy"]
    except (OSError, EOFError, ValueError, TypeError, KeyError):
        return None


def save(cache_file: str, compiled: Compiled, marks: list[tuple[Any, ...]]) -> None:
    _write_atomically(
        cache_file, marshal.dumps({"format": FORMAT, "fingerprint": marks, "policy": compiled})
    )


def _write_atomically(path: str, payload: bytes) -> None:
    """A reader sees the old file or the new one, never half."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(payload)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class Loaded:
    """The policy in force, where it came from, and why the files were not used."""

    __slots__ = ("error", "policy", "source")

    def __init__(
        self, policy: Compiled | None, source: str, error: PolicyError | None = None
    ) -> None:
        self.policy = policy
        self.source = source  # "compiled", "files", "last good" or "none"
        self.error = error


def load_in_force(config_dir: str, cache_file: str | None) -> Loaded:
    """The policy to act on: the files when valid, else the last good compiled copy.

    ``cache_file`` is None for a directory that is not the node's own (a draft
    an admin checks): a draft neither uses nor replaces the node's last good copy.
    """
    marks = fingerprint(config_dir)
    cached = _read(cache_file) if cache_file else None
    if cached is not None and cached[0] == marks:
        return Loaded(cached[1], "compiled")
    from .errors import policy_error

    try:  # any failure, even a bug, is an invalid policy: the last good one stays
        from pathlib import Path

        from .policy import load_policy  # the parser only when the files changed

        compiled = load_policy(Path(config_dir)).compile()
    except Exception as err:
        error = policy_error(err, os.path.join(config_dir, MAIN_FILE))
        return Loaded(cached[1] if cached else None, "last good" if cached else "none", error)
    if cache_file is None:
        return Loaded(compiled, "files")
    try:
        save(cache_file, compiled, marks)
    except OSError as err:  # a cache we cannot write must not stop a valid policy
        return Loaded(compiled, f"files (not saved: {err.strerror})")
    return Loaded(compiled, "files")


def save_penalties(path: str, penalties: dict[int, tuple[float, tuple[Any, ...]]]) -> None:
    """cgpolicyd's penalties in force: uid -> (expiry, the slice's properties).

    The daemon keeps its state in SQLite; this copy of the part the login hook
    needs is what the hook reads, without importing sqlite3 at every login.
    """
    _write_atomically(path, marshal.dumps({"format": FORMAT, "penalties": penalties}))


def read_penalty(path: str, uid: int, now: float) -> tuple[Any, ...] | None:
    """The properties of ``uid``'s penalty if one is in force; None otherwise."""
    try:
        with open(path, "rb") as source:
            data = marshal.load(source)
        if data["format"] != FORMAT:
            return None
        entry = data["penalties"].get(uid)
    except (OSError, EOFError, ValueError, TypeError, KeyError, AttributeError):
        return None
    if entry is None or entry[0] <= now:
        return None  # an expired entry: the daemon releases it at its next cycle
    return tuple(entry[1])
