"""The one decision of what a slice gets, for the inputs each writer has."""

import pytest
from policyfiles import DAEMON_SECTIONS, GROUPS, MAIN, write_policy
from test_hook_fails_open import run_hook

from pam_cgpolicy import limits
from pam_cgpolicy.accounts import Account
from pam_cgpolicy.compiled import save_penalties
from pam_cgpolicy.constants import PENALTIES
from pam_cgpolicy.policy import load_policy
from pam_cgpolicy.slicelimits import (
    INFINITY,
    NO_PENALTY,
    TIER_LOWERS,
    Quotas,
    Standing,
    memory_max_now,
    slice_limits,
    tier_limits,
)

GIB, MIB = 1024**3, 1024**2
NOBODY = 65534  # the hook tests' PAM_USER, in the fallback group "normal"
BOB = Account("bob", 2002, frozenset({2002}))  # students: 100%, 2G, MemoryHigh 1800M, 512 tasks
CAROL = Account("carol", 5000, frozenset({5000}))  # normal: 200%, 4G
ROOT2 = Account("root2", 5001, frozenset({5001}))  # admins: exempt


@pytest.fixture
def policy(tmp_path):
    return load_policy(write_policy(tmp_path / "etc", main=MAIN + DAEMON_SECTIONS)).compile()


def sent(result):
    return {name: value for name, _, value in result.properties}


# For each writer's inputs


def test_without_a_penalty_the_slice_gets_the_groups_limits(policy):
    result = slice_limits(policy, BOB, NO_PENALTY, 16 * GIB)
    assert result.properties == policy["groups"]["students"]["properties"]
    assert result.tier is None and result.memory_max is None
    assert 'limits="CPUQuota=100% MemoryMax=2G MemoryHigh=1800M TasksMax=512"' in (
        result.log_line()
    )


def test_a_tier_in_force_lowers_cpu_and_memory_and_keeps_the_rest(policy):
    result = slice_limits(policy, BOB, Standing("penalty2"), 16 * GIB, current=100 * MIB)
    got = sent(result)
    assert got["CPUQuotaPerSecUSec"] == 500_000
    assert got["MemoryMax"] == GIB and got["MemoryHigh"] == 900 * MIB
    assert got["TasksMax"] == 512 and got["CPUAccounting"] is True
    assert len(result.properties) == len(policy["groups"]["students"]["properties"])
    line = result.log_line()
    assert 'tier=penalty2 limits="CPUQuota=50% MemoryMax=1G MemoryHigh=900M TasksMax=512"' in line
    assert 'reason="in penalty tier penalty2"' in line


def test_a_tier_never_sets_memory_max_below_the_slices_usage(policy):
    margin = 2 * GIB // 10
    result = slice_limits(policy, BOB, Standing("penalty2"), 16 * GIB, current=1536 * MIB)
    assert sent(result)["MemoryMax"] == 1536 * MIB + margin  # not the 1G target
    assert result.memory_target == GIB and "memory_target=" in result.log_line()
    # The hook has no reading: the MemoryMax the daemon's copy says is in force stays.
    stepped = slice_limits(policy, BOB, Standing("penalty2", 1200 * MIB), 16 * GIB)
    assert sent(stepped)["MemoryMax"] == 1200 * MIB
    done = slice_limits(policy, BOB, Standing("penalty2", 1200 * MIB), 16 * GIB, current=0)
    assert sent(done)["MemoryMax"] == GIB and "memory_target=" not in done.log_line()
    # No reading and no step sent yet: MemoryMax stays at the group's.
    unread = slice_limits(policy, BOB, Standing("penalty2"), 16 * GIB)
    assert sent(unread)["MemoryMax"] == 2 * GIB and sent(unread)["MemoryHigh"] == 900 * MIB


def test_a_share_of_ram_is_lowered_as_bytes(tmp_path):
    groups = dict(GROUPS, normal='[limits]\nMemoryMax = "25%"\n')
    main = MAIN + DAEMON_SECTIONS
    policy = load_policy(write_policy(tmp_path / "etc", main=main, groups=groups)).compile()
    got = sent(slice_limits(policy, CAROL, Standing("penalty2"), 16 * GIB, current=0))
    assert "MemoryMaxScale" not in got
    assert got["MemoryMax"] == pytest.approx(2 * GIB, abs=8)


def test_exempt_and_unknown_tiers(policy):
    exempt = slice_limits(policy, ROOT2, Standing("penalty1"), 16 * GIB)
    assert exempt.properties == () and "limits=" not in exempt.log_line()  # nothing sent
    gone = slice_limits(policy, BOB, Standing("no-such-tier"), 16 * GIB)
    assert gone.properties == policy["groups"]["students"]["properties"]
    assert 'reason="no tier no-such-tier in the policy"' in gone.log_line()


def test_the_hook_logs_the_tiers_limits_it_sent(tmp_path):
    """Not the group's 200%: the line says what went to systemd."""
    write_policy(tmp_path / "etc", main=MAIN + DAEMON_SECTIONS)
    save_penalties(str(tmp_path / "state" / PENALTIES), {NOBODY: (4e9, "penalty2", None)})
    done, _ = run_hook(tmp_path, f"unix:path={tmp_path}/no-such-bus")
    assert done.returncode == 0
    line = 'tier=penalty2 limits="CPUQuota=100% MemoryMax=4G MemoryHigh=2G" memory_target=2G'
    assert line in done.stderr
    assert "CPUQuota=200%" not in done.stderr


# What a tier lowers: written once


def test_what_a_tier_lowers_is_what_the_policy_manages(tmp_path, policy):
    for key, prop in TIER_LOWERS.items():
        assert limits.SPECS[key].show == prop
    students = 'users = ["bob"]\n[limits]\nTasksMax = 9\n'
    groups = dict(GROUPS, students=students, normal="[limits]\nTasksMax = 99\n")
    bare = load_policy(write_policy(tmp_path / "bare", main=MAIN + DAEMON_SECTIONS, groups=groups))
    assert set(TIER_LOWERS) <= bare.managed_keys()  # lifted when a tier ends
    assert set(policy["tiers"]) == {"penalty1", "penalty2"}


def test_tier_limits_scale_the_groups_limits():
    assert tier_limits(Quotas(2_000_000, 4 * GIB, None), 0.5, 0.5) == {
        "CPUQuotaPerSecUSec": 1_000_000,
        "MemoryMax": 2 * GIB,
        "MemoryHigh": 2 * GIB,
    }


def test_tier_limits_scale_the_groups_memory_high_when_it_has_one():
    lowered = tier_limits(Quotas(1_500_000, 4 * GIB, 2 * GIB), 0.25, 0.25)
    assert lowered == {"CPUQuotaPerSecUSec": 375_000, "MemoryMax": GIB, "MemoryHigh": GIB // 2}


def test_tier_limits_keep_memory_high_at_most_memory_max():
    lowered = tier_limits(Quotas(None, 4 * GIB, 8 * GIB), 1, 0.5)
    assert lowered == {"MemoryMax": 2 * GIB, "MemoryHigh": 2 * GIB}


def test_tier_limits_round_down_to_whole_units():
    assert tier_limits(Quotas(1_000_001, 1001, None), 0.3, 0.3) == {
        "CPUQuotaPerSecUSec": 300_000,
        "MemoryMax": 300,
        "MemoryHigh": 300,
    }


@pytest.mark.parametrize("unlimited", [None, 0, INFINITY])
def test_tier_limits_leave_out_what_the_group_leaves_unlimited(unlimited):
    assert tier_limits(Quotas(unlimited, unlimited, None), 0.8, 0.8) == {}
    assert set(tier_limits(Quotas(1_000_000, unlimited, None), 0.8, 0.8)) == {"CPUQuotaPerSecUSec"}


def test_memory_max_never_goes_below_usage_plus_margin_and_steps_down_to_the_target():
    target, group = 512 * MIB, 2 * GIB
    margin = group // 10
    first = memory_max_now(target, group, int(1.5 * GIB), None)
    assert first == int(1.5 * GIB) + margin
    second = memory_max_now(target, group, GIB, first)
    assert second == GIB + margin
    assert memory_max_now(target, group, 2 * GIB, second) == second  # never rises again
    assert memory_max_now(target, group, None, second) == second  # unread: stays
    assert memory_max_now(target, group, 100 * MIB, second) == target
    assert memory_max_now(target, group, 3 * GIB, None) == group  # never above the group's
    assert memory_max_now(target, group, None, None) == group
