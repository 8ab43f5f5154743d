import pytest
from policyfiles import write_policy

from pam_cgpolicy.accounts import Account, lookup_account
from pam_cgpolicy.classify import classify, decide
from pam_cgpolicy.policy import load_policy
from pam_cgpolicy.slicelimits import slice_limits


def NamedAccount(name, uid, gids=(), names=()):
    """An account whose group names are given, not looked up through NSS."""
    return Account(name, uid, frozenset(gids), frozenset(names))


@pytest.fixture
def policy(tmp_path):
    return load_policy(write_policy(tmp_path)).compile()


@pytest.mark.parametrize(
    ("account", "group", "rule"),
    [
        (NamedAccount("bob", 1500), "students", "users: bob"),
        (NamedAccount("eve", 2002), "students", "uids: 2002"),
        (NamedAccount("eve", 3500), "students", "uids: 3000-3999"),
        (NamedAccount("eve", 1500, gids=[3001]), "students", "gids: 3001"),
        (
            NamedAccount("eve", 1500, gids=[50], names=["students"]),
            "students",
            "groups: students",
        ),
        (NamedAccount("eve", 1500, names=["wheel", "students"]), "admins", "groups: wheel"),
        (NamedAccount("root2", 3500), "admins", "users: root2"),
        (NamedAccount("eve", 4000), "normal", "fallback"),
    ],
)
def test_first_group_in_order_wins(policy, account, group, rule):
    found, matched_by = classify(policy, account)
    assert (found["name"], matched_by) == (group, rule)


def test_decide_skips_root_and_system_users(policy):
    assert decide(policy, NamedAccount("root", 0)).action == "skipped"
    assert decide(policy, NamedAccount("daemon", 999)).reason == "uid below min_uid 1000"


def test_decide_leaves_exempt_users_alone(policy):
    decision = decide(policy, NamedAccount("root2", 5000))
    assert decision.action == "exempt"
    assert decision.properties == ()


def test_decide_applies_and_lifts_other_groups_limits(policy):
    decision = decide(policy, NamedAccount("carol", 5000))
    sent = {name: value for name, _, value in decision.properties}
    assert sent["CPUQuotaPerSecUSec"] == 2_000_000
    assert sent["MemoryMax"] == 4 * 1024**3
    assert sent["MemoryHigh"] == 2**64 - 1  # set by students, lifted for normal
    assert sent["TasksMax"] == 2**64 - 1
    assert "group=normal rule=fallback" in slice_limits(policy, decision.account).log_line()


def test_lookup_account_includes_supplementary_groups():
    root = lookup_account("root")
    assert root.uid == 0 and 0 in root.gids and "root" in root.group_names
