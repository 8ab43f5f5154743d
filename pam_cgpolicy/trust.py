"""Is a file safe for root to act on? Only if nobody but root can change it.

Owner, mode bits, symlinks and POSIX ACLs all decide who can write a file, so
all four are checked. A symlink is refused outright: whoever can write its
directory could point it anywhere, and its target's checks would not cover
the link. Group write is refused even for gid 0, which is not root alone on
every system. Hook-safe: builtin modules only.
"""

from __future__ import annotations

import os
import stat

TYPE_CHECKING = False  # typing itself is too slow an import for the hook
if TYPE_CHECKING:
    from collections.abc import Callable

ACL_XATTR = "system.posix_acl_access"

# The kernel's ACL xattr format: a little-endian u32
# version (2), then one 8-byte entry per ACL entry: u16 tag, u16 permissions, u32 id.
ACL_VERSION = 2
ACL_ENTRY_SIZE = 8
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = (
    0x01,
    0x02,
    0x04,
    0x08,
    0x10,
    0x20,
)
ACL_WRITE = 0x02


def acl_entries(blob: bytes) -> list[tuple[int, int, int]]:
    """(tag, permissions, id) of each entry of an ACL xattr; ValueError if malformed."""
    if not blob:
        return []  # no ACL at all
    if len(blob) < 4 or (len(blob) - 4) % ACL_ENTRY_SIZE:
        raise ValueError(f"an ACL of {len(blob)} bytes")
    if int.from_bytes(blob[:4], "little") != ACL_VERSION:
        raise ValueError(f"ACL version {int.from_bytes(blob[:4], 'little')}")
    return [
        (
            int.from_bytes(blob[at : at + 2], "little"),
            int.from_bytes(blob[at + 2 : at + 4], "little"),
            int.from_bytes(blob[at + 4 : at + 8], "little"),
        )
        for at in range(4, len(blob), ACL_ENTRY_SIZE)
    ]


def acl_writers(blob: bytes) -> list[str]:
    """Who, besides the owner, an ACL lets write ("user 1001", "group 0", ...).

    The mask is ignored on purpose: anyone who can change the mask could
    re-enable the entry, and an entry that grants write is a mistake anyway.
    """
    writers = []
    for tag, perms, ident in acl_entries(blob):
        if not perms & ACL_WRITE or tag in (ACL_USER_OBJ, ACL_MASK):
            continue
        if tag == ACL_USER and ident != 0:
            writers.append(f"user {ident}")
        elif tag == ACL_GROUP:
            writers.append(f"group {ident}")
        elif tag == ACL_GROUP_OBJ:
            writers.append("the owning group")
        elif tag == ACL_OTHER:
            writers.append("everyone")
    return writers


def acl_xattr(path: str) -> bytes:
    try:
        return os.getxattr(path, ACL_XATTR, follow_symlinks=False)
    except OSError:  # no ACL, or a file system without them: the mode bits say it all
        return b""


def why_unsafe(path: str, trusted_uids: set[int] | frozenset[int]) -> str | None:
    """Why ``path`` is not root's alone to change; None when it is."""
    try:
        info = os.lstat(path)
    except OSError as err:
        return f"cannot stat: {err.strerror}"
    if stat.S_ISLNK(info.st_mode):
        return "is a symlink: root reads only files and directories, not links to them"
    return _why_unsafe(info, lambda: acl_xattr(path), trusted_uids)


def why_unsafe_fd(fd: int, trusted_uids: set[int] | frozenset[int]) -> str | None:
    """As ``why_unsafe``, for what an open ``fd`` is (no race with a rename of its path)."""
    return _why_unsafe(os.fstat(fd), lambda: _acl_of_fd(fd), trusted_uids)


def _acl_of_fd(fd: int) -> bytes:
    try:
        return os.getxattr(fd, ACL_XATTR)
    except OSError:
        return b""


def _why_unsafe(
    info: os.stat_result, read_acl: Callable[[], bytes], trusted_uids: set[int] | frozenset[int]
) -> str | None:
    mode = stat.S_IMODE(info.st_mode)
    found = f"owner uid {info.st_uid}, group gid {info.st_gid}, mode {mode:04o}"
    if info.st_uid not in trusted_uids:
        return f"owned by uid {info.st_uid} ({found}): it must be owned by root"
    try:
        blob = read_acl()
        writers = acl_writers(blob)
    except ValueError as err:
        return f"has an ACL that cannot be read ({err}): remove it"
    if writers:
        return f"an ACL lets {', '.join(writers)} write it ({found}): remove those entries"
    # With an ACL, the mode's group bits are its mask, not the group's rights.
    group_bits = 0 if blob else stat.S_IWGRP
    if info.st_mode & (group_bits | stat.S_IWOTH):
        return f"writable by its group or by everyone ({found}): only root may write it"
    return None
