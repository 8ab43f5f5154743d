"""A usage sampler for daemon tests on a node where nobody is logged in."""

from __future__ import annotations


class NoSlices:
    """No user slice at all: cycles only follow the policy files and the store."""

    mode = "unified"

    def active_uids(self, min_uid):
        return []

    def sample(self, uids, whitelists, now):
        return {}


class NoSliceUnits:
    """systemd as the daemon asks it, on a node with no user slice loaded."""

    async def unit_path(self, name):
        return None


class DictAccounts:
    """NSS as cgpolicyd asks it, from a dict uid -> Account that a test may change."""

    def __init__(self, accounts):
        self.accounts = accounts
        self.asked: list[object] = []

    def by_uid(self, uid):
        from pam_cgpolicy.errors import UnknownUser

        self.asked.append(uid)
        if uid not in self.accounts:
            raise UnknownUser(f"no such uid: {uid}")
        return self.accounts[uid]

    def by_name(self, name):
        from pam_cgpolicy.errors import UnknownUser

        self.asked.append(name)
        for account in self.accounts.values():
            if account.name == name:
                return account
        raise UnknownUser(f"no such user: {name!r}")

    def many(self, uids):
        self.asked.append("many")
        return {uid: self.accounts[uid] for uid in uids if uid in self.accounts}
