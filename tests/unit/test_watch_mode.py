"""Watch mode: cgpolicyd judges and records the tiers it would set, and sets no limit.

Built from the same parts as test_daemon_cycle (its Node): the daemon's code is real.
"""

from __future__ import annotations

import asyncio

import pytest
from policyfiles import DAEMON_SECTIONS, GROUPS, MAIN, write_policy
from test_daemon_cycle import ADMINS, BOB, CAROL, Node, run_cycles

from pam_cgpolicy import daemon as daemon_mod
from pam_cgpolicy.compiled import read_penalty
from pam_cgpolicy.errors import NotManaged, PolicyError
from pam_cgpolicy.policy import load_policy
from pam_cgpolicy.slicelimits import Standing

WATCH_ALL = DAEMON_SECTIONS.replace("[penalty]\n", '[penalty]\nmode = "watch"\n')


@pytest.fixture
def node(tmp_path, monkeypatch):
    node = Node(tmp_path, monkeypatch)
    # the boot clock follows the test's wall clock: its cycles are no clock steps
    monkeypatch.setattr(daemon_mod, "boot_clock", node.clock)
    yield node
    node.store.close()


def watch(node: Node, main: str = ADMINS + WATCH_ALL, groups: dict[str, str] | None = None):
    write_policy(node.config, main, groups)


def hog_until_tier(daemon, node: Node, uid: int) -> None:
    node.sampler.cores = {uid: 4.0}
    for _ in range(100):
        run_cycles(daemon, node, 1)
        if node.store.get(uid) and node.store.get(uid).tier:
            return
    raise AssertionError("never reached a tier")


def test_a_watched_hog_is_recorded_and_told_but_no_limit_changes(node):
    watch(node)
    daemon = node.daemon()
    hog_until_tier(daemon, node, BOB)
    (event,) = node.store.history(BOB)
    assert event.kind == "penalized" and event.new_tier == "penalty1" and event.watched
    assert {props for uid, props in node.writer.sent if uid == BOB} == {
        node.group_props(daemon, BOB)
    }  # only the group's own limits, sent once when the slice appeared
    assert read_penalty(str(node.penalties), BOB, node.clock()) is None  # the hook's copy
    # and a standing in a copy would not lower a watched group's limits either
    assert node.hook_sends(daemon, BOB, Standing("penalty1")) == node.group_props(daemon, BOB)
    assert daemon.service.tiers == []  # the bus signal means limits changed
    (line,) = [line for line in node.infos if "event=penalized" in line]
    assert "watched=yes" in line and "limits=unchanged" in line
    # the end of the watched tier is watched too, and changes nothing either
    node.sampler.cores = {BOB: 0.0}
    sent = len(node.writer.sent)
    run_cycles(daemon, node, 181)  # the tier's 1800 s
    released, _ = node.store.history(BOB)
    assert released.kind == "released" and released.watched
    assert len(node.writer.sent) == sent


def test_the_engine_marks_the_action_the_notifier_reads(node):
    watch(node)
    daemon = node.daemon()
    node.sampler.cores = {BOB: 4.0}
    actions = []
    for _ in range(100):
        node.clock.now += 10
        samples = node.sampler.sample([BOB], {}, node.clock())
        actions = daemon.engine.cycle(samples, node.clock())
        if actions:
            break
    (action,) = actions
    assert action.watched and action.change is not None and action.change.watched


def test_a_group_overrides_the_mode_both_ways(node):
    groups = dict(GROUPS)
    # students enforce under a watching [penalty]; normal (carol) watches under enforce
    groups["students"] = 'penalty_mode = "enforce"\n' + GROUPS["students"]
    watch(node, groups=groups)
    daemon = node.daemon()
    hog_until_tier(daemon, node, BOB)
    assert ("CPUQuotaPerSecUSec", "t", 800_000) in node.writer.last(BOB)
    assert not node.store.history(BOB)[0].watched
    assert read_penalty(str(node.penalties), BOB, node.clock()) is not None

    groups = dict(GROUPS, normal='penalty_mode = "watch"\n' + GROUPS["normal"])
    write_policy(node.config, ADMINS + DAEMON_SECTIONS, groups)
    daemon = node.daemon()
    hog_until_tier(daemon, node, CAROL)
    assert node.store.history(CAROL)[0].watched
    assert node.writer.last(CAROL) == node.group_props(daemon, CAROL)


def test_an_admin_cannot_penalize_a_watched_user_and_nothing_is_recorded(node):
    watch(node)
    daemon = node.daemon()
    with pytest.raises(NotManaged, match="watch mode"):
        asyncio.run(daemon.penalize("bob", "penalty1", "root"))
    assert node.store.history(BOB) == []


def test_a_watched_tier_recorded_before_is_not_reapplied_at_start(node):
    daemon = node.daemon()
    hog_until_tier(daemon, node, BOB)  # enforced
    assert read_penalty(str(node.penalties), BOB, node.clock()) is not None
    watch(node)
    sent = len(node.writer.sent)
    daemon = node.daemon()  # start-up reconciles the tiers in force
    assert node.writer.sent[sent:] == []
    assert read_penalty(str(node.penalties), BOB, node.clock()) is None


@pytest.mark.parametrize(
    ("edit", "where", "message"),
    [
        ('[penalty]\nmode = "dry-run"\n', "penalty.mode", "must be one of 'enforce', 'watch'"),
        ("[penalty]\nmode = 1\n", "penalty.mode", "must be a string"),
    ],
)
def test_a_bad_mode_is_a_located_error(tmp_path, edit, where, message):
    main = MAIN + DAEMON_SECTIONS.replace("[penalty]\n", edit)
    with pytest.raises(PolicyError) as caught:
        load_policy(write_policy(tmp_path, main))
    (problem,) = caught.value.problems
    assert problem.key == where and message in problem.message and problem.line


def test_a_bad_group_mode_is_a_located_error(tmp_path):
    groups = dict(GROUPS, normal='penalty_mode = "off"\n' + GROUPS["normal"])
    with pytest.raises(PolicyError) as caught:
        load_policy(write_policy(tmp_path, MAIN + DAEMON_SECTIONS, groups))
    (problem,) = caught.value.problems
    assert problem.key == "penalty_mode" and problem.file.endswith("normal.toml")
    assert problem.line == 1


def test_the_mode_is_decided_once_and_carried_by_the_compiled_policy(tmp_path):
    groups = dict(GROUPS, normal='penalty_mode = "enforce"\n' + GROUPS["normal"])
    policy = load_policy(write_policy(tmp_path, MAIN + WATCH_ALL, groups))
    compiled = policy.compile()
    assert {name: g["watch"] for name, g in compiled["groups"].items()} == {
        "admins": True,
        "students": True,
        "normal": False,
    }
    no_penalty = load_policy(write_policy(tmp_path / "plain", MAIN))
    assert not any(g["watch"] for g in no_penalty.compile()["groups"].values())
