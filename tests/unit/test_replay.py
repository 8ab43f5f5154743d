"""What-if replay: recorded usage judged again by the engine under a candidate policy.

A synthetic history gives the tiers and times the badness model says under two
policies; a daemon run (test_daemon_cycle's Node, the daemon's code real) that
records its usage and events is reproduced by replaying its own policy; admins'
actions stay apart; downsampled history is judged a bucket a step.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from fakeslices import DictAccounts
from policyfiles import DAEMON_SECTIONS, MAIN, write_policy
from test_daemon_cycle import ACCOUNTS, ADMINS, BOB, CAROL, Node, run_cycles
from test_usagehistory import TopSampler

from pam_cgpolicy import cli
from pam_cgpolicy import daemon as daemon_mod
from pam_cgpolicy.policy import load_policy
from pam_cgpolicy.replay import (
    CANDIDATE_ONLY,
    OTHER_TIER,
    RECORDED_ONLY,
    SAME,
    SOONER,
    Penalty,
    compare,
    per_hour,
    replay,
    to_json,
)
from pam_cgpolicy.state import StateStore
from pam_cgpolicy.usagehistory import UsageHistory, UsagePoint

GiB = 1024**3
T0 = 1_800_000_000.0
STRANGER = 7777  # in the history, unknown to NSS here
# students: CPUQuota 100%; cpu_threshold 0.8, time_to_max_bad 300: a full core for
# 0.8 * 300 s = 24 steps of 10 s; penalty1 lasts 1800 s, penalty2 3600 s.
STRICTER = DAEMON_SECTIONS.replace("time_to_max_bad = 300", "time_to_max_bad = 150").replace(
    "timeout = 1800", "timeout = 600"
)


def lookup(uid):
    return DictAccounts(dict(ACCOUNTS)).by_uid(uid)


def policy_in(tmp_path, name, sections):
    return load_policy(write_policy(tmp_path / name, MAIN + sections))


def synthetic(history, spans, start=T0):
    """Bob's usage from ``start``, a 10 s sample at a time: (seconds, cores) spans in turn;
    a stranger busy throughout. Returns the last sample's time."""
    t = start
    for seconds, cores in spans:
        for _ in range(int(seconds // 10)):
            t += 10
            points = [
                UsagePoint(BOB, t, cores, 100 << 20, span=10.0),
                UsagePoint(STRANGER, t, 8.0, GiB, span=10.0),
            ]
            history.record(t, points, retention=30 * 86400)
    return t


@pytest.fixture
def history(tmp_path):
    with UsageHistory.open(tmp_path / "usage.db") as history:
        yield history


def test_a_synthetic_history_replayed_under_two_policies_gives_the_models_tiers_and_times(
    tmp_path, history
):
    # busy 300 s, idle (a little usage: recorded) 3000 s, busy 300 s
    end = synthetic(history, [(300, 1.0), (3000, 0.01), (300, 1.0)])
    results = {
        name: replay(
            policy_in(tmp_path, name, sections),
            history,
            None,
            T0,
            end,
            16 * GiB,
            lookup=lookup,
        )
        for name, sections in (("in-force", DAEMON_SECTIONS), ("stricter", STRICTER))
    }
    got = {
        name: [(p.user, p.tier, p.start - T0, p.seconds, p.in_force) for p in result.candidate]
        for name, result in results.items()
    }
    assert got["in-force"] == [
        ("bob", "penalty1", 240, 1800, False),  # the 24th step; released at expiry
        # busy again from 3300 s: 24 steps more, a second offence, in force at the end
        ("bob", "penalty2", 3300 + 240, 3600, True),
    ]
    assert got["stricter"] == [
        ("bob", "penalty1", 120, 600, False),  # half the time to max: the 12th step
        ("bob", "penalty2", 3300 + 120, 3600, True),
    ]
    for result in results.values():
        assert result.users == 2 and result.unknown == (STRANGER,)
        assert result.samples == 2 * 360 and result.sampled_every == 10.0
        assert result.recorded == () and result.averages == ()
        assert {row.verdict for row in result.rows} == {CANDIDATE_ONLY}


def test_replaying_the_policy_in_force_reproduces_the_daemons_events(tmp_path, monkeypatch):
    node = Node(tmp_path, monkeypatch)
    monkeypatch.setattr(daemon_mod, "boot_clock", node.clock)
    monkeypatch.setattr(
        type(node.sampler), "top_processes", TopSampler.top_processes, raising=False
    )
    # tiers of 600 s and 1200 s: the whole run within the hour the history keeps whole
    shorter = DAEMON_SECTIONS.replace("timeout = 1800", "timeout = 600")
    write_policy(node.config, ADMINS + shorter.replace("timeout = 3600", "timeout = 1200"))
    with UsageHistory.open(tmp_path / "usage.db") as history:
        daemon = node.daemon()
        daemon.history = history
        start = node.clock()
        # bob: busy, a penalty, idle past its expiry, busy again: penalty2; carol busy
        # past her threshold for a while, then calm; both always with some usage
        # (a user without any is not recorded)
        for cores, cycles in ((1.0, 40), (0.02, 80), (1.0, 50), (0.02, 60)):
            node.sampler.cores = {BOB: cores, CAROL: 2.0 if cycles != 80 else 0.1}
            run_cycles(daemon, node, cycles)
        # an admin's penalty of carol and its release: theirs, not the model's
        asyncio.run(daemon.penalize("carol", "penalty2", "root"))
        run_cycles(daemon, node, 3)
        asyncio.run(daemon.release("carol", "root"))
        run_cycles(daemon, node, 3)
        policy = load_policy(node.config)
        result = replay(policy, history, node.store, start, node.clock(), 16 * GiB, lookup=lookup)
    assert result.averages == ()
    recorded = [e for e in node.store.history(None, None) if e.actor is None]
    penalized = [(e.user, e.new_tier) for e in reversed(recorded) if e.kind == "penalized"]
    assert penalized == [
        ("bob", "penalty1"),
        ("carol", "penalty1"),
        ("bob", "penalty2"),
        ("carol", "penalty2"),
    ]
    assert [(p.user, p.tier) for p in result.candidate] == penalized
    assert len(result.rows) == len(result.recorded) == len(penalized)
    for row in result.rows:
        assert row.verdict == SAME, row
        assert row.candidate is not None and row.recorded is not None
        assert row.candidate.start == row.recorded.start  # whole seconds here: exact
        if row.recorded.ended_by is None:
            assert row.candidate.seconds == row.recorded.seconds, row
            assert row.candidate.in_force == row.recorded.in_force, row
    # the admin's penalty ended carol's penalty2 early; the model's would have run on
    (ended,) = [row for row in result.rows if row.recorded and row.recorded.ended_by]
    assert ended.penalty.user == "carol" and ended.recorded.ended_by == "root"
    assert ended.candidate.seconds > ended.recorded.seconds and ended.candidate.in_force
    assert [(e.kind, e.user, e.actor) for e in result.admin] == [
        ("penalized", "carol", "root"),
        ("released", "carol", "root"),
    ]
    node.store.close()


def test_a_penalty_an_admin_ended_early_says_so_and_one_an_admin_set_is_not_compared(tmp_path):
    store = StateStore.in_memory()
    from pam_cgpolicy.badness import Change, UserScore

    score = UserScore(tier="penalty1", tier_expiry=T0 + 1800, occurrences=1)
    store.record(BOB, "bob", score, Change("penalized", None, "penalty1", 0, 1, "badness"), now=T0)
    released = UserScore(occurrences=1, zero_since=T0 + 60)
    store.record(
        BOB,
        "bob",
        released,
        Change("released", "penalty1", None, 1, 1, "by alice"),
        "alice",
        now=T0 + 60,
    )
    admin = UserScore(tier="penalty2", tier_expiry=T0 + 3700, occurrences=2)
    store.record(
        CAROL,
        "carol",
        admin,
        Change("penalized", None, "penalty2", 0, 2, "by alice"),
        "alice",
        now=T0 + 100,
    )
    with UsageHistory.open(tmp_path / "usage.db") as history:
        policy = policy_in(tmp_path, "p", DAEMON_SECTIONS)
        result = replay(policy, history, store, T0 - 10, T0 + 200, 16 * GiB, lookup=lookup)
    (bob,) = result.recorded  # carol's penalty was an admin's
    assert bob.ended_by == "alice" and bob.seconds == 60 and not bob.in_force
    assert [row.verdict for row in result.rows] == [RECORDED_ONLY]
    assert [(e.user, e.kind) for e in result.admin] == [("bob", "released"), ("carol", "penalized")]
    store.close()


def test_downsampled_history_is_judged_a_bucket_a_step_and_said_to_be_coarser(tmp_path, history):
    # two hours of bob at a full core; maintain() keeps the last hour as samples
    end = synthetic(history, [(7200, 1.0)])
    history.maintain(end, retention=30 * 86400)
    assert any(p.span == 60 for p in history.points(BOB, 0))
    policy = policy_in(tmp_path, "p", DAEMON_SECTIONS.replace("timeout = 1800", "timeout = 60"))
    result = replay(policy, history, None, T0, end, 16 * GiB, BOB, lookup)
    (stretch,) = result.averages
    assert stretch.bucket == 60 and stretch.first == T0 and stretch.last < end - 3600
    assert result.sampled_every == 10.0 and result.unknown == ()
    first = result.candidate[0]
    # 240 s of a full core: the 4th one-minute bucket, which starts at 180 s
    assert first.start == T0 + 180 and first.bucket == 60 and first.tier == "penalty1"
    raw = [p for p in result.candidate if p.start > end - 3600]
    assert raw and all(p.bucket == 0 for p in raw)


def test_compare_pairs_the_same_tier_then_another_then_two_at_once_then_none():
    def pen(uid, tier, start):
        return Penalty(uid, str(uid), tier, start, start + 60, False, False)

    mine = [pen(1, "p1", 100), pen(2, "p2", 100), pen(3, "p1", 100), pen(5, "p2", 300)]
    theirs = [
        *(pen(1, "p1", 109), pen(2, "p1", 95), pen(3, "p1", 200), pen(4, "p1", 5)),
        *(pen(5, "p1", 260), pen(5, "p1", 330)),  # both in force with 5's: the nearer
    ]
    rows = compare(mine, theirs, tolerance=11)
    got = [(r.penalty.uid, r.verdict) for r in rows]
    assert got == [
        (4, RECORDED_ONLY),
        (2, OTHER_TIER),  # a row's time is its sooner start
        (1, SAME),
        (3, CANDIDATE_ONLY),  # 100 to 160 and 200 to 260: never at once
        (3, RECORDED_ONLY),
        (5, RECORDED_ONLY),  # 260: 40 s from 300
        (5, SOONER),  # 330: the nearer
    ]
    assert rows[6].recorded.start == 330


def test_per_hour_counts_the_penalties_begun_in_each_hour():
    pens = [Penalty(1, "a", "p1", T0 + s, T0 + s + 60, False, False) for s in (0, 10, 3700, 7300)]
    assert per_hour(pens, T0, T0 + 7200) == [2, 1]  # the last one is past the end
    assert per_hour([], T0, T0 + 7201) == [0, 0, 0]


def test_the_json_holds_both_sides_the_rows_and_the_coarse_stretches(tmp_path, history):
    end = synthetic(history, [(400, 1.0)])
    policy = policy_in(tmp_path, "p", DAEMON_SECTIONS)
    result = replay(policy, history, None, T0, end, 16 * GiB, lookup=lookup)
    data = json.loads(json.dumps(to_json(result, cli._event_dict)))
    (row,) = data["comparison"]
    assert row["verdict"] == CANDIDATE_ONLY and row["recorded"] is None
    assert row["candidate"]["tier"] == "penalty1" and row["candidate"]["start"] == T0 + 240
    assert data["unknown_uids"] == [STRANGER] and data["candidate_has_tiers"] is True


def test_cli_replay_prints_both_sides_and_is_for_root(tmp_path, history, monkeypatch, capsys):
    synthetic(history, [(400, 1.0)], start=float(int(time.time()) - 1000))
    write_policy(tmp_path / "cand", MAIN + DAEMON_SECTIONS)
    monkeypatch.setattr(cli, "Accounts", lambda: DictAccounts(dict(ACCOUNTS)))
    monkeypatch.setattr(cli.os, "geteuid", lambda: 0)
    args = ["replay", "--policy", str(tmp_path / "cand"), "--history", str(history.path)]
    assert cli.main([*args, "--since", "1h"]) == 0
    out = capsys.readouterr().out
    assert "bob" in out and "penalty1 for 30m" in out and "candidate only" in out, out
    assert "not judged: 1 uids unknown here (7777)" in out
    assert "none recorded compared: the history is another node's" in out
    assert cli.main([*args, "--since", "1h", "--user", str(BOB), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["policy"] == str(tmp_path / "cand") and data["history"] == str(history.path)
    assert [p["user"] for p in data["candidate"]] == ["bob"] and data["unknown_uids"] == []
    missing = str(tmp_path / "none.db")
    assert cli.main(["replay", "--policy", str(tmp_path / "cand"), "--history", missing]) == 1
    assert "no usage history" in capsys.readouterr().err
    monkeypatch.setattr(cli.os, "geteuid", lambda: 1000)
    assert cli.main([*args, "--since", "1h"]) == 1
    assert "replay is for root: it reads every user's usage history" in capsys.readouterr().err


def test_accounts_are_asked_once_each_known_or_not(tmp_path, history):
    end = synthetic(history, [(100, 1.0)])
    asked = []

    def counting(uid):
        asked.append(uid)
        return lookup(uid)

    policy = policy_in(tmp_path, "p", DAEMON_SECTIONS)
    replay(policy, history, None, T0, end, 16 * GiB, lookup=counting)
    assert sorted(asked) == [BOB, STRANGER]


def test_the_plot_draws_both_policies_per_hour_and_the_coarse_stretch(tmp_path, history):
    from test_report import decoded

    from pam_cgpolicy.plot import replay_png

    end = synthetic(history, [(7200, 1.0)])
    history.maintain(end, retention=30 * 86400)
    policy = policy_in(tmp_path, "p", DAEMON_SECTIONS)
    result = replay(policy, history, None, T0, end, 16 * GiB, lookup=lookup)
    assert result.averages and result.candidate
    assert decoded(replay_png(result, "candidate")).shape[:2] == (450, 1100)
    empty = replay(policy, history, None, end + 10, end + 20, 16 * GiB, lookup=lookup)
    assert empty.samples == 0 and empty.rows == ()
    assert decoded(replay_png(empty, "candidate")).shape[:2] == (450, 1100)
