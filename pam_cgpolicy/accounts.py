"""Who a user is, as NSS says: uid, primary and supplementary groups."""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass
from functools import cached_property

from .errors import UnknownUser


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gids: frozenset[int]  # primary and supplementary

    @cached_property
    def group_names(self) -> frozenset[str]:
        """Names of the account's groups; looked up only when a rule names a group."""
        names = set()
        for gid in self.gids:
            try:
                names.add(grp.getgrgid(gid).gr_name)
            except KeyError:
                continue  # a gid with no name can still match by number
        return frozenset(names)


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
