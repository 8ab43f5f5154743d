"""Whitelisted CPU is matched on the program a process runs, not on a name its user set.

A process's name (comm, argv[0]) is its user's to choose: exec -a, prctl, a link
named rsync. The program, /proc/PID/exe, is the kernel's; it counts only in a
file and a directory that only root can change. These tests run the sampler
on the fake node of test_usage.py, with /proc/PID/exe pointing at real files.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from policyfiles import MAIN, write_policy
from test_usage import BOOT, UID, Node, ticks
from test_usage import node as node  # the fake node of each cgroup mode, as a fixture

from pam_cgpolicy.errors import PolicyError
from pam_cgpolicy.policy import load_policy
from pam_cgpolicy.usage import MATCH_EXECUTABLE, MATCH_NAME, Sample, UsageSampler

# Programs only root can change on any Debian-like system: root's files in root's /usr/bin.
ENV, TRUE = "/usr/bin/env", "/usr/bin/true"
NOBODY = 65534


def test_the_fixture_programs_are_root_only() -> None:
    for path in (ENV, TRUE):
        for info in (os.stat(path), os.stat(os.path.dirname(path))):
            assert info.st_uid == 0 and not info.st_mode & 0o022, path


def burn(
    node: Node, whitelist: frozenset[str], comm: str, program: str | None, match: str | None = None
) -> Sample:
    """One process named ``comm`` running ``program`` uses a whole core for 10 s."""
    node.add_slice(UID)
    node.cpu(UID, 0)
    node.process(UID, 10, comm, 0)
    if program is not None:
        node.program(10, program)
    sampler = UsageSampler(node.root, node.proc) if match is None else node.sampler(match=match)
    sampler.sample([UID], whitelist, now=0.0)
    node.uptime(BOOT + 10)
    node.cpu(UID, 10_000_000)
    node.stat(10, comm, ticks(1.0))
    return sampler.sample([UID], whitelist, now=10.0)[UID]


def users_own_copy(tmp_path: Path, name: str) -> str:
    """A program of that name in the user's own directory (as root: chowned to nobody)."""
    home = tmp_path / "home"
    home.mkdir()
    copy = home / name
    copy.write_bytes(Path(ENV).read_bytes())
    copy.chmod(0o755)
    if os.geteuid() == 0:
        os.chown(home, NOBODY, NOBODY)
        os.chown(copy, NOBODY, NOBODY)
    return str(copy)


def in_shared_directory(tmp_path: Path, name: str) -> str:
    """A program of that name in a directory anyone may write to, like /tmp."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    copy = shared / name
    copy.write_bytes(Path(ENV).read_bytes())
    copy.chmod(0o755)
    return str(copy)


def test_the_whitelisted_program_itself_is_not_charged(node: Node) -> None:
    sample = burn(node, frozenset({"env"}), "env", ENV)
    assert sample.whitelisted_cores == pytest.approx(1.0)
    assert sample.cores == pytest.approx(0.0)


@pytest.mark.parametrize(
    "how",
    [
        "another root program under the name (exec -a, prctl, a link named env)",
        "the user's own copy of that name",
        "a copy of that name in a directory anyone may write to",
        "no program the daemon can see",
    ],
)
def test_a_process_only_named_like_a_whitelisted_program_is_charged(
    node: Node, tmp_path: Path, how: str
) -> None:
    program = {
        "another": TRUE,
        "the": users_own_copy(tmp_path, "env"),
        "a": in_shared_directory(tmp_path, "env"),
        "no": None,
    }[how.split()[0]]
    sample = burn(node, frozenset({"env"}), "env", program)
    assert sample.whitelisted_cores == 0.0
    assert sample.cores == pytest.approx(1.0)


def test_an_absolute_entry_admits_that_file_only(node: Node, tmp_path: Path) -> None:
    assert burn(node, frozenset({ENV}), "env", ENV).cores == pytest.approx(0.0)


def test_an_absolute_entry_does_not_admit_another_file_of_that_name(node: Node) -> None:
    assert burn(node, frozenset({"/usr/local/sbin/env"}), "env", ENV).cores == pytest.approx(1.0)


def test_matching_by_name_is_the_admins_explicit_choice(node: Node) -> None:
    assert UsageSampler(node.root, node.proc).match == MATCH_EXECUTABLE
    sample = burn(node, frozenset({"env"}), "env", TRUE, match=MATCH_NAME)
    assert sample.cores == pytest.approx(0.0)


def test_a_process_that_leaves_the_whitelisted_program_is_charged_at_once(node: Node) -> None:
    """The program is looked at every scan, not only once: an exec that keeps the name
    (through a link named env) is charged from the next sample on."""
    assert burn(node, frozenset({"env"}), "env", ENV).cores == pytest.approx(0.0)
    sampler = UsageSampler(node.root, node.proc)
    whitelist = frozenset({"env"})
    sampler.sample([UID], whitelist, now=10.0)
    (node.proc / "10" / "exe").unlink()
    node.program(10, TRUE)
    node.uptime(BOOT + 20)
    node.cpu(UID, 20_000_000)
    node.stat(10, "env", ticks(2.0))
    assert sampler.sample([UID], whitelist, now=20.0)[UID].cores == pytest.approx(1.0)


# The policy keys


def main_with(processes: str) -> str:
    return MAIN + "\n[processes]\n" + processes


def test_the_policy_matches_on_the_program_unless_told(tmp_path: Path) -> None:
    policy = load_policy(write_policy(tmp_path, main=main_with('whitelist = ["rsync"]\n')))
    assert policy.whitelist_match == MATCH_EXECUTABLE


def test_the_policy_may_choose_names(tmp_path: Path) -> None:
    policy = load_policy(write_policy(tmp_path, main=main_with('match = "name"\n')))
    assert policy.whitelist_match == MATCH_NAME


def test_absolute_paths_are_whitelist_entries(tmp_path: Path) -> None:
    main = main_with('whitelist = ["rsync", "/usr/lib/openssh/sftp-server"]\n')
    assert load_policy(write_policy(tmp_path, main=main)).whitelist == (
        "rsync",
        "/usr/lib/openssh/sftp-server",
    )


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('match = "comm"', "processes.match: must be one of 'executable', 'name', not 'comm'"),
        ("match = true", "processes.match: must be a string"),
        ('whitelist = ["bin/rsync"]', "processes.whitelist: 'bin/rsync' is neither"),
        ('whitelist = ["/usr/bin/../rsync"]', "processes.whitelist: '/usr/bin/../rsync' is"),
        ('whitelist = ["/usr/bin/"]', "processes.whitelist: '/usr/bin/' is neither"),
        ('whitelist = [".."]', "processes.whitelist: '..' is neither"),
    ],
)
def test_bad_processes_keys_name_file_line_and_key(
    tmp_path: Path, line: str, expected: str
) -> None:
    root = write_policy(tmp_path, main=main_with(line + "\n"))
    with pytest.raises(PolicyError) as caught:
        load_policy(root)
    found = [str(p) for p in caught.value.problems]
    assert any(f"cgpolicy.toml:{MAIN.count(chr(10)) + 3}: {expected}" in p for p in found), found
