"""The usage history: what a cycle records, downsampling, retention, and its file's safety."""

from __future__ import annotations

import asyncio
import os
import stat

import pytest
from test_daemon_cycle import BOB, CAROL, Node, run_cycles
from test_watch_mode import hog_until_tier

from pam_cgpolicy import daemon as daemon_mod
from pam_cgpolicy.errors import StateError
from pam_cgpolicy.usage import Process
from pam_cgpolicy.usagehistory import MAINTAIN_EVERY, UsageHistory, UsagePoint

T0 = 1_800_000_000.0
GiB = 1024**3


@pytest.fixture
def history(tmp_path):
    with UsageHistory.open(tmp_path / "usage.db") as history:
        yield history


def point(uid, t, cores=1.5, memory=GiB, cpu=12.3456, tier=None):
    return UsagePoint(uid, t, cores, memory, cpu, 0.0, tier, 10.0)


def test_a_point_reads_back_as_recorded(history):
    history.record(T0, [point(2002, T0, tier="penalty1"), point(5000, T0, cores=None)])
    (bob,) = history.points(2002, T0 - 60)
    assert bob == UsagePoint(2002, T0, 1.5, GiB, 12.35, 0.0, "penalty1", 10.0)
    (carol,) = history.points(5000, T0 - 60)
    assert carol.cores is None and carol.memory == GiB


def test_the_file_is_root_s_alone_and_a_link_is_refused(tmp_path):
    UsageHistory.open(tmp_path / "usage.db").close()
    assert stat.S_IMODE(os.stat(tmp_path / "usage.db").st_mode) == 0o600
    os.symlink(tmp_path / "usage.db", tmp_path / "link.db")
    with pytest.raises(StateError, match="cannot open"):
        UsageHistory.open(tmp_path / "link.db")
    (tmp_path / "open.db").touch(mode=0o666)
    os.chmod(tmp_path / "open.db", 0o666)
    with pytest.raises(StateError, match="writable"):
        UsageHistory.open(tmp_path / "open.db")


def test_older_samples_are_averaged_into_minutes_then_ten_minutes_and_then_dropped(history):
    # two days of one user at 10 s, alternating 1 and 3 cores: every average is 2
    week = 7 * 86400
    for step in range(0, 2 * 86400, 10):
        t = T0 + step
        cores = 1.0 if step % 20 else 3.0
        history.record(t, [point(2002, t, cores=cores, cpu=step % 100)], retention=week)
    now = T0 + 2 * 86400 - 10
    rows = history.points(2002, 0)
    spans = [p.span for p in rows]
    # newest hour at 10 s; the day before it in minutes; the rest in ten minutes
    assert spans.count(10) <= 3600 // 10 + MAINTAIN_EVERY // 10 + 1
    assert 23 * 60 <= spans.count(60) <= 24 * 60
    assert spans.count(600) >= (86400 - 3600) // 600
    assert [p.cores for p in rows if p.span > 10] == pytest.approx(
        [2.0] * (len(rows) - spans.count(10))
    )
    assert all(p.cpu_badness == 90 for p in rows if p.span == 600)  # the worst of the bucket
    assert rows == sorted(rows, key=lambda p: p.time) and rows[-1].time == now
    # a shorter retention drops what is older
    history.maintain(now, retention=86400)
    assert min(p.time for p in history.points(2002, 0)) >= now - 86400


def test_top_processes_are_kept_with_a_violation(history):
    procs = [Process(42, "hog", "/usr/bin/python3", 3.9, GiB), Process(7, "bash", None, 0.0, 4096)]
    history.record(T0, [point(2002, T0)], {2002: procs})
    assert history.processes(2002, T0 - 1) == [(T0, procs[0]), (T0, procs[1])]
    assert history.processes(5000, T0 - 1) == []


class TopSampler:
    def top_processes(self, uid, count):
        return [Process(uid, "hog", "/usr/bin/hog", 4.0, GiB)][:count]


@pytest.fixture
def node(tmp_path, monkeypatch):
    node = Node(tmp_path, monkeypatch)
    monkeypatch.setattr(daemon_mod, "boot_clock", node.clock)
    monkeypatch.setattr(
        type(node.sampler), "top_processes", TopSampler.top_processes, raising=False
    )
    yield node
    node.store.close()


def test_each_cycle_records_the_users_with_usage_and_a_violation_its_processes(node, tmp_path):
    with UsageHistory.open(tmp_path / "usage.db") as history:
        daemon = node.daemon()
        daemon.history = history
        node.sampler.cores = {CAROL: 0.0}
        hog_until_tier(daemon, node, BOB)
        points = history.points(BOB, 0)
        assert points and all(p.cores == 4.0 for p in points)
        assert points[-1].tier == "penalty1" and points[-2].cpu_badness > 90
        assert history.points(CAROL, 0) == []  # no usage, no row
        ((_, process),) = history.processes(BOB, 0)
        assert process.name == "hog" and process.pid == BOB


def test_a_failing_history_is_logged_once_and_the_cycle_goes_on(node, tmp_path):
    history = UsageHistory.open(tmp_path / "usage.db")
    history.close()  # every use now fails
    daemon = node.daemon()
    daemon.history = history
    hog_until_tier(daemon, node, BOB)  # penalties still work
    assert node.store.get(BOB).tier == "penalty1"
    failures = [line for line in node.errors if "event=history-failed" in line]
    assert len(failures) == 1
    run_cycles(daemon, node, 3)
    assert len([line for line in node.errors if "event=history-failed" in line]) == 1
    asyncio.run(daemon.cycle())
