"""The usage sampler on fake cgroup v2 and v1 trees and a fake /proc, and on this host."""

from __future__ import annotations

from pathlib import Path

import pytest

from pam_cgpolicy.cgroups import cgroup_mode
from pam_cgpolicy.usage import CLK_TCK, MATCH_NAME, ProcStat, UsageSampler, parse_proc_stat

UID = 1000
SSH = frozenset({"sshd", "scp", "sftp-server", "rsync"})
BOOT = 5000.0  # /proc/uptime at the first sample; the second is 10 s later


class Node:
    """A fake node: the cgroup tree of one mode and a /proc, in files as the kernel writes them."""

    def __init__(self, tmp: Path, mode: str) -> None:
        self.root = tmp / "cgroup"
        self.proc = tmp / "proc"
        self.mode = mode
        self.proc.mkdir()
        self.uptime(BOOT)
        if mode == "unified":
            self.root.mkdir()
            (self.root / "cgroup.controllers").write_text("cpu io memory pids\n")
            (self.root / "user.slice").mkdir()
        else:
            (self.root / "unified").mkdir(parents=True)
            (self.root / "unified" / "cgroup.controllers").write_text("")
            (self.root / "systemd" / "user.slice").mkdir(parents=True)

    def sampler(self, match: str = MATCH_NAME) -> UsageSampler:
        """By name for the accounting tests: this fake /proc has no programs to point at
        (test_whitelist.py tests matching on the program)."""
        return UsageSampler(self.root, self.proc, match=match)

    def uptime(self, seconds: float) -> None:
        (self.proc / "uptime").write_text(f"{seconds:.2f} {seconds * 1.9:.2f}\n")

    def tasks_dir(self, uid: int) -> Path:
        top = self.root if self.mode == "unified" else self.root / "systemd"
        return top / "user.slice" / f"user-{uid}.slice"

    def add_slice(self, uid: int) -> None:
        self.tasks_dir(uid).mkdir(parents=True, exist_ok=True)

    def cpu(self, uid: int, usec: int) -> None:
        if self.mode == "unified":
            path = self.tasks_dir(uid) / "cpu.stat"
            path.write_text(
                f"usage_usec {usec}\nuser_usec {usec // 2}\nsystem_usec {usec - usec // 2}\n"
                "nr_periods 0\nnr_throttled 0\nthrottled_usec 0\n"
            )
        else:
            path = self.root / "cpu,cpuacct" / "user.slice" / f"user-{uid}.slice" / "cpuacct.usage"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{usec * 1000}\n")

    def memory(self, uid: int, anon: int, mapped: int) -> None:
        if self.mode == "unified":
            path = self.tasks_dir(uid) / "memory.stat"
            text = (
                f"anon {anon}\nfile 999999\nkernel 4096\nshmem 0\nfile_mapped {mapped}\n"
                f"active_anon 77\ninactive_anon {anon - 77}\n"
            )
        else:
            path = self.root / "memory" / "user.slice" / f"user-{uid}.slice" / "memory.stat"
            path.parent.mkdir(parents=True, exist_ok=True)
            # The slice's own tasks hold little; total_ counts the subtree.
            text = (
                "cache 0\nrss 4096\nmapped_file 0\n"
                f"total_cache 999999\ntotal_rss {anon}\ntotal_mapped_file {mapped}\n"
            )
        path.write_text(text)

    def process(
        self,
        uid: int,
        pid: int,
        comm: str,
        ticks: int,
        start: int = 100,
        cgroup: str = "session-1.scope",
    ) -> None:
        """A process in a cgroup below a slice (``uid`` -1: none), started ``start`` ticks
        after boot."""
        path = (
            f"/user.slice/user-{uid}.slice/{cgroup}" if uid >= 0 else "/system.slice/cron.service"
        )
        if self.mode == "unified":
            text = f"0::{path}\n"
        else:  # a controller without a cgroup for the slice shows the nearest above it
            text = (
                f"12:pids:{path}\n11:memory:/user.slice\n"
                f"10:freezer:/cgpolicy/user-{uid + 1}.slice\n2:cpu,cpuacct:/user.slice\n"
                f"1:name=systemd:{path}\n0::{path}\n"
            )
        self.stat(pid, comm, ticks, start)
        (self.proc / str(pid) / "cgroup").write_text(text)

    def program(self, pid: int, path: str) -> None:
        """/proc/PID/exe: the program the process runs."""
        (self.proc / str(pid) / "exe").symlink_to(path)

    def stat(self, pid: int, comm: str, ticks: int, start: int = 100) -> None:
        directory = self.proc / str(pid)
        directory.mkdir(exist_ok=True)
        utime, stime = ticks - ticks // 3, ticks // 3
        (directory / "stat").write_text(
            f"{pid} ({comm}) S 1 {pid} {pid} 0 -1 4194560 2000 0 0 0 {utime} {stime} 0 0 "
            f"20 0 1 0 {start} 12345678 900 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 "
            "0 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
        )
        (directory / "comm").write_text(f"{comm}\n")

    def exit(self, pid: int) -> None:
        for path in (self.proc / str(pid)).iterdir():
            path.unlink()
        (self.proc / str(pid)).rmdir()

    def reuse(self, pid: int, uid: int, comm: str, ticks: int, start: int) -> None:
        """Pid ``pid`` exits and a new process gets the number, with a new /proc/PID inode."""
        new = self.proc / "new"
        new.mkdir()  # before the old one goes, so that no file system can recycle its inode
        self.exit(pid)
        new.rename(self.proc / str(pid))
        self.process(uid, pid, comm, ticks, start)


@pytest.fixture(params=["unified", "hybrid"])
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Node:
    return Node(tmp_path, request.param)


@pytest.fixture
def v2(tmp_path: Path) -> Node:
    return Node(tmp_path, "unified")


def ticks(cores: float, seconds: float = 10.0) -> int:
    return round(cores * seconds * CLK_TCK)


# Modes and slices


def test_the_mode_is_detected_from_the_tree(node: Node) -> None:
    assert node.sampler().mode == cgroup_mode(node.root) == node.mode


def test_an_unknown_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown cgroup mode"):
        UsageSampler(tmp_path, tmp_path, mode="v3")


def test_active_uids_filters_by_min_uid_and_ignores_other_names(node: Node) -> None:
    for uid in (0, 999, 1000, 1001, 60000):
        node.add_slice(uid)
    users = node.tasks_dir(0).parent
    for name in ("user-abc.slice", "user-1002.slice.d", "user-.slice", "user-01003.slice"):
        (users / name).mkdir()
    (users / "user-1004.slice").write_text("")  # not a directory
    (users / "user@1000.service").mkdir()
    assert node.sampler().active_uids(1000) == [1000, 1001, 60000]
    assert node.sampler().active_uids(0) == [0, 999, 1000, 1001, 60000]


def test_no_user_slice_means_no_active_uids(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("")
    assert UsageSampler(tmp_path, tmp_path).active_uids(1000) == []


# CPU and memory of a slice


def test_cores_are_averaged_over_the_interval_between_two_samples(node: Node) -> None:
    node.add_slice(UID)
    node.cpu(UID, 40_000_000)
    node.memory(UID, 0, 0)
    sampler = node.sampler()
    first = sampler.sample([UID], SSH, now=100.0)[UID]
    assert first.cores is None and first.interval is None and first.whitelisted_cores is None
    assert first.cpu_usec_total == 40_000_000

    node.cpu(UID, 55_000_000)
    second = sampler.sample([UID], SSH, now=110.0)[UID]
    assert second.interval == 10.0
    assert second.cores == pytest.approx(1.5)
    assert second.whitelisted_cores == 0.0
    assert second.cpu_usec_total == 55_000_000


def test_memory_is_anon_plus_mapped_files(node: Node) -> None:
    node.add_slice(UID)
    node.cpu(UID, 0)
    node.memory(UID, anon=3 * 2**30, mapped=200 * 2**20)
    sample = node.sampler().sample([UID], SSH, now=1.0)[UID]
    assert sample.memory_bytes == 3 * 2**30 + 200 * 2**20


def test_missing_files_are_no_data(node: Node) -> None:
    # On v1 with accounting off, systemd creates no cpu or memory cgroup for the slice.
    node.add_slice(UID)
    sampler = node.sampler()
    for now in (1.0, 11.0):
        sample = sampler.sample([UID], SSH, now=now)[UID]
        assert sample.cores is None
        assert sample.cpu_usec_total is None
        assert sample.memory_bytes is None
    assert sample.interval == 10.0


def test_a_memory_stat_without_the_keys_is_no_data(v2: Node) -> None:
    v2.add_slice(UID)
    (v2.tasks_dir(UID) / "memory.stat").write_text("file 4096\nactive_anon 1\n")
    (v2.tasks_dir(UID) / "cpu.stat").write_text("user_usec 5\n")
    sample = v2.sampler().sample([UID], SSH, now=1.0)[UID]
    assert sample.memory_bytes is None
    assert sample.cpu_usec_total is None


def test_a_slice_created_again_gives_no_cores_for_that_interval(node: Node) -> None:
    node.add_slice(UID)
    node.cpu(UID, 90_000_000)
    sampler = node.sampler()
    sampler.sample([UID], SSH, now=0.0)
    node.cpu(UID, 1_000_000)  # logged out and in again: the counter restarted
    assert sampler.sample([UID], SSH, now=10.0)[UID].cores is None
    node.cpu(UID, 6_000_000)
    assert sampler.sample([UID], SSH, now=20.0)[UID].cores == pytest.approx(0.5)


def test_a_uid_left_out_of_a_sample_is_forgotten(node: Node) -> None:
    for uid in (UID, UID + 1):
        node.add_slice(uid)
        node.cpu(uid, 0)
    sampler = node.sampler()
    sampler.sample([UID, UID + 1], SSH, now=0.0)
    node.cpu(UID, 10_000_000)
    node.cpu(UID + 1, 10_000_000)
    assert sampler.sample([UID], SSH, now=10.0)[UID].cores == pytest.approx(1.0)
    assert sampler.sample([UID, UID + 1], SSH, now=20.0)[UID + 1].cores is None


def test_a_clock_that_did_not_move_gives_no_interval(node: Node) -> None:
    node.add_slice(UID)
    node.cpu(UID, 0)
    sampler = node.sampler()
    sampler.sample([UID], SSH, now=5.0)
    sample = sampler.sample([UID], SSH, now=5.0)[UID]
    assert sample.interval is None and sample.cores is None


# The whitelist


def test_whitelisted_processes_cpu_is_subtracted(node: Node) -> None:
    node.add_slice(UID)
    node.cpu(UID, 0)
    node.process(UID, 10, "sshd", 500)
    node.process(UID, 11, "bash", 50)
    node.process(UID, 12, "rsync", 1000, cgroup="user@1000.service/app.slice/rsync.scope")
    sampler = node.sampler()
    sampler.sample([UID], SSH, now=0.0)

    node.uptime(BOOT + 10)
    node.cpu(UID, 15_000_000)  # 1.5 cores over 10 s
    node.stat(10, "sshd", 500 + ticks(0.2))
    node.stat(11, "bash", 50 + ticks(0.6))
    node.stat(12, "rsync", 1000 + ticks(0.3))
    sample = sampler.sample([UID], SSH, now=10.0)[UID]
    assert sample.whitelisted_cores == pytest.approx(0.5)
    assert sample.cores == pytest.approx(1.0)


def test_memory_is_never_reduced_by_the_whitelist(node: Node) -> None:
    node.add_slice(UID)
    node.cpu(UID, 0)
    node.memory(UID, anon=2**30, mapped=0)
    node.process(UID, 10, "rsync", 0)
    sampler = node.sampler()
    sampler.sample([UID], SSH, now=0.0)
    node.process(UID, 10, "rsync", ticks(1.0))
    node.cpu(UID, 10_000_000)
    assert sampler.sample([UID], SSH, now=10.0)[UID].memory_bytes == 2**30


def test_cores_never_go_below_zero(node: Node) -> None:
    node.add_slice(UID)
    node.cpu(UID, 0)
    node.process(UID, 10, "scp", 0)
    sampler = node.sampler()
    sampler.sample([UID], SSH, now=0.0)
    # Ticks and usage_usec are counted apart and may disagree by a little.
    node.process(UID, 10, "scp", ticks(0.5))
    node.cpu(UID, 4_900_000)
    sample = sampler.sample([UID], SSH, now=10.0)[UID]
    assert sample.whitelisted_cores == pytest.approx(0.5)
    assert sample.cores == 0.0


def test_a_whitelist_per_uid_applies_to_its_uid_only(node: Node) -> None:
    for uid in (UID, UID + 1):
        node.add_slice(uid)
        node.cpu(uid, 0)
        node.process(uid, uid, "rsync", 0)
    sampler = node.sampler()
    whitelist = {UID: frozenset({"rsync"})}
    sampler.sample([UID, UID + 1], whitelist, now=0.0)
    for uid in (UID, UID + 1):
        node.cpu(uid, 10_000_000)
        node.process(uid, uid, "rsync", ticks(1.0))
    samples = sampler.sample([UID, UID + 1], whitelist, now=10.0)
    assert samples[UID].cores == 0.0
    assert samples[UID + 1].cores == pytest.approx(1.0)
    assert samples[UID + 1].whitelisted_cores == 0.0


def test_a_name_longer_than_the_kernel_keeps_still_matches(node: Node) -> None:
    node.add_slice(UID)
    node.cpu(UID, 0)
    node.process(UID, 10, "transfer-daemon", 0)  # 15 bytes: all the kernel keeps
    sampler = node.sampler()
    whitelist = frozenset({"transfer-daemon-v2"})
    sampler.sample([UID], whitelist, now=0.0)
    node.cpu(UID, 10_000_000)
    node.process(UID, 10, "transfer-daemon", ticks(0.25))
    assert sampler.sample([UID], whitelist, now=10.0)[UID].cores == pytest.approx(0.75)


def test_processes_outside_the_slices_and_of_other_users_are_not_counted(node: Node) -> None:
    node.add_slice(UID)
    node.cpu(UID, 0)
    node.process(UID + 1, 10, "rsync", 0)
    node.process(-1, 11, "rsync", 0)
    sampler = node.sampler()
    sampler.sample([UID], SSH, now=0.0)
    node.cpu(UID, 10_000_000)
    node.stat(10, "rsync", ticks(0.5))
    node.stat(11, "rsync", ticks(0.5))
    assert sampler.sample([UID], SSH, now=10.0)[UID].cores == pytest.approx(1.0)


def test_a_process_is_placed_in_its_slice_once(node: Node) -> None:
    node.add_slice(UID)
    node.cpu(UID, 0)
    node.process(UID, 10, "rsync", 0)
    sampler = node.sampler()
    sampler.sample([UID], SSH, now=0.0)
    (node.proc / "10" / "cgroup").unlink()  # not read again
    node.cpu(UID, 10_000_000)
    node.stat(10, "rsync", ticks(0.5))
    assert sampler.sample([UID], SSH, now=10.0)[UID].whitelisted_cores == pytest.approx(0.5)


def test_a_pid_reused_by_another_users_process_moves_to_that_user(node: Node) -> None:
    for uid in (UID, UID + 1):
        node.add_slice(uid)
        node.cpu(uid, 0)
    node.process(UID, 10, "rsync", 0)
    sampler = node.sampler()
    sampler.sample([UID, UID + 1], SSH, now=0.0)

    node.uptime(BOOT + 10)
    node.reuse(10, UID + 1, "rsync", ticks(0.5), start=int((BOOT + 2) * CLK_TCK))
    node.cpu(UID, 10_000_000)
    node.cpu(UID + 1, 10_000_000)
    samples = sampler.sample([UID, UID + 1], SSH, now=10.0)
    assert samples[UID].whitelisted_cores == 0.0
    assert samples[UID + 1].whitelisted_cores == pytest.approx(0.5)


def test_a_process_that_exits_between_samples_is_dropped(node: Node) -> None:
    node.add_slice(UID)
    node.cpu(UID, 0)
    node.process(UID, 10, "sshd", 100)
    node.process(UID, 11, "rsync", 100)
    sampler = node.sampler()
    sampler.sample([UID], SSH, now=0.0)

    node.exit(11)
    node.process(UID, 10, "sshd", 100 + ticks(0.1))
    node.cpu(UID, 10_000_000)
    sample = sampler.sample([UID], SSH, now=10.0)[UID]
    assert sample.whitelisted_cores == pytest.approx(0.1)
    assert set(sampler._users[UID].pids) == {10}
    assert set(sampler._owners) == {"10"}


def test_a_new_process_counts_all_its_cpu_if_it_started_within_the_interval(node: Node) -> None:
    node.add_slice(UID)
    node.cpu(UID, 0)
    sampler = node.sampler()
    sampler.sample([UID], SSH, now=0.0)  # /proc/uptime says BOOT

    node.uptime(BOOT + 10)
    node.cpu(UID, 20_000_000)
    # Started 4 s into the interval, 0.3 cores' worth of CPU since.
    node.process(UID, 20, "rsync", ticks(0.3), start=int((BOOT + 4) * CLK_TCK))
    # Older than the previous sample but never seen (it was not whitelisted then):
    # its CPU within the interval is unknown, so none counts.
    node.process(UID, 21, "sftp-server", ticks(0.7), start=int((BOOT - 60) * CLK_TCK))
    sample = sampler.sample([UID], SSH, now=10.0)[UID]
    assert sample.whitelisted_cores == pytest.approx(0.3)
    assert sample.cores == pytest.approx(1.7)


def test_a_reused_pid_is_a_new_process(node: Node) -> None:
    node.add_slice(UID)
    node.cpu(UID, 0)
    node.process(UID, 10, "rsync", 5000, start=100)
    sampler = node.sampler()
    sampler.sample([UID], SSH, now=0.0)

    node.uptime(BOOT + 10)
    node.cpu(UID, 10_000_000)
    # Pid 10 exited and a new rsync got its number: far fewer ticks, a later start.
    node.process(UID, 10, "rsync", ticks(0.2), start=int((BOOT + 5) * CLK_TCK))
    assert sampler.sample([UID], SSH, now=10.0)[UID].whitelisted_cores == pytest.approx(0.2)


def test_a_process_renamed_out_of_the_whitelist_stops_counting(node: Node) -> None:
    node.add_slice(UID)
    node.cpu(UID, 0)
    node.process(UID, 10, "sshd", 100)
    sampler = node.sampler()
    sampler.sample([UID], SSH, now=0.0)
    node.cpu(UID, 10_000_000)
    node.process(UID, 10, "bash", 100 + ticks(1.0))  # the forked sshd exec'd a shell
    sample = sampler.sample([UID], SSH, now=10.0)[UID]
    assert sample.whitelisted_cores == 0.0 and sample.cores == pytest.approx(1.0)


def test_an_idle_slice_keeps_its_process_totals_without_reading_proc(node: Node) -> None:
    node.add_slice(UID)
    node.cpu(UID, 7_000_000)
    node.process(UID, 10, "rsync", 1000)
    sampler = node.sampler()
    sampler.sample([UID], SSH, now=0.0)

    # The slice's CPU did not move, so no process in it ran; /proc is not read
    # (an unreadable stat here would otherwise drop the process).
    node.uptime(BOOT + 10)
    hidden = node.proc / "hidden"  # the same /proc/PID (same inode) comes back below
    (node.proc / "10").rename(hidden)
    idle = sampler.sample([UID], SSH, now=10.0)[UID]
    assert idle.cores == 0.0 and idle.whitelisted_cores == 0.0

    hidden.rename(node.proc / "10")
    node.uptime(BOOT + 20)
    node.cpu(UID, 17_000_000)
    node.stat(10, "rsync", 1000 + ticks(0.4))
    busy = sampler.sample([UID], SSH, now=20.0)[UID]
    assert busy.whitelisted_cores == pytest.approx(0.4)
    assert busy.cores == pytest.approx(0.6)


def test_no_whitelist_reads_no_processes(node: Node) -> None:
    node.add_slice(UID)
    node.cpu(UID, 0)
    node.process(UID, 10, "rsync", 0)
    sampler = node.sampler()
    sampler.sample([UID], frozenset(), now=0.0)
    node.cpu(UID, 10_000_000)
    node.process(UID, 10, "rsync", ticks(1.0))
    sample = sampler.sample([UID], frozenset(), now=10.0)[UID]
    assert sample.cores == pytest.approx(1.0) and sample.whitelisted_cores == 0.0
    assert sampler._users[UID].pids == {}


# /proc/PID/stat


def test_the_stat_parser_reads_from_the_last_parenthesis() -> None:
    line = (
        b"4242 (evil) (name)) S 1 4242 4242 0 -1 4194560 2000 0 0 0 30 12 0 0 "
        b"20 0 1 0 987654 12345678 900 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 0\n"
    )
    assert parse_proc_stat(line) == ProcStat("evil) (name)", 42, 987654)


def test_the_stat_parser_keeps_spaces_and_odd_bytes_in_the_name() -> None:
    line = b"7 (a b\xff) R 1 7 7 0 -1 0 0 0 0 0 1 2 0 0 20 0 1 0 55 0 0\n"
    stat = parse_proc_stat(line)
    assert stat is not None and stat.comm == "a b\udcff" and stat.cpu_ticks == 3


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"12 (cut",
        b"12 (sshd) S 1 2 3",
        b"12 (sshd) S 1 2 3 4 5 6 7 8 9 10 x y 0 0 0 0 0 0 1\n",
    ],
)
def test_the_stat_parser_gives_none_for_short_or_garbled_reads(data: bytes) -> None:
    assert parse_proc_stat(data) is None


def test_the_stat_parser_reads_this_process() -> None:
    stat = parse_proc_stat(Path("/proc/self/stat").read_bytes())
    assert stat is not None
    assert stat.comm == Path("/proc/self/comm").read_text().rstrip("\n")
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    assert 0 < stat.start_ticks / CLK_TCK <= uptime


# This host


@pytest.mark.skipif(
    not Path("/sys/fs/cgroup/cgroup.controllers").exists()
    and not Path("/sys/fs/cgroup/unified/cgroup.controllers").exists(),
    reason="no systemd cgroup tree on this host",
)
def test_the_sampler_reads_this_hosts_slices() -> None:
    sampler = UsageSampler()
    uids = sampler.active_uids(0)
    first = sampler.sample(uids, SSH, now=0.0)
    second = sampler.sample(uids, SSH, now=0.5)
    assert set(first) == set(second) == set(uids)
    for sample in second.values():
        assert sample.interval == 0.5
        assert sample.cores is None or sample.cores >= 0
        assert sample.memory_bytes is None or sample.memory_bytes >= 0


def test_a_process_that_execs_a_whitelisted_program_is_found_within_the_recheck(
    node: Node,
) -> None:
    """Non-whitelisted names are re-read only every RECHECK_SCANS scans: a bounded delay."""
    from pam_cgpolicy.usage import RECHECK_SCANS

    node.add_slice(UID)
    node.process(UID, 10, "bash", 0)
    sampler = node.sampler()
    used = 0
    node.cpu(UID, used)
    sampler.sample([UID], SSH, now=0.0)
    node.stat(10, "rsync", 0)  # bash execs rsync: same pid, same /proc inode
    found_at = None
    for scan in range(1, RECHECK_SCANS + 2):
        used += 10_000_000
        node.uptime(BOOT + 10 * scan)
        node.cpu(UID, used)
        node.stat(10, "rsync", ticks(1.0, 10 * scan))
        sample = sampler.sample([UID], SSH, now=10.0 * scan)[UID]
        if found_at is None and sample.whitelisted_cores:
            found_at = scan
    assert found_at is not None and found_at <= RECHECK_SCANS + 1
    assert sample.whitelisted_cores == pytest.approx(1.0)
    assert sample.cores == pytest.approx(0.0)


def test_a_frozen_slice_is_sampled_as_frozen(node: Node) -> None:
    for uid in (UID, UID + 1):
        node.add_slice(uid)
        node.cpu(uid, 0)
    if node.mode == "unified":  # the kernel's word in each slice
        (node.tasks_dir(UID) / "cgroup.events").write_text("populated 1\nfrozen 1\n")
        (node.tasks_dir(UID + 1) / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    else:  # the v1 freezer's group of a frozen user
        group = node.root / "freezer" / "cgpolicy" / f"user-{UID}.slice"
        group.mkdir(parents=True)
        (group / "freezer.state").write_text("FROZEN\n")
    samples = node.sampler().sample([UID, UID + 1], frozenset(), 1.0)
    assert samples[UID].frozen and not samples[UID + 1].frozen
