"""Accounts.many: thousands of users from one pass over NSS, as lookup_uid gives each."""

from __future__ import annotations

import grp
import pwd
from pathlib import Path

import pytest

from pam_cgpolicy import accounts as accounts_mod
from pam_cgpolicy.accounts import Accounts, lookup_uid


def test_many_gives_what_lookup_uid_gives_and_leaves_out_unknown_uids() -> None:
    known = sorted({entry.pw_uid for entry in pwd.getpwall()})[:20]
    unknown = 4_000_000_000
    found = Accounts().many([*known, unknown])
    assert sorted(found) == known
    for uid in known:
        one = lookup_uid(uid)
        assert (found[uid].name, found[uid].uid, found[uid].gids) == (one.name, uid, one.gids)
        assert found[uid].group_names == one.group_names


def test_a_database_that_does_not_list_its_users_is_asked_one_uid_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(accounts_mod.pwd, "getpwall", list)  # enumeration turned off
    found = Accounts().many([0, 4_000_000_000])
    assert list(found) == [0] and found[0].name == pwd.getpwuid(0).pw_name


@pytest.mark.parametrize("whole", [True, False])
def test_many_gives_every_user_the_groups_lookup_uid_gives_by_either_way(
    monkeypatch: pytest.MonkeyPatch, whole: bool
) -> None:
    monkeypatch.setattr(accounts_mod, "whole_group_database", lambda: whole)
    uids = {entry.pw_uid for entry in pwd.getpwall()}
    found = Accounts().many(uids)
    for uid, account in found.items():
        one = lookup_uid(uid)
        assert (account.name, account.gids, account.group_names) == (
            one.name, one.gids, one.group_names,
        )  # fmt: skip


def _entries(monkeypatch: pytest.MonkeyPatch) -> None:
    """A user database of thousands whose groups only a pass over the group database gives."""
    users = [
        pwd.struct_passwd((f"u{i}", "x", 100_000 + i, 100, "", "/", "/bin/sh")) for i in range(5000)
    ]
    groups = [
        grp.struct_group(("users", "x", 100, [])),
        grp.struct_group(("students", "x", 3001, ["u1", "u7"])),
        grp.struct_group(("wheel", "x", 10, ["u7"])),
        grp.struct_group(("students-again", "x", 3001, ["u2"])),  # a second entry of a gid
    ]
    monkeypatch.setattr(accounts_mod.pwd, "getpwall", lambda: users)
    monkeypatch.setattr(accounts_mod.grp, "getgrall", lambda: groups)
    monkeypatch.setattr(accounts_mod, "whole_group_database", lambda: True)

    def asked(*_args: object) -> None:
        raise AssertionError("one lookup per user")

    monkeypatch.setattr(accounts_mod.os, "getgrouplist", asked)
    monkeypatch.setattr(accounts_mod.grp, "getgrgid", asked)


def test_a_whole_group_database_is_read_once_for_thousands_of_users(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _entries(monkeypatch)
    found = Accounts().many(range(100_000, 105_000))
    assert len(found) == 5000
    assert found[100_000].gids == {100} and found[100_000].group_names == {"users"}
    assert found[100_001].gids == {100, 3001}
    assert found[100_002].group_names == {"users", "students"}  # a gid's first name, as getgrgid
    assert found[100_007].group_names == {"users", "students", "wheel"}


@pytest.mark.parametrize(
    ("text", "whole"),
    [
        ("passwd: files\ngroup: files\n", True),
        ("group:   files systemd   # a comment\n", True),
        ("group: files systemd\ninitgroups: files systemd\n", True),
        ("group: sss files\n", False),  # a directory may list no members
        ("group: files [NOTFOUND=return] systemd\n", False),
        ("group: files systemd\ninitgroups: files\n", False),  # getgrall would list more
        ("group: files\ngroup: sss\n", False),
        ("passwd: files\n", False),
        ("", False),
    ],
)
def test_the_group_database_is_whole_only_when_nsswitch_says_so_plainly(
    tmp_path: Path, text: str, whole: bool
) -> None:
    path = tmp_path / "nsswitch.conf"
    path.write_text(text)
    assert accounts_mod.whole_group_database(str(path)) is whole
    assert accounts_mod.whole_group_database(str(tmp_path / "missing")) is False
