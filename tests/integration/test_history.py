"""Watch mode and the usage history on a real node: a hog is judged, recorded and reported,
and keeps the group's limits.

vera (uid 5050, group normal: CPUQuota 100%) runs two busy loops under
test_daemon.py's policy with [penalty] mode = "watch". cgpolicyd must record
a penalty1 event marked watched while her slice keeps the group's CPUQuota;
``cgpolicyctl report`` then shows her samples and the watched span, and
``--plot`` writes a PNG; ``cgpolicyctl replay`` of the policy in force
reproduces her recorded penalty from her recorded usage, and a stricter
candidate shows the difference. One set-up for all checks: one hog, one wait.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_daemon import (
    HOG,
    POLICY,
    diagnostics,
    keep_logged_in_unjudged,
    logged,
    login,
    poll,
    root,
    slice_prop,
    write_policy,
)

# v2 only: nothing here differs on cgroup v1 (see conftest.py)
pytestmark = [pytest.mark.vm, pytest.mark.v2_only]

REPO = Path(__file__).resolve().parents[2]
USER, UID = "vera", 5050
GROUPS_CPU = "1s"  # normal's CPUQuota 100%, as systemctl shows CPUQuotaPerSecUSec
PNG = "/tmp/cgpolicy-vera.png"
INTERVAL = 2.0  # test_daemon.py's POLICY: general.interval
STRICTER = "/tmp/cgpolicy-stricter"  # a candidate policy: penalty1 lasts 600 s, not 40

WATCH_POLICY = {
    **POLICY,
    "cgpolicy.toml": POLICY["cgpolicy.toml"].replace(
        "[penalty]\n", '[penalty]\n        mode = "watch"\n'
    ),
}


def history(vm) -> list[dict[str, Any]]:
    return json.loads(root(vm, f"cgpolicyctl history {USER} --json").stdout)


@pytest.fixture(scope="module")
def hogged(vm) -> Iterator[Any]:
    from vmharness.install import install_cgpolicy

    install_cgpolicy(vm, REPO)
    vm.add_user(USER, UID)
    root(vm, "rm -f /etc/cgpolicy/groups.d/*.toml")
    write_policy(vm, WATCH_POLICY)
    root(vm, "cgpolicyctl check")
    keep_logged_in_unjudged(vm, [USER])  # (re)starts cgpolicyd on this policy
    try:
        login(vm, USER, HOG)
        poll(
            f"a watched penalty of {USER} in cgpolicyctl history",
            lambda: history(vm),
            lambda events: any(e["kind"] == "penalized" and e["watched"] for e in events),
            90,
            lambda: diagnostics(vm, USER),
            every=2.0,
        )
        yield vm
    finally:
        if vm.running:  # nobody busy or in a tier, cgpolicyd running, for the next module
            root(vm, f"pkill -KILL -u {USER}; rm -rf {PNG} {STRICTER}", check=False)
            root(vm, f"cgpolicyctl release {USER}", check=False)
            root(vm, "systemctl start cgpolicyd", check=False)


def test_a_watched_penalty_is_recorded_and_logged_and_the_limits_stay(hogged):
    vm = hogged
    (line, *_) = logged(vm, USER, "penalized")
    assert "watched=yes" in line and "limits=unchanged" in line, line
    for _ in range(3):  # and over the next cycles too
        assert slice_prop(vm, UID, "CPUQuotaPerSecUSec") == GROUPS_CPU, diagnostics(vm, USER)
        root(vm, "sleep 2")
    text = root(vm, f"cgpolicyctl history {USER}").stdout
    assert "-> penalty1 (watched)" in text, text


def test_report_shows_the_samples_and_plots_them(hogged):
    vm = hogged
    done = root(vm, f"cgpolicyctl report {USER} --since 10m --json", check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["group"] == "normal" and report["cpu_quota"] == 1.0, report
    busy = [s for s in report["samples"] if (s["cores"] or 0) > 0.5]
    assert len(busy) >= 2, report["samples"]
    assert any(p["tier"] == "penalty1" and p["watched"] for p in report["penalties"]), report
    assert report["processes"], "no top processes recorded at the violation"
    assert {p["name"] for p in report["processes"]} & {"sh"}, report["processes"]
    done = root(vm, f"cgpolicyctl report {USER} --plot {PNG}", check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    magic = root(vm, f"head -c 8 {PNG} | od -An -tx1").stdout.split()
    assert magic == ["89", "50", "4e", "47", "0d", "0a", "1a", "0a"], magic
    assert int(root(vm, f"stat -c %s {PNG}").stdout) > 10_000


def replayed(vm, policy: str) -> dict[str, Any]:
    done = root(vm, f"cgpolicyctl replay --policy {policy} --user {USER} --json", check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def test_replay_of_the_policy_in_force_reproduces_the_watched_penalty(hogged):
    vm = hogged
    first = min(
        (e for e in history(vm) if e["kind"] == "penalized" and e["watched"]),
        key=lambda e: e["timestamp"],
    )
    result = replayed(vm, "/etc/cgpolicy")
    assert result["samples"] >= 3 and result["sampled_every"], result
    candidate = result["candidate"][0]
    assert (candidate["user"], candidate["tier"], candidate["watched"]) == (USER, "penalty1", True)
    # the history keeps whole seconds: one interval, and the second cut off
    assert abs(candidate["start"] - first["timestamp"]) <= INTERVAL + 1, (candidate, first)
    row = result["comparison"][0]
    assert row["verdict"] == "same" and row["recorded"]["start"] == first["timestamp"], row
    # and her later penalties too, but one that began in the last cycles before the end:
    # the files are read one after the other while cgpolicyd goes on
    settled = [
        r
        for r in result["comparison"]
        if min(p["start"] for p in (r["candidate"], r["recorded"]) if p)
        < result["until"] - 3 * INTERVAL
    ]
    for r in settled:
        assert r["candidate"] and r["recorded"], result["comparison"]
        assert r["candidate"]["tier"] == r["recorded"]["tier"], result["comparison"]
    assert result["admin_actions"] == []

    # a stricter candidate: penalty1 for 600 s instead of 40
    root(vm, f"rm -rf {STRICTER} && cp -r /etc/cgpolicy {STRICTER}")
    root(vm, f"sed -i 's/^timeout = 40$/timeout = 600/' {STRICTER}/cgpolicy.toml")
    stricter = replayed(vm, STRICTER)
    longer = stricter["comparison"][0]
    assert longer["verdict"] == "same", longer  # the same start and tier...
    assert longer["candidate"]["seconds"] == 600 and longer["candidate"]["in_force"], longer
    assert longer["recorded"]["seconds"] <= 40 + 2 * INTERVAL, longer  # ...and far longer
