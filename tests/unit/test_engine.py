import pytest
from policyfiles import DAEMON_SECTIONS, GROUPS, MAIN, write_policy

from pam_cgpolicy.accounts import Account
from pam_cgpolicy.badness import UserScore
from pam_cgpolicy.engine import Engine
from pam_cgpolicy.errors import NotManaged, NotPenalized, UnknownTier
from pam_cgpolicy.policy import load_policy
from pam_cgpolicy.slicelimits import group_quotas
from pam_cgpolicy.state import StateStore
from pam_cgpolicy.usage import Sample

GiB = 1024**3
ACCOUNTS = {
    2002: Account("bob", 2002, frozenset({2002})),  # students: 100%, 2G, MemoryHigh 1800M
    5000: Account("carol", 5000, frozenset({5000})),  # normal: 200%, 4G
    5001: Account("root2", 5001, frozenset({5001})),  # admins: exempt
}
T0 = 1_700_000_000.0


@pytest.fixture
def engine(tmp_path):
    policy = load_policy(write_policy(tmp_path / "etc", main=MAIN + DAEMON_SECTIONS))
    store = StateStore.open(tmp_path / "state.db")
    yield Engine(policy, store, memory_total=16 * GiB, lookup=ACCOUNTS.__getitem__)
    store.close()


def hog(uid, cores=1.0, memory=0):
    return {uid: Sample(uid, cores, None, memory, 0.0, 10.0)}


def props(action):
    return {name: value for name, _, value in action.properties}


def run_until_action(engine, samples, start, limit=400):
    for step in range(1, limit):
        actions = engine.cycle(samples, start + step * 10)
        if actions:
            return step, actions
    raise AssertionError("no action")


def test_a_full_quota_hog_is_penalized_after_t_times_time_to_max_bad(engine):
    step, (action,) = run_until_action(engine, hog(2002), T0)
    assert step == 24  # 0.8 * 300 s at full quota, 10 s a step
    assert action.change.kind == "penalized" and action.change.new_tier == "penalty1"
    assert props(action)["CPUQuotaPerSecUSec"] == 800_000  # 80% of one core
    assert props(action)["MemoryMax"] == int(2 * GiB * 0.8)
    assert props(action)["MemoryHigh"] == int(1800 * 1024**2 * 0.8)
    assert props(action)["TasksMax"] == 512  # the group's other limits stay
    stored = engine.store.get(2002)
    assert stored.tier == "penalty1" and stored.tier_expiry == T0 + 240 + 1800
    (event,) = engine.store.history(2002)
    assert event.new_tier == "penalty1" and event.actor is None


def test_penalty_ends_at_expiry_then_a_second_offence_escalates(engine):
    run_until_action(engine, hog(2002), T0)
    idle = hog(2002, cores=0.0)
    step, (released,) = run_until_action(engine, idle, T0 + 240)
    assert released.change.kind == "released"
    assert T0 + 240 + step * 10 >= T0 + 240 + 1800
    assert props(released)["CPUQuotaPerSecUSec"] == 1_000_000  # the group's own again
    _, (again,) = run_until_action(engine, hog(2002), T0 + 240 + step * 10)
    assert again.change.new_tier == "penalty2"
    assert props(again)["CPUQuotaPerSecUSec"] == 500_000


def test_exempt_users_are_never_judged(engine):
    for step in range(1, 100):
        assert engine.cycle(hog(5001, cores=8.0), T0 + step * 10) == []
    assert engine.store.get(5001) is None


def test_percentage_memory_limits_are_resolved_against_ram(tmp_path):
    groups = dict(GROUPS, normal='[limits]\nMemoryMax = "25%"\n')
    policy = load_policy(write_policy(tmp_path, groups=groups)).compile()
    quotas = group_quotas(policy["groups"]["normal"], memory_total=16 * GiB)
    assert abs(quotas.memory_max - 4 * GiB) < 16
    assert quotas.cpu_usec is None and quotas.cores is None


def test_reconcile_reapplies_penalties_and_ends_expired_ones(engine):
    engine.store.record(
        2002, "bob", UserScore(tier="penalty1", tier_expiry=T0 + 100, occurrences=1), None, now=T0
    )
    engine.store.record(
        5000,
        "carol",
        UserScore(tier="penalty2", tier_expiry=T0 - 5, occurrences=2),
        None,
        now=T0 - 4000,
    )
    actions = {a.user: a for a in engine.reconcile(T0)}
    assert actions["bob"].change is None
    assert props(actions["bob"])["CPUQuotaPerSecUSec"] == 800_000
    assert actions["carol"].change.kind == "released"
    assert props(actions["carol"])["CPUQuotaPerSecUSec"] == 2_000_000
    assert engine.store.get(5000).tier is None
    assert engine.store.get(5000).occurrences == 2  # forgiven only by time, not by reboot


def test_logged_out_users_are_released_at_expiry(engine):
    engine.store.record(
        5000, "carol", UserScore(tier="penalty1", tier_expiry=T0 + 5, occurrences=1), None, now=T0
    )
    (action,) = engine.cycle({}, T0 + 10)
    assert action.user == "carol" and action.change.kind == "released"


def test_admin_penalize_and_release_are_recorded_with_the_actor(engine):
    action = engine.penalize(5000, "penalty2", "uid 0 (root)", T0)
    assert props(action)["CPUQuotaPerSecUSec"] == 1_000_000  # half of 200%
    assert engine.store.get(5000).occurrences == 2
    released = engine.release(5000, "uid 0 (root)", T0 + 60)
    assert released.change.kind == "released"
    assert [e.actor for e in engine.store.history(5000)] == ["uid 0 (root)"] * 2
    with pytest.raises(UnknownTier, match="penalty1, penalty2"):
        engine.penalize(5000, "penalty9", "uid 0 (root)", T0)


def test_whitelist_joins_policy_and_group(engine):
    assert engine.whitelist(ACCOUNTS[2002]) == frozenset({"sshd", "scp", "sftp-server", "rsync"})


def test_first_samples_are_not_judged(engine):
    assert engine.cycle({2002: Sample(2002, None, 5, 0, None, None)}, T0) == []
    assert engine.store.get(2002) is None


def test_a_released_user_gets_every_tier_limit_lifted(tmp_path):
    """No group sets MemoryHigh, a tier does: the group's limits must lift it again."""
    groups = dict(GROUPS, students=GROUPS["students"].replace('MemoryHigh = "1800M"\n', ""))
    policy = load_policy(write_policy(tmp_path / "etc", main=MAIN + DAEMON_SECTIONS, groups=groups))
    with StateStore.open(tmp_path / "state.db") as store:
        engine = Engine(policy, store, memory_total=16 * GiB, lookup=ACCOUNTS.__getitem__)
        engine.penalize(2002, "penalty1", "uid 0 (root)", T0)
        released = engine.release(2002, "uid 0 (root)", T0 + 1)
    assert props(released)["MemoryHigh"] == 2**64 - 1
    assert props(released)["MemoryMax"] == 2 * GiB


def test_penalize_refuses_users_it_would_never_limit_and_records_nothing(tmp_path):
    groups = dict(GROUPS, normal="[limits]\nTasksMax = 100\n")  # nothing a tier lowers
    policy = load_policy(write_policy(tmp_path / "etc", MAIN + DAEMON_SECTIONS, groups))
    accounts = {
        **ACCOUNTS,
        0: Account("root", 0, frozenset({0})),
        999: Account("system", 999, frozenset({999})),
    }
    with StateStore.open(tmp_path / "state.db") as store:
        engine = Engine(policy, store, 16 * GiB, lookup=accounts.__getitem__)
        refusals = {
            0: "root (uid 0) cannot be penalized: root is never limited",
            999: "system (uid 999) cannot be penalized: uid below min_uid 1000",
            5001: "root2 (uid 5001) cannot be penalized: group admins is exempt",
            5000: "carol (uid 5000) cannot be penalized: group normal sets neither CPUQuota "
            "nor MemoryMax",
        }
        for uid, text in refusals.items():
            with pytest.raises(NotManaged) as refused:
                engine.penalize(uid, "penalty1", "uid 0 (root)", T0)
            assert str(refused.value) == f"{text}; nothing was recorded"
        with pytest.raises(KeyError):  # the daemon's lookup says UnknownUser
            engine.penalize(4242, "penalty1", "uid 0 (root)", T0)
        assert engine.penalize(2002, "penalty1", "uid 0 (root)", T0).change is not None
        assert {e.uid for e in store.history()} == {2002}
        assert set(store.all()) == {2002}


def test_release_of_a_user_in_no_tier_is_refused_and_records_nothing(engine):
    with pytest.raises(NotPenalized, match=r"^carol \(uid 5000\) is in no penalty tier"):
        engine.release(5000, "uid 0 (root)", T0)
    assert engine.store.history() == [] and engine.store.get(5000) is None
    engine.penalize(5000, "penalty1", "uid 0 (root)", T0)
    engine.release(5000, "uid 0 (root)", T0 + 1)
    with pytest.raises(NotPenalized):
        engine.release(5000, "uid 0 (root)", T0 + 2)
    assert [e.kind for e in engine.store.history(5000)] == ["released", "penalized"]


def test_one_step_counts_at_most_two_intervals(engine):
    """A stalled daemon, a suspend or a clock step must not penalize in one step."""
    stalled = {2002: Sample(2002, 1.0, None, 0, 0.0, 3600.0)}
    assert engine.cycle(stalled, T0 + 3600) == []
    cpu = engine.store.get(2002).cpu_badness
    engine.cycle(hog(2002), T0 + 3610)  # one ordinary interval of 10 s
    assert engine.store.get(2002).cpu_badness == pytest.approx(cpu * 1.5)


def test_a_missing_reading_keeps_the_other_badness_and_memory(engine):
    both = {2002: Sample(2002, 1.0, None, 2 * GiB, 0.0, 10.0)}
    engine.cycle(both, T0 + 10)
    before = engine.store.get(2002)
    assert before.memory_badness > 0 and before.cpu_badness > 0
    engine.cycle({2002: Sample(2002, 1.0, None, None, 0.0, 10.0)}, T0 + 20)
    assert engine.store.get(2002).memory_badness == before.memory_badness
    engine.cycle({2002: Sample(2002, None, None, 2 * GiB, 0.0, 10.0)}, T0 + 30)
    after = engine.store.get(2002)
    assert after.memory_badness > before.memory_badness
    assert after.cpu_badness > 0


def test_a_user_without_readings_is_released_at_expiry(engine):
    engine.penalize(2002, "penalty1", "admin", T0)
    expiry = engine.store.get(2002).tier_expiry
    first = {2002: Sample(2002, None, None, None, None, None)}
    (released,) = engine.cycle(first, expiry + 1)
    assert released.change.kind == "released" and engine.store.get(2002).tier is None
    engine.penalize(2002, "penalty1", "admin", T0)
    no_cpu = {2002: Sample(2002, None, None, None, 0.0, 10.0)}
    (released,) = engine.cycle(no_cpu, expiry + 1)
    assert released.change.kind == "released"


@pytest.fixture
def quarter_engine(tmp_path):
    """bob's group has MemoryMax 2G; penalty1 targets a quarter of it, 512 MiB."""
    main = (MAIN + DAEMON_SECTIONS).replace("memory_factor = 0.8", "memory_factor = 0.25")
    policy = load_policy(write_policy(tmp_path / "etc", main=main))
    store = StateStore.open(tmp_path / "state.db")
    yield Engine(policy, store, memory_total=16 * GiB, lookup=ACCOUNTS.__getitem__)
    store.close()


MiB = 1024**2
MARGIN = 2 * GiB // 10


def test_a_penalty_never_sets_memory_max_below_usage_and_steps_down_as_usage_falls(
    quarter_engine,
):
    engine = quarter_engine
    start, (action,) = run_until_action(engine, hog(2002, memory=1536 * MiB), T0)
    assert action.change.new_tier == "penalty1"
    assert props(action)["MemoryMax"] == 1536 * MiB + MARGIN  # not the 512 MiB target
    assert props(action)["MemoryHigh"] == 1800 * MiB // 4  # the pressure, without a kill
    now = T0 + start * 10
    # the hook's copy carries the limit in force, not the target
    assert engine.standing(2002, engine.store.get(2002)).memory_max == 1536 * MiB + MARGIN
    assert props(engine.limits(ACCOUNTS[2002], engine.store.get(2002)))["MemoryMax"] == (
        1536 * MiB + MARGIN
    )
    assert engine.memory_stepping() == {2002: (1536 * MiB + MARGIN, 512 * MiB)}
    # systemd's reading, when given, counts over the sample's
    (step,) = engine.cycle(hog(2002, cores=0.0, memory=100 * MiB), now + 10, {2002: GiB})
    assert step.change is None and props(step)["MemoryMax"] == GiB + MARGIN
    assert engine.cycle(hog(2002, cores=0.0, memory=GiB), now + 20, {2002: GiB}) == []
    (last,) = engine.cycle(hog(2002, cores=0.0, memory=200 * MiB), now + 30)
    assert props(last)["MemoryMax"] == 512 * MiB
    assert engine.memory_stepping() == {}
    assert engine.cycle(hog(2002, cores=0.0, memory=100 * MiB), now + 40) == []


def test_an_admin_penalty_keeps_memory_max_above_the_slice_usage(quarter_engine):
    action = quarter_engine.penalize(2002, "penalty1", "uid 0 (root)", T0, current=1536 * MiB)
    assert props(action)["MemoryMax"] == 1536 * MiB + MARGIN
    unknown = quarter_engine.penalize(2002, "penalty2", "uid 0 (root)", T0, current=None)
    assert props(unknown)["MemoryMax"] == 2 * GiB  # unread usage: the group's own limit
    released = quarter_engine.release(2002, "uid 0 (root)", T0 + 60)
    assert props(released)["MemoryMax"] == 2 * GiB and quarter_engine.memory_stepping() == {}
