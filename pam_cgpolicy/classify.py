"""Classification: the first status group in ``order`` that matches a user, else ``fallback``."""

from __future__ import annotations

from dataclasses import dataclass

from .accounts import Account
from .model import Policy, StatusGroup


@dataclass(frozen=True)
class Classification:
    group: StatusGroup
    rule: str  # which rule matched, for the admin: 'users: "bob"', 'fallback', ...


def _matching_rule(group: StatusGroup, account: Account) -> str | None:
    if account.name in group.users:
        return f'users: "{account.name}"'
    for low, high in group.uids:
        if low <= account.uid <= high:
            return f"uids: {low}" if low == high else f'uids: "{low}-{high}"'
    for gid in group.gids:
        if gid in account.gids:
            return f"gids: {gid}"
    if group.groups:
        for name in group.groups:
            if name in account.group_names:
                return f'groups: "{name}"'
    return None


def classify(policy: Policy, account: Account) -> Classification:
    for name in policy.order:
        group = policy.groups[name]
        rule = _matching_rule(group, account)
        if rule is not None:
            return Classification(group, rule)
    return Classification(policy.groups[policy.fallback], "fallback")
