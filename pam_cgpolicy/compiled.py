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

import errno
import marshal
import os
import stat
import sys

from .constants import MAIN_FILE, policy_files
from .errors import Untrusted
from .slicelimits import Standing
from .trust import acl_xattr, why_unsafe_fd

TYPE_CHECKING = False  # typing itself is too slow an import for the hook
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeAlias

    from .errors import PolicyError

    Compiled: TypeAlias = dict[str, Any]

# marshal's format belongs to the interpreter: another version recompiles.
# 3: tiers' factors in the policy, standings in the penalties copy, and the
# whole policy for cgpolicyd's start. 4: each group's watch mode.
FORMAT = (4, *sys.version_info[:2])


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


def _check_trusted(fd: int, path: str, directory: bool) -> None:
    """Refuse what the opened ``fd`` is, not what the path names now (no race)."""
    is_kind = stat.S_ISDIR if directory else stat.S_ISREG
    if not is_kind(os.fstat(fd).st_mode):
        raise Untrusted(f"{path}: not a {'directory' if directory else 'regular file'}")
    # Root, or whoever runs this (root, for the hook and cgpolicyd).
    why = why_unsafe_fd(fd, {0, os.geteuid()})
    if why:
        raise Untrusted(f"{path}: {why}")


def _open_state_dir(path: str, create: bool) -> int:
    """An fd of the state directory, made 0700 if ``create`` and missing; checked."""
    if create:
        try:  # noqa: SIM105 (contextlib is no builtin module)
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Untrusted(f"{path}: not a directory (a symbolic link?)") from None
        raise
    try:
        _check_trusted(fd, path, directory=True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_state_file(path: str) -> bytes | None:
    """A state file's content; None if there is none; Untrusted if root must not read it."""
    directory, name = os.path.split(path)
    try:
        dir_fd = _open_state_dir(directory or ".", create=False)
    except FileNotFoundError:
        return None
    try:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise Untrusted(f"{path}: a symbolic link") from None
        raise
    finally:
        os.close(dir_fd)
    with os.fdopen(fd, "rb") as source:
        _check_trusted(source.fileno(), path, directory=False)
        return source.read()


def _write_atomically(path: str, payload: bytes, mode: int = 0o600, create: bool = True) -> None:
    """A reader sees the old file or the new one, never half; ``mode`` whatever the umask,
    in a checked directory (made 0700 if ``create`` and missing).

    The new file is created under a fresh name with O_EXCL|O_NOFOLLOW and
    renamed over the old one, so no planted link or file is ever written through.
    """
    directory, name = os.path.split(path)
    dir_fd = _open_state_dir(directory or ".", create=create)
    try:
        tmp = f".{name}.{os.urandom(8).hex()}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, mode, dir_fd=dir_fd)
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as out:
                out.write(payload)
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            os.unlink(tmp, dir_fd=dir_fd)
            raise
    finally:
        os.close(dir_fd)


def write_public_file(path: str, payload: bytes) -> None:
    """A file anyone may read (0644), replaced atomically in an existing directory that
    only root can change (Untrusted otherwise; FileNotFoundError if it is missing)."""
    _write_atomically(path, payload, mode=0o644, create=False)


def _unmarshal(payload: bytes | None, key: str) -> Any:
    """The ``key`` part of a saved copy; None if absent, from another interpreter or corrupt."""
    if payload is None:
        return None
    try:
        data = marshal.loads(payload)
        return data[key] if data["format"] == FORMAT else None
    except (EOFError, ValueError, TypeError, KeyError):
        return None


def _read(cache_file: str) -> tuple[list[tuple[Any, ...]], Compiled] | None:
    payload = read_state_file(cache_file)
    marks, policy = _unmarshal(payload, "fingerprint"), _unmarshal(payload, "policy")
    return None if marks is None or policy is None else (marks, policy)


def read_last_good(cache_file: str) -> Compiled | None:
    """The last good policy saved, whatever the files hold now; None if there is none.

    Untrusted (an OSError) when root must not read it.
    """
    cached = _read(cache_file)
    return None if cached is None else cached[1]


def save(cache_file: str, compiled: Compiled, marks: list[tuple[Any, ...]]) -> None:
    _write_atomically(
        cache_file, marshal.dumps({"format": FORMAT, "fingerprint": marks, "policy": compiled})
    )


class Loaded:
    """The policy in force, where it came from, and why the files were not used."""

    __slots__ = ("error", "policy", "refused", "source")

    def __init__(
        self,
        policy: Compiled | None,
        source: str,
        error: PolicyError | None = None,
        refused: Untrusted | None = None,
    ) -> None:
        self.policy = policy
        self.source = source  # "compiled", "files", "last good" or "none"
        self.error = error
        self.refused = refused  # why the compiled copy was not trusted


def load_in_force(
    config_dir: str, cache_file: str | None, on_cached: Callable[[Compiled], None] | None = None
) -> Loaded:
    """The policy to act on: the files when valid, else the last good compiled copy.

    ``cache_file`` is None for a directory that is not the node's own (a draft
    an admin checks): a draft neither uses nor replaces the node's last good copy.
    ``on_cached`` is given the last good copy before changed files are parsed (the
    hook takes its deadline from it: parsing is the slow part).
    """
    marks = fingerprint(config_dir)
    cached, refused = None, None
    if cache_file:
        try:
            cached = _read(cache_file)
        except Untrusted as err:  # only the policy files then
            refused = err
        except OSError:  # not root (cgpolicyctl run by an admin): the files
            pass
    if cached is not None and cached[0] == marks:
        return Loaded(cached[1], "compiled")
    if cached is not None and on_cached is not None:
        on_cached(cached[1])
    from .errors import policy_error

    try:  # any failure, even a bug, is an invalid policy: the last good one stays
        from pathlib import Path

        from .policy import load_policy  # the parser only when the files changed

        compiled = load_policy(Path(config_dir)).compile()
    except Exception as err:
        error = policy_error(err, os.path.join(config_dir, MAIN_FILE))
        source = "last good" if cached else "none"
        return Loaded(cached[1] if cached else None, source, error, refused)
    if cache_file is None:
        return Loaded(compiled, "files", refused=refused)
    try:  # over a refused file too, when its directory is sound
        save(cache_file, compiled, marks)
    except OSError as err:  # a cache we cannot write must not stop a valid policy
        return Loaded(compiled, f"files (not saved: {err.strerror})", refused=refused)
    return Loaded(compiled, "files", refused=refused)


def save_penalties(path: str, penalties: dict[int, tuple[float, str, int | None, str]]) -> None:
    """cgpolicyd's penalties in force: uid -> (expiry, tier, the MemoryMax it has reached, why).

    The daemon keeps its state in SQLite; this copy of the part the login hook
    needs is what the hook reads, without importing sqlite3 at every login. It
    holds the standing, not properties: the hook decides with slice_limits, as
    the daemon does. ``why`` is for the user's login message.
    """
    _write_atomically(path, marshal.dumps({"format": FORMAT, "penalties": penalties}))


class Penalty:
    """A penalty in force as the hook's copy has it: the standing, its end, and why."""

    __slots__ = ("expiry", "standing", "why")

    def __init__(self, standing: Standing, expiry: float, why: str) -> None:
        self.standing = standing
        self.expiry = expiry
        self.why = why


def read_penalty_entry(path: str, uid: int, now: float) -> Penalty | None:
    """``uid``'s penalty if one is in force; None otherwise.

    OSError (Untrusted among them) or ValueError when the copy cannot be used:
    the caller says so, since then no penalty is known.
    """
    entry = read_penalties(path).get(uid)
    if entry is None or entry[0] <= now:
        return None  # an expired entry: the daemon releases it at its next cycle
    expiry, tier, memory_max = entry[:3]
    why = entry[3] if len(entry) > 3 else ""  # a copy from before the login message
    return Penalty(Standing(tier, memory_max), expiry, str(why))


def read_penalty(path: str, uid: int, now: float) -> Standing | None:
    """The standing of ``uid``'s penalty if one is in force; None otherwise (see above)."""
    penalty = read_penalty_entry(path, uid, now)
    return None if penalty is None else penalty.standing


def read_penalties(path: str) -> dict[int, tuple[float, str, int | None, str]]:
    """The whole copy save_penalties wrote; empty if cgpolicyd never ran. Errors: read_penalty's."""
    payload = read_state_file(path)
    if payload is None:
        return {}
    penalties = _unmarshal(payload, "penalties")
    if not isinstance(penalties, dict):
        raise ValueError(f"{path}: not a penalties copy of this cgpolicy")
    return penalties
