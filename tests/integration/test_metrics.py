"""cgpolicyd's series reach the site's dashboards through Debian's node exporter.

mina (uid 5301, in the fallback group "normal") stays logged in; root penalizes
and freezes her through cgpolicyd. prometheus-node-exporter (installed in the
image, disabled at boot) is started with Debian's default arguments, whose
textfile collector reads /var/lib/prometheus/node-exporter, the default
[metrics] textfile_dir. The series are read over HTTP from :9100/metrics inside
the guest, as a scraper would, and parsed with the client library's parser.
The policy is test_daemon.py's, penalty2 long enough for the whole module.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_daemon import (
    POLICY,
    call,
    call_ok,
    diagnostics,
    keep_logged_in_unjudged,
    poll,
    root,
    wait_until_serving,
    write_policy,
)

# v2 only: nothing here differs on cgroup v1 (see conftest.py)
pytestmark = [pytest.mark.vm, pytest.mark.v2_only]

REPO = Path(__file__).resolve().parents[2]
USER, UID, GROUP = "mina", 5301, "normal"
TIER, LEVEL = "penalty2", 2  # the second tier of [penalty] order
EXPORTER = "prometheus-node-exporter"
TEXTFILE = "/var/lib/prometheus/node-exporter/cgpolicy.prom"
SCRAPE = (
    "python3 -c 'import urllib.request, sys; "
    'sys.stdout.write(urllib.request.urlopen("http://localhost:9100/metrics", timeout=30)'
    ".read().decode())'"
)
OUR_POLICY = {
    **POLICY,
    "cgpolicy.toml": POLICY["cgpolicy.toml"].replace("timeout = 60\n", "timeout = 900\n"),
}

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Series:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


_SCRAPE_ERRORS: list[str] = []  # the last failed scrape's words, for the diagnostics


def scrape(vm) -> Series:
    done = root(vm, SCRAPE, check=False)
    if done.returncode != 0:
        _SCRAPE_ERRORS[:] = [f"exit {done.returncode}: {done.stderr.strip()[-400:]}"]
        return {}
    return parse(done.stdout)


def mina(**extra: str) -> frozenset[tuple[str, str]]:
    return frozenset({"uid": str(UID), "user": USER, "group": GROUP, **extra}.items())


def exporter_diagnostics(vm) -> str:
    status = root(vm, f"systemctl status {EXPORTER} --no-pager -n 20 2>&1", check=False)
    listing = root(vm, f"ls -l {Path(TEXTFILE).parent}; cat {TEXTFILE}", check=False)
    return (
        f"{diagnostics(vm, USER)}\n--- {EXPORTER} ---\n{status.stdout}\n{listing.stdout}"
        f"\n--- last failed scrape ---\n{_SCRAPE_ERRORS}"
    )


def served(vm, what: str, done, timeout: float = 60) -> Series:
    """Scrape until ``done(series)``. A scrape is an ssh login and an interpreter start,
    several seconds each in the one-vCPU emulated guest."""
    return poll(
        what, partial(scrape, vm), done, timeout, partial(exporter_diagnostics, vm), every=1.0
    )


@pytest.fixture(scope="module")
def node(vm) -> Iterator[Any]:
    from vmharness.install import install_cgpolicy

    install_cgpolicy(vm, REPO)
    vm.add_user(USER, UID)
    root(vm, "rm -f /etc/cgpolicy/groups.d/*.toml")
    write_policy(vm, OUR_POLICY)
    root(vm, "cgpolicyctl check")
    keep_logged_in_unjudged(vm, [USER])  # (re)starts cgpolicyd on this policy
    root(vm, f"systemctl start {EXPORTER}")
    # it listens some seconds after systemd calls it started (in the emulated guest
    # its first scrape failed for 30 s): the tests measure cgpolicyd, not that
    served(vm, f"{EXPORTER} on :9100", lambda s: bool(s), timeout=180)
    try:
        yield vm
    finally:
        if vm.running:  # nobody penalized or frozen, the exporter stopped, as before
            root(vm, f"cgpolicyctl thaw {USER}", check=False)
            call(vm, "Release", "s", USER)
            root(vm, f"systemctl stop {EXPORTER}", check=False)
            wait_until_serving(vm)


def test_the_node_exporter_serves_a_penalized_users_tier(node):
    call_ok(node, "Penalize", "ss", USER, TIER)
    found = served(
        node,
        f"{USER}'s tier {TIER} on :9100/metrics",
        lambda s: s.get(("cgpolicy_user_tier", mina(tier=TIER))) == LEVEL,
    )
    assert found["cgpolicy_user_cpu_seconds_total", mina()] > 0  # her login's sshd and shell
    assert found["cgpolicy_user_memory_bytes", mina()] > 0
    assert found["cgpolicy_user_tier_expiry_timestamp_seconds", mina()] > 0
    assert found["cgpolicy_penalties", frozenset({("tier", TIER)})] >= 1
    assert found["cgpolicy_user_frozen", mina()] == 0
    assert any(name == "cgpolicy_build_info" for name, _ in found)
    # through the textfile collector, read without error
    assert found["node_textfile_scrape_error", frozenset()] == 0
    assert any(
        name == "node_textfile_mtime_seconds" and dict(labels)["file"].endswith("cgpolicy.prom")
        for name, labels in found
    )
    assert root(node, f"stat -c '%a %U' {TEXTFILE}").stdout.split() == ["644", "root"]
    # cgpolicyctl metrics prints the series cgpolicyd serves on the bus
    printed = parse(root(node, "cgpolicyctl metrics").stdout)
    assert printed["cgpolicy_user_tier", mina(tier=TIER)] == LEVEL


def test_a_frozen_user_is_shown_frozen_until_thawed(node):
    root(node, f"cgpolicyctl freeze {USER}")
    served(node, f"{USER} frozen", lambda s: s.get(("cgpolicy_user_frozen", mina())) == 1)
    root(node, f"cgpolicyctl thaw {USER}")
    served(node, f"{USER} thawed", lambda s: s.get(("cgpolicy_user_frozen", mina())) == 0)
