"""Who a user is, as NSS says: uid, primary and supplementary groups."""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Iterable

from .errors import UnknownUser

NSSWITCH = "/etc/nsswitch.conf"
# NSS services whose enumeration of the group database lists every membership
# their initgroups would give: /etc/group, and systemd's userdb (its getgrent
# also lists each membership record). A directory (sss, ldap, winbind) may list
# no members, or no groups at all, without being asked about the user.
WHOLE_GROUP_SERVICES = frozenset({"files", "systemd"})


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
        list its users is asked one uid at a time. Groups come from one pass
        over the group database when NSS takes them from sources that list every
        membership (``whole_group_database``), else from getgrouplist per user,
        as at a login.
        """
        wanted = set(uids)
        found: dict[int, Account] = {}
        group_names: dict[int, str | None] = {}  # each gid's name asked once, not once a user
        member_of: dict[str, set[int]] | None = None
        if whole_group_database():
            member_of = {}
            for group in grp.getgrall():
                group_names.setdefault(group.gr_gid, group.gr_name)  # getgrgid's: the first
                for member in group.gr_mem:
                    member_of.setdefault(member, set()).add(group.gr_gid)

        def named(gids: frozenset[int]) -> frozenset[str]:
            for gid in gids - group_names.keys():
                try:
                    group_names[gid] = grp.getgrgid(gid).gr_name
                except KeyError:
                    group_names[gid] = None  # a gid with no name can still match by number
            return frozenset(name for gid in gids if (name := group_names[gid]) is not None)

        for entry in pwd.getpwall():
            if entry.pw_uid in wanted and entry.pw_uid not in found:
                if member_of is None:
                    gids = frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid))
                else:
                    gids = frozenset({entry.pw_gid, *member_of.get(entry.pw_name, ())})
                found[entry.pw_uid] = Account(entry.pw_name, entry.pw_uid, gids, named(gids))
        for uid in wanted - found.keys():
            try:
                found[uid] = self.by_uid(uid)
            except UnknownUser:
                continue
        return found


def whole_group_database(nsswitch: str = NSSWITCH) -> bool:
    """Whether one pass over the group database gives each user the groups getgrouplist
    would: NSS lists groups from WHOLE_GROUP_SERVICES alone, with no action that
    stops early, and asks the same services for a user's groups.

    getgrall follows the ``group`` line, getgrouplist the ``initgroups`` line
    when there is one. A file or line missing, a line given twice, or anything
    else on it answers False: ask per user.
    """
    lines: dict[str, list[str] | None] = {}
    try:
        with open(nsswitch, encoding="utf-8") as file:
            for line in file:
                database, colon, services = line.partition("#")[0].partition(":")
                if colon:
                    name = database.strip()
                    lines[name] = None if name in lines else services.split()
    except (OSError, UnicodeDecodeError):
        return False
    group = lines.get("group")
    if not group or not all(service in WHOLE_GROUP_SERVICES for service in group):
        return False
    return lines.get("initgroups", group) == group
