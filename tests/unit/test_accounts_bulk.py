"""Accounts.many: thousands of users from one pass over NSS, as lookup_uid gives each."""

from __future__ import annotations

import pwd

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
