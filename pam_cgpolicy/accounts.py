"""Who a user is, as NSS says: uid, primary and supplementary groups."""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Iterable

from .errors import UnknownUser


class Account:
    """A user as the policy sees them. Group names are looked up only if a rule needs them."""

    __slots__ = ("_group_names", "gids", "name", "uid")

    def __init__(
        self, name: str, uid: int, gids: frozenset[int], group_names: frozenset[str] | None = None
    ) -> None:
        self.name = name
        self.uid = uid
        self.gids = gids  # primary and supplementary
        self._group_names = group_names

    @property
    def group_names(self) -> frozenset[str]:
        if self._group_names is None:
            names = set()
            for gid in self.gids:
                try:
                    names.add(grp.getgrgid(gid).gr_name)
                except KeyError:
                    continue  # a gid with no name can still match by number
            self._group_names = frozenset(names)
        return self._group_names


def lookup_account(name: str) -> Account:
    """The account for a user name; UnknownUser if NSS does not know it."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise UnknownUser(f"no such user: {name!r}") from None
    return Account(
        entry.pw_name, entry.pw_uid, frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid))
    )


def lookup_uid(uid: int) -> Account:
    try:
        return lookup_account(pwd.getpwuid(uid).pw_name)
    except KeyError:
        raise UnknownUser(f"no such uid: {uid}") from None


def is_admin(account: Account, admin_group: str) -> bool:
    """Root, or a member of the policy's ``admin_group`` (nobody else when it is empty)."""
    return account.uid == 0 or (bool(admin_group) and admin_group in account.group_names)


class Accounts:
    """NSS as cgpolicyd asks it; tests pass their own."""

    def by_uid(self, uid: int) -> Account:
        return lookup_uid(uid)

    def by_name(self, name: str) -> Account:
        return lookup_account(name)

    def many(self, uids: Iterable[int]) -> dict[int, Account]:
        """The accounts of ``uids`` that NSS knows, as ``by_uid`` gives each.

        The names come from one pass over the user database instead of one
        search of it per uid (thousands of users); a database that does not
        list its users is asked one uid at a time. Groups come from
        getgrouplist, as at a login.
        """
        wanted = set(uids)
        found: dict[int, Account] = {}
        group_names: dict[int, str | None] = {}  # each gid's name asked once, not once a user

        def named(gids: frozenset[int]) -> frozenset[str]:
            for gid in gids - group_names.keys():
                try:
                    group_names[gid] = grp.getgrgid(gid).gr_name
                except KeyError:
                    group_names[gid] = None  # a gid with no name can still match by number
            return frozenset(name for gid in gids if (name := group_names[gid]) is not None)

        for entry in pwd.getpwall():
            if entry.pw_uid in wanted and entry.pw_uid not in found:
                gids = frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid))
                found[entry.pw_uid] = Account(entry.pw_name, entry.pw_uid, gids, named(gids))
        for uid in wanted - found.keys():
            try:
                found[uid] = self.by_uid(uid)
            except UnknownUser:
                continue
        return found
