"""Only root may change what root reads: owner, mode, symlinks and real POSIX ACLs."""

import os
import struct

import pytest
from policyfiles import write_policy

from pam_cgpolicy.compiled import load_in_force
from pam_cgpolicy.errors import PolicyError
from pam_cgpolicy.policy import load_policy
from pam_cgpolicy.trust import ACL_XATTR, acl_entries, acl_writers

ANY = 0xFFFFFFFF  # the id field of entries that have none


def acl(*entries: tuple[int, int, int]) -> bytes:
    """An ACL xattr as the kernel stores it, e.g. what `user:1001:rwx` becomes."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def with_user_entry(uid: int, perms: int, mask: int) -> bytes:
    return acl(
        (0x01, 6, ANY), (0x02, perms, uid), (0x04, 4, ANY), (0x10, mask, ANY), (0x20, 4, ANY)
    )


def problems(root) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_policy(root)
    return [str(p) for p in caught.value.problems]


def test_acl_granting_a_user_write_on_groups_d_is_refused(tmp_path):
    """The reported attack's first step: mode 0775 root:root plus user:1001:rwx."""
    root = write_policy(tmp_path)
    os.setxattr(root / "groups.d", ACL_XATTR, with_user_entry(1001, 7, mask=7))
    (found,) = problems(root)
    assert found.startswith(f"{root}/groups.d: owner/permissions: an ACL lets user 1001 write it")


def test_acl_write_entry_is_refused_even_when_the_mask_hides_it(tmp_path):
    root = write_policy(tmp_path)
    target = root / "groups.d" / "normal.toml"
    os.setxattr(target, ACL_XATTR, with_user_entry(1001, 6, mask=4))
    assert oct(target.stat().st_mode & 0o777) == "0o644"  # the mode bits alone look safe
    (found,) = problems(root)
    assert found.startswith(f"{target}: owner/permissions: an ACL lets user 1001 write it")


def test_acl_that_only_lets_others_read_is_fine(tmp_path):
    root = write_policy(tmp_path)
    os.setxattr(root / "cgpolicy.toml", ACL_XATTR, with_user_entry(1001, 4, mask=4))
    assert load_policy(root).fallback == "normal"


def test_acl_granting_root_write_is_fine_and_a_group_entry_is_not(tmp_path):
    root = write_policy(tmp_path)
    os.setxattr(root / "cgpolicy.toml", ACL_XATTR, with_user_entry(0, 6, mask=6))
    groups = acl((0x01, 6, ANY), (0x04, 4, ANY), (0x08, 6, 0), (0x10, 6, ANY), (0x20, 4, ANY))
    os.setxattr(root / "groups.d" / "students.toml", ACL_XATTR, groups)
    (found,) = problems(root)
    assert "students.toml: owner/permissions: an ACL lets group 0 write it" in found


def test_group_write_is_refused_even_for_gid_0(tmp_path):
    root = write_policy(tmp_path)
    (root / "groups.d").chmod(0o775)
    assert (root / "groups.d").stat().st_gid == 0
    (found,) = problems(root)
    assert found == (
        f"{root}/groups.d: owner/permissions: writable by its group or by everyone "
        "(owner uid 0, group gid 0, mode 0775): only root may write it"
    )


def test_group_file_swapped_for_a_symlink_is_refused(tmp_path):
    """The attack itself: normal.toml made a link to the exempt admins.toml."""
    root = write_policy(tmp_path)
    cache = str(tmp_path / "policy.compiled")
    good = load_in_force(str(root), cache).policy
    normal = root / "groups.d" / "normal.toml"
    normal.unlink()
    normal.symlink_to("admins.toml")
    loaded = load_in_force(str(root), cache)
    assert loaded.source == "last good" and loaded.policy == good
    assert loaded.error is not None
    (found,) = [str(p) for p in loaded.error.problems]
    assert found.startswith(f"{normal}: owner/permissions: is a symlink")


def test_dangling_symlink_is_refused_too(tmp_path):
    root = write_policy(tmp_path)
    (root / "groups.d" / "extra.toml").symlink_to("/nonexistent/extra.toml")
    found = problems(root)
    assert any("extra.toml: owner/permissions: is a symlink" in p for p in found), found


@pytest.mark.parametrize("blob", [b"\x02\x00\x00\x00\x01", b"\x03\x00\x00\x00", b"abc"])
def test_malformed_acl_blobs_are_errors_not_crashes(blob):
    with pytest.raises(ValueError):
        acl_entries(blob)


def test_acl_writers_reads_every_kind_of_entry():
    blob = acl(
        (0x01, 7, ANY), (0x02, 2, 1001), (0x02, 6, 0), (0x04, 6, ANY), (0x08, 2, 50),
        (0x10, 7, ANY), (0x20, 2, ANY),
    )  # fmt: skip
    assert acl_writers(blob) == ["user 1001", "the owning group", "group 50", "everyone"]


def test_a_state_directory_an_acl_lets_a_user_write_is_refused(tmp_path):
    """The state files get the same check as the policy files: ACLs count too."""
    from pam_cgpolicy.compiled import read_penalty, save_penalties
    from pam_cgpolicy.errors import Untrusted

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    save_penalties(str(state / "penalties.compiled"), {})
    os.setxattr(state, ACL_XATTR, with_user_entry(1001, 7, mask=7))
    with pytest.raises(Untrusted, match="an ACL lets user 1001 write it"):
        save_penalties(str(state / "penalties.compiled"), {})
    with pytest.raises(Untrusted, match="an ACL lets user 1001 write it"):
        read_penalty(str(state / "penalties.compiled"), 2002, now=0.0)
