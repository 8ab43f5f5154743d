"""Who gets what: the status group of a user, and the decision that follows.

The first group in ``order`` whose users, uids, groups or gids match the user
wins, else ``fallback``. Works on the compiled policy (plain data), so the
login hook and the CLI decide with the same code; imports nothing heavy.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself is too slow an import for the hook
if TYPE_CHECKING:
    from typing import Any, TypeAlias

    from .accounts import Account

    Group: TypeAlias = dict[str, Any]


def matching_rule(group: Group, account: Account) -> str | None:
    """The rule of ``group`` that matches the account, for the admin to read; or None."""
    if account.name in group["users"]:
        return f"users: {account.name}"
    for low, high in group["uids"]:
        if low <= account.uid <= high:
            return f"uids: {low}" if low == high else f"uids: {low}-{high}"
    for gid in group["gids"]:
        if gid in account.gids:
            return f"gids: {gid}"
    if group["groups"]:
        for name in group["groups"]:
            if name in account.group_names:
                return f"groups: {name}"
    return None


def classify(policy: dict[str, Any], account: Account) -> tuple[Group, str]:
    """The user's status group and the rule that matched ('fallback' if none did)."""
    for name in policy["order"]:
        group = policy["groups"][name]
        rule = matching_rule(group, account)
        if rule is not None:
            return group, rule
    return policy["groups"][policy["fallback"]], "fallback"


def describe_limits(limits: dict[str, Any]) -> str:
    return " ".join(f"{key}={value}" for key, value in limits.items()) or "none"


class Decision:
    """What is done for one user at login: applied, exempt or skipped, and why."""

    __slots__ = ("account", "action", "group", "reason", "rule")

    def __init__(
        self,
        account: Account,
        action: str,
        reason: str = "",
        group: Group | None = None,
        rule: str = "",
    ) -> None:
        self.account = account
        self.action = action  # "applied", "exempt" or "skipped"
        self.reason = reason
        self.group = group
        self.rule = rule

    @property
    def properties(self) -> tuple[tuple[str, str, Any], ...]:
        """The group's (name, signature, value) D-Bus properties; none unless applied.

        Without a penalty tier: slicelimits.slice_limits decides what is sent.
        """
        return self.group["properties"] if self.group and self.action == "applied" else ()


def decide(policy: dict[str, Any], account: Account) -> Decision:
    """Everything up to, not including, the call to systemd."""
    if account.uid == 0:
        return Decision(account, "skipped", "root is never limited")
    if account.uid < policy["min_uid"]:
        return Decision(account, "skipped", f"uid below min_uid {policy['min_uid']}")
    group, rule = classify(policy, account)
    if group["exempt"]:
        return Decision(account, "exempt", "group is exempt", group, rule)
    return Decision(account, "applied", "", group, rule)
