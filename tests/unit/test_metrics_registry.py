"""cgpolicyd's Prometheus series: what the registry holds, and how the file is written.

The exposition is parsed back with the client library's own parser, so these
tests read what a scraper reads.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from policyfiles import DAEMON_SECTIONS, MAIN, write_policy
from prometheus_client.parser import text_string_to_metric_families

from pam_cgpolicy import __version__, metrics
from pam_cgpolicy.accounts import Account
from pam_cgpolicy.badness import UserScore
from pam_cgpolicy.errors import UnknownUser
from pam_cgpolicy.policy import load_policy
from pam_cgpolicy.usage import Sample

BOB, CAROL, GONE, DAVE = 2002, 5000, 5001, 5002
ACCOUNTS = {
    BOB: Account("bob", BOB, frozenset({BOB})),
    CAROL: Account("carol", CAROL, frozenset({CAROL})),
    DAVE: Account("dave", DAVE, frozenset({DAVE})),
}
TIERS = ("penalty1", "penalty2")
T0 = 1_800_000_000.0


def account(uid: int) -> Account:
    if uid not in ACCOUNTS:
        raise UnknownUser(f"no such uid: {uid}")
    return ACCOUNTS[uid]


def series(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """(sample name, labels) -> value of every sample in an exposition."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def who(uid: int, user: str, group: str, **extra: str) -> frozenset[tuple[str, str]]:
    return frozenset({"uid": str(uid), "user": user, "group": group, **extra}.items())


@pytest.fixture
def compiled(tmp_path: Path) -> dict:
    return load_policy(write_policy(tmp_path, MAIN + DAEMON_SECTIONS)).compile()


def exposition(compiled: dict, cycle_seconds: float | None = 0.25) -> str:
    samples = {
        BOB: Sample(BOB, 1.5, 12_500_000, 3 * 2**30, 0.0, 10.0, frozen=True),
        CAROL: Sample(CAROL, None, None, None, None, None),  # a first sample, unread
        GONE: Sample(GONE, 0.1, 1_000_000, 4096, 0.0, 10.0),  # an account NSS lost
    }
    standings = {
        BOB: UserScore(tier="penalty2", tier_expiry=T0 + 3600, occurrences=2),
        CAROL: UserScore(cpu_badness=40.5, memory_badness=2.0),
        DAVE: UserScore(tier="penalty1", tier_expiry=T0 + 60, occurrences=1),  # logged out
        4000: UserScore(cpu_badness=3.0),  # neither sampled nor in a tier: not shown
    }
    users = metrics.user_series(samples, standings, account, compiled, TIERS)
    node = metrics.NodeSeries(TIERS, cycle_seconds, reloads=3, reload_errors=1, cycle_failures=2)
    return metrics.build(users, node).decode()


def test_each_user_has_usage_badness_tier_and_freezer_labelled_uid_user_group(compiled) -> None:
    found = series(exposition(compiled))
    bob = who(BOB, "bob", "students")
    assert found["cgpolicy_user_cpu_seconds_total", bob] == 12.5
    assert found["cgpolicy_user_memory_bytes", bob] == 3 * 2**30
    assert found["cgpolicy_user_cpu_badness", bob] == 0.0
    assert found["cgpolicy_user_tier", who(BOB, "bob", "students", tier="penalty2")] == 2
    assert found["cgpolicy_user_tier_expiry_timestamp_seconds", bob] == T0 + 3600
    assert found["cgpolicy_user_frozen", bob] == 1
    carol = who(CAROL, "carol", "normal")
    assert found["cgpolicy_user_cpu_badness", carol] == 40.5
    assert found["cgpolicy_user_memory_badness", carol] == 2.0
    assert found["cgpolicy_user_tier", who(CAROL, "carol", "normal", tier="")] == 0
    assert found["cgpolicy_user_frozen", carol] == 0
    # No reading, no series: a first sample's unread CPU and memory are not zeros.
    assert ("cgpolicy_user_cpu_seconds_total", carol) not in found
    assert ("cgpolicy_user_memory_bytes", carol) not in found
    assert ("cgpolicy_user_tier_expiry_timestamp_seconds", carol) not in found


def test_a_user_in_a_tier_is_shown_logged_out_and_a_lost_account_without_a_name(
    compiled,
) -> None:
    found = series(exposition(compiled))
    dave = who(DAVE, "dave", "normal")
    assert found["cgpolicy_user_tier", who(DAVE, "dave", "normal", tier="penalty1")] == 1
    assert found["cgpolicy_user_tier_expiry_timestamp_seconds", dave] == T0 + 60
    assert ("cgpolicy_user_cpu_seconds_total", dave) not in found
    assert found["cgpolicy_user_cpu_seconds_total", who(GONE, "", "")] == 1.0
    assert not any(dict(labels).get("uid") == "4000" for _, labels in found)


def test_the_node_has_penalties_by_tier_cycle_reloads_errors_and_build(compiled) -> None:
    found = series(exposition(compiled))
    assert found["cgpolicy_penalties", frozenset({("tier", "penalty1")})] == 1
    assert found["cgpolicy_penalties", frozenset({("tier", "penalty2")})] == 1
    assert found["cgpolicy_cycle_duration_seconds", frozenset()] == 0.25
    assert found["cgpolicy_cycle_failures_total", frozenset()] == 2
    assert found["cgpolicy_policy_reloads_total", frozenset()] == 3
    assert found["cgpolicy_policy_reload_errors_total", frozenset()] == 1
    assert found["cgpolicy_build_info", frozenset({("version", __version__)})] == 1


def test_an_empty_tier_is_zero_and_a_tier_no_longer_listed_still_counts(compiled) -> None:
    standings = {BOB: UserScore(tier="old", tier_expiry=T0, occurrences=1)}
    users = metrics.user_series({}, standings, account, compiled, TIERS)
    assert users[0].tier_level == len(TIERS) + 1  # still a penalty in force
    found = series(metrics.build(users, metrics.NodeSeries(TIERS, None, 0, 0, 0)).decode())
    for tier, count in (("penalty1", 0), ("penalty2", 0), ("old", 1)):
        assert found["cgpolicy_penalties", frozenset({("tier", tier)})] == count
    assert ("cgpolicy_cycle_duration_seconds", frozenset()) not in found


def test_label_values_are_escaped_by_the_library(compiled) -> None:
    ACCOUNTS[CAROL] = Account('ca"rol\\\n', CAROL, frozenset({CAROL}))
    try:
        text = exposition(compiled)
    finally:
        ACCOUNTS[CAROL] = Account("carol", CAROL, frozenset({CAROL}))
    assert 'user="ca\\"rol\\\\\\n"' in text
    assert series(text)["cgpolicy_user_frozen", who(CAROL, 'ca"rol\\\n', "normal")] == 0


# The file


class Log:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.errors: list[str] = []
        self.infos: list[str] = []
        monkeypatch.setattr(metrics.log, "error", lambda _k, text, **_: self.errors.append(text))
        monkeypatch.setattr(metrics.log, "info", lambda _k, text, **_: self.infos.append(text))


def test_the_file_is_replaced_whole_and_readable_by_all(tmp_path: Path, monkeypatch) -> None:
    Log(monkeypatch)
    directory = tmp_path / "textfile"
    directory.mkdir(mode=0o755)
    old = os.umask(0o077)  # the file's mode does not depend on the umask
    try:
        writer = metrics.TextfileWriter()
        assert writer.write(str(directory), b"first 1\n")
        assert writer.write(str(directory), b"second 2\n")
    finally:
        os.umask(old)
    path = directory / metrics.TEXTFILE
    assert path.read_bytes() == b"second 2\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(directory) == [metrics.TEXTFILE]  # no temporary file left


def test_no_directory_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    log = Log(monkeypatch)
    assert not metrics.TextfileWriter().write("", b"x 1\n")
    assert log.errors == []


def test_a_failure_is_logged_once_a_kind_and_the_recovery_once(
    tmp_path: Path, monkeypatch
) -> None:
    log = Log(monkeypatch)
    directory = tmp_path / "textfile"
    writer = metrics.TextfileWriter()
    for _ in range(3):
        assert not writer.write(str(directory), b"x 1\n")
    assert len(log.errors) == 1 and "is the node exporter installed?" in log.errors[0]
    directory.mkdir(mode=0o777)  # a directory others may write: refused, another kind
    directory.chmod(0o777)
    assert not writer.write(str(directory), b"x 1\n")
    assert not writer.write(str(directory), b"x 1\n")
    assert len(log.errors) == 2 and "writable" in log.errors[1]
    directory.chmod(0o755)
    assert writer.write(str(directory), b"x 1\n")
    assert writer.write(str(directory), b"x 1\n")
    assert len(log.infos) == 1 and "event=metrics-written" in log.infos[0]


def test_a_symbolic_link_is_never_written_through(tmp_path: Path, monkeypatch) -> None:
    log = Log(monkeypatch)
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o755)
    (tmp_path / "textfile").symlink_to(target)
    assert not metrics.TextfileWriter().write(str(tmp_path / "textfile"), b"x 1\n")
    assert os.listdir(target) == [] and "symbolic link" in log.errors[0]
    (target / metrics.TEXTFILE).symlink_to(tmp_path / "victim")
    assert metrics.TextfileWriter().write(str(target), b"x 1\n")
    assert not (tmp_path / "victim").exists()  # the link was replaced, not followed
    assert (target / metrics.TEXTFILE).read_bytes() == b"x 1\n"


def test_a_file_left_behind_by_a_moved_or_dropped_directory_is_removed(
    tmp_path: Path, monkeypatch
) -> None:
    Log(monkeypatch)
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir(mode=0o755)
    new.mkdir(mode=0o755)
    writer = metrics.TextfileWriter()
    assert writer.write(str(old), b"x 1\n")
    assert writer.write(str(new), b"x 2\n")
    assert os.listdir(old) == [] and (new / metrics.TEXTFILE).read_bytes() == b"x 2\n"
    assert not writer.write("", b"x 3\n")
    assert os.listdir(new) == []
