"""cgpolicyctl report: a user's usage with the group's quota, thresholds and penalties;
its JSON, and its picture decoded back from the PNG."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from policyfiles import DAEMON_SECTIONS, MAIN, write_policy

from pam_cgpolicy import cli
from pam_cgpolicy.accounts import lookup_account
from pam_cgpolicy.badness import Change, UserScore
from pam_cgpolicy.plot import usage_png
from pam_cgpolicy.policy import load_policy
from pam_cgpolicy.report import PenaltySpan, UsageReport, build_report
from pam_cgpolicy.state import StateStore
from pam_cgpolicy.usage import Process
from pam_cgpolicy.usagehistory import UsageHistory, UsagePoint

GiB = 1024**3
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def node(tmp_path, monkeypatch):
    """nobody (normal: CPUQuota 200%, MemoryMax 4G) hogged from now-1200 to now, and
    was in a watched penalty1 from now-600 on."""
    config = write_policy(tmp_path / "etc", MAIN + DAEMON_SECTIONS)
    state = tmp_path / "state"
    state.mkdir()
    monkeypatch.setenv("CGPOLICY_CONFIG_DIR", str(config))
    monkeypatch.setenv("CGPOLICY_STATE_DIR", str(state))
    now = cli.time.time()
    uid = lookup_account("nobody").uid
    with UsageHistory.open(state / "usage.db") as history:
        for step in range(120):
            t = now - 1200 + step * 10
            tier = "penalty1" if t >= now - 600 else None
            history.record(t, [UsagePoint(uid, t, 1.9, 3 * GiB, 50.0, 10.0, tier, 10.0)])
        hog = Process(4242, "hog", "/usr/bin/python3", 1.8, 2 * GiB)
        history.record(now - 600, [], {uid: [hog]})
    with StateStore.open(state / "state.db") as store:
        store.record(
            uid,
            "nobody",
            UserScore(tier="penalty1", tier_expiry=now + 1200, occurrences=1),
            Change("penalized", None, "penalty1", 0, 1, "badness 100.5 >= 100", watched=True),
            now=now - 600,
        )
    return {"config": config, "state": state, "now": now, "uid": uid}


def test_report_json_has_the_samples_quota_thresholds_penalty_and_processes(node, capsys):
    assert cli.main(["report", "nobody", "--since", "30m", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["user"] == "nobody" and report["group"] == "normal"
    assert report["cpu_quota"] == 2.0 and report["cpu_threshold"] == pytest.approx(1.6)
    assert report["memory_max"] == 4 * GiB and report["memory_threshold"] == 2 * GiB
    assert len(report["samples"]) == 120
    assert report["samples"][0] == {
        "time": int(node["now"] - 1200),
        "span": 10.0,
        "cores": 1.9,
        "memory": 3 * GiB,
        "cpu_badness": 50.0,
        "memory_badness": 10.0,
        "tier": None,
    }
    ((penalty),) = report["penalties"]
    assert penalty["tier"] == "penalty1" and penalty["watched"]
    assert penalty["start"] == pytest.approx(node["now"] - 600)
    assert penalty["end"] <= node["now"] + 1  # the report ends now
    ((process),) = report["processes"]
    assert process["name"] == "hog" and process["executable"] == "/usr/bin/python3"


def test_since_limits_the_span(node, capsys):
    assert cli.main(["report", "nobody", "--since", "5m", "--json"]) == 0
    assert 29 <= len(json.loads(capsys.readouterr().out)["samples"]) <= 31


def test_report_as_text_and_a_plot_file(node, capsys, tmp_path):
    png = tmp_path / "nobody.png"
    assert cli.main(["report", "nobody", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "group normal" in out and "120 samples" in out
    assert "penalty1 (watched: no limit changed)" in out and "pid 4242 hog" in out
    assert decoded(png.read_bytes()).shape[2] in (3, 4)


@pytest.mark.parametrize("since", ["0", "-1h", "2x", "h"])
def test_since_must_be_a_duration(node, since, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["report", "nobody", f"--since={since}"])
    assert done.value.code == 2 and "not a duration" in capsys.readouterr().err


def test_no_history_yet_is_an_empty_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CGPOLICY_CONFIG_DIR", str(write_policy(tmp_path / "etc")))
    monkeypatch.setenv("CGPOLICY_STATE_DIR", str(tmp_path / "none"))
    assert cli.main(["report", "nobody"]) == 0
    assert "no usage recorded" in capsys.readouterr().out


def decoded(png: bytes):
    """The image as matplotlib reads a PNG back: rows, columns, channels."""
    from matplotlib import image

    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    return image.imread(io.BytesIO(png), format="png")


def test_usage_png_decodes_with_and_without_data(node):
    policy = load_policy(node["config"])
    account = lookup_account("nobody")
    with UsageHistory.open(node["state"] / "usage.db") as history:
        report = build_report(
            account, policy, 16 * GiB, history, None, node["now"] - 3600, node["now"]
        )
    assert len(report.samples) == 120
    spans = (PenaltySpan(node["now"] - 600, node["now"], "penalty1", watched=False),)
    rows, columns, _ = decoded(usage_png(UsageReport(**{**vars(report), "penalties": spans}))).shape
    assert (rows, columns) == (550, 900)
    empty = UsageReport("nobody", account.uid, None, 0.0, 3600.0, ())
    assert decoded(usage_png(empty)).shape[:2] == (550, 900)


def test_the_cli_and_the_daemon_never_import_matplotlib():
    code = (
        "import sys, pam_cgpolicy.cli, pam_cgpolicy.daemon, pam_cgpolicy.report; "
        "sys.exit('matplotlib' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False).returncode == 0
