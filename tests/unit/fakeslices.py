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
