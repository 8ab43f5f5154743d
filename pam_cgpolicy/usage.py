"""Per-user CPU and memory usage for cgpolicyd, read from the user slices' cgroups.

Each cycle the daemon passes the active uids to sample(). It reads each slice's
cumulative CPU time and its memory, on cgroup v2 and v1 alike, and averages the
CPU over the time since that uid's previous sample. The CPU of whitelisted
processes (sshd, scp, rsync...) over the same interval is taken off, so that
moving files around is not heavy use; memory is never reduced.

Any user can name a process as they like (exec -a, prctl, a link named rsync),
so by default the program the kernel runs decides, /proc/PID/exe: a whitelisted
name must be a file only root can change, in a directory only root can change.
The process name is only a cheap pre-filter; matching on names alone is an
admin's explicit choice (MATCH_NAME).

Per-process data costs a file read per process, so it is read only for uids with
a whitelist whose slice used CPU since the last look, in one pass over /proc per
cycle. Which slice a process belongs to is read once in its life.

Read only: systemd owns these cgroups. A missing file means "no data" (None):
systemd creates a v1 slice's cpu and memory cgroups only when accounting is on.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .cgroups import CGROUP_ROOT, cgroup_mode
from .freezer import V1Freezer
from .trust import why_unsafe

CLK_TCK = os.sysconf("SC_CLK_TCK")
COMM_LEN = 15  # the kernel keeps the first 15 bytes of a process name (TASK_COMM_LEN - 1)

_SLICE = re.compile(r"user-(0|[1-9][0-9]*)\.slice")
# A process's line in /proc/PID/cgroup for systemd's hierarchy, when it is in a user slice.
_V2_OWNER = re.compile(rb"^0::/user\.slice/user-([0-9]+)\.slice(?:/|$)", re.MULTILINE)
_V1_OWNER = re.compile(
    rb"^[0-9]+:name=systemd:/user\.slice/user-([0-9]+)\.slice(?:/|$)", re.MULTILINE
)
_NOBODY = -1  # the owner of processes in no user slice: system services, kernel threads
_CHUNK = 16384  # every single-value cgroup or /proc file we read is smaller
# Where a v1 node mounts cpuacct: Debian co-mounts it with cpu; others on its own.
_CPUACCT_DIRS = ("cpu,cpuacct", "cpuacct,cpu", "cpuacct")
_NO_NAMES: frozenset[str] = frozenset()
_ROOT = frozenset({0})

MATCH_EXECUTABLE = "executable"  # the program file decides (the default)
MATCH_NAME = "name"  # the process name decides: any user can set it
MATCH_MODES = (MATCH_EXECUTABLE, MATCH_NAME)

# A process whose name is not whitelisted is looked at again only every this
# many scans: most processes never change their name, and reading every one's
# stat each cycle was most of a busy node's cycle. The error is conservative: a
# process that execs a whitelisted program is charged to its user for at most
# this many cycles. A whitelisted one is read every scan, so a process that
# leaves the whitelist by exec is charged again at once.
RECHECK_SCANS = 6


@dataclass(frozen=True, slots=True)
class Sample:
    """One uid's usage over the interval ending at a sample.

    ``cores`` is the slice's CPU averaged over ``interval`` less the whitelisted
    processes' share, never below 0. It and ``interval`` are None at the first
    sample of a uid; it alone is None when the slice's CPU could not be read now or
    before, or went down (the slice was created anew).
    """

    uid: int
    cores: float | None
    cpu_usec_total: int | None  # the slice's cumulative CPU time, as read
    memory_bytes: int | None  # anonymous plus mapped-file memory of the slice
    whitelisted_cores: float | None  # None when there was no interval to average over
    interval: float | None  # seconds since this uid's previous sample
    frozen: bool = False  # the slice is frozen (or freezing), by cgroup v2 or the v1 freezer


@dataclass(frozen=True, slots=True)
class Process:
    """One of a user's processes, as the report of a violation shows it.

    ``cores``: its CPU averaged over its life; ``memory``: its resident set, bytes.
    """

    pid: int
    name: str
    executable: str | None
    cores: float | None
    memory: int | None


@dataclass(frozen=True, slots=True)
class ProcStat:
    """What the whitelist needs from /proc/PID/stat."""

    comm: str  # the same task name /proc/PID/comm shows
    cpu_ticks: int  # utime + stime, in clock ticks
    start_ticks: int  # starttime: clock ticks after boot


@dataclass(slots=True)
class _UserState:
    time: float  # the caller's clock at the sample
    uptime: float | None  # /proc/uptime at the sample
    cpu_usec: int | None
    pids_uptime: float | None = None  # /proc/uptime when ``pids`` were read
    # The whitelisted processes seen then: pid -> (start ticks, cpu ticks).
    pids: dict[int, tuple[int, int]] = field(default_factory=dict)


def parse_proc_stat(data: bytes) -> ProcStat | None:
    """Parse /proc/PID/stat; None for a short or garbled read."""
    # The name is in parentheses and may itself hold ") (": only the last ')' ends it.
    opening = data.find(b"(")
    closing = data.rfind(b")")
    if opening < 0 or closing < opening:
        return None
    return _parse_after_comm(data, os.fsdecode(data[opening + 1 : closing]), closing)


def _parse_after_comm(data: bytes, comm: str, closing: int) -> ProcStat | None:
    fields = data[closing + 2 :].split()  # fields[0] is field 3, state
    if len(fields) < 20:
        return None
    try:
        cpu = int(fields[11]) + int(fields[12])  # utime, stime
        start = int(fields[19])
    except ValueError:
        return None
    return ProcStat(comm, cpu, start)


def _read(path: str) -> bytes | None:
    """A small cgroup or /proc file, None if unreadable.

    Each file read here is printed by a single seq_file show(), which one read of a
    large enough buffer gets whole (unlike cgroup.procs, printed a pid at a time).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, _CHUNK)
        if len(data) == _CHUNK:  # longer than expected: read on
            parts = [data]
            while chunk := os.read(fd, _CHUNK):
                parts.append(chunk)
            data = b"".join(parts)
        return data
    except OSError:  # ESRCH and friends from a process or cgroup on its way out
        return None
    finally:
        os.close(fd)


def _stat_value(data: bytes, key: bytes) -> int | None:
    """The value of the line "key N" in a flat keyed file like memory.stat."""
    if data.startswith(key + b" "):
        start = len(key) + 1
    else:
        at = data.find(b"\n" + key + b" ")
        if at < 0:
            return None
        start = at + len(key) + 2
    end = data.find(b"\n", start)
    try:
        return int(data[start : end if end >= 0 else None])
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class _Rule:
    """One whitelist, ready for the scan.

    A bare entry admits a program of that name in any root-only directory; an
    absolute path admits that file alone.
    """

    comms: frozenset[bytes]  # the pre-filter: names as the kernel keeps them, cut to COMM_LEN
    names: frozenset[str]
    paths: frozenset[str]

    @classmethod
    def of(cls, entries: frozenset[str]) -> _Rule:
        paths = frozenset(entry for entry in entries if entry.startswith("/"))
        comms = frozenset(os.fsencode(os.path.basename(e))[:COMM_LEN] for e in entries)
        return cls(comms, entries - paths, paths)

    def admits(self, program: str) -> bool:
        return program in self.paths or os.path.basename(program) in self.names


def _root_only_file(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path`` if only root can change it or its directory."""
    if not path.startswith("/"):
        return None
    parent = os.path.dirname(path) or "/"
    if why_unsafe(path, _ROOT) is not None or why_unsafe(parent, _ROOT) is not None:
        return None
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


class UsageSampler:
    """Reads the user slices' usage; keeps each uid's previous totals between samples."""

    def __init__(
        self,
        root: Path = CGROUP_ROOT,
        proc: Path = Path("/proc"),
        mode: str | None = None,
        match: str = MATCH_EXECUTABLE,
    ) -> None:
        self.mode = mode or cgroup_mode(root)
        self.match = match  # MATCH_EXECUTABLE or MATCH_NAME; the daemon sets the policy's
        if self.mode == "unified":
            self._tasks_dir = f"{root}/user.slice"
            self._cpu_dir = self._memory_dir = self._tasks_dir
            self._owner_line = _V2_OWNER
        elif self.mode in ("hybrid", "legacy"):
            # v1: systemd's own named hierarchy has every slice and all its tasks.
            self._tasks_dir = f"{root}/systemd/user.slice"
            cpuacct = next((d for d in _CPUACCT_DIRS if (root / d).is_dir()), _CPUACCT_DIRS[0])
            self._cpu_dir = f"{root}/{cpuacct}/user.slice"
            self._memory_dir = f"{root}/memory/user.slice"
            self._owner_line = _V1_OWNER
        else:
            raise ValueError(f"unknown cgroup mode {self.mode!r}")
        self._proc = str(proc)
        self._root = str(root)
        self._users: dict[int, _UserState] = {}
        # /proc entry name (the pid) -> (its inode, uid of its slice, the scan before
        # which its name need not be read again). The inode tells a reused pid
        # apart: a new process gets a new /proc/PID inode.
        self._owners: dict[str, tuple[int, int, int]] = {}
        self._scans = 0

    def active_uids(self, min_uid: int) -> list[int]:
        """The uids of the user-UID.slice cgroups with uid >= min_uid, in order."""
        uids = []
        try:
            with os.scandir(self._tasks_dir) as entries:
                for entry in entries:
                    match = _SLICE.fullmatch(entry.name)
                    if match and entry.is_dir(follow_symlinks=False):
                        uid = int(match[1])
                        if uid >= min_uid:
                            uids.append(uid)
        except OSError:
            return []  # no user.slice: nobody is logged in
        return sorted(uids)

    def sample(
        self,
        uids: Iterable[int],
        whitelist: Mapping[int, frozenset[str]] | frozenset[str],
        now: float,
    ) -> dict[int, Sample]:
        """Each uid's usage since its previous sample; ``now`` is monotonic seconds.

        ``whitelist`` holds program names or paths, for all uids alike or per uid (a
        uid not in the mapping has none). A uid left out of a call is forgotten: its next
        sample is a first one again.
        """
        uptime = self._uptime()
        per_uid, shared = (
            (whitelist, _NO_NAMES) if isinstance(whitelist, Mapping) else (None, whitelist)
        )
        # One truncated copy of each distinct whitelist per call; most uids share one.
        rules: dict[frozenset[str], _Rule] = {}
        readings: list[tuple[int, _UserState, int | None]] = []
        wanted: dict[int, _Rule] = {}  # the uids whose processes to read
        for uid in uids:
            slice_name = f"user-{uid}.slice"
            state = _UserState(now, uptime, self._cpu_usec(slice_name))
            readings.append((uid, state, self._memory(slice_name)))
            names = per_uid.get(uid, _NO_NAMES) if per_uid is not None else shared
            if not names:
                continue
            prev = self._users.get(uid)
            if (
                prev is not None
                and prev.pids_uptime is not None
                and state.cpu_usec is not None
                and state.cpu_usec == prev.cpu_usec
            ):
                # Nothing in the slice ran, so no process's CPU moved: the per-process
                # totals read before are still exact, and /proc need not be read.
                state.pids, state.pids_uptime = prev.pids, prev.pids_uptime
                continue
            if names not in rules:
                rules[names] = _Rule.of(names)
            wanted[uid] = rules[names]
        found = self._scan_proc(wanted) if wanted else {}
        frozen = self._frozen(readings)

        users: dict[int, _UserState] = {}
        samples: dict[int, Sample] = {}
        for uid, state, memory in readings:
            prev = self._users.get(uid)
            white_ticks = 0
            if uid in wanted:
                white_ticks, state.pids = _whitelisted_ticks(found.get(uid, []), prev)
                state.pids_uptime = uptime
            users[uid] = state
            samples[uid] = _sample(uid, state, prev, memory, white_ticks, uid in frozen)
        self._users = users
        return samples

    def _frozen(self, readings: list[tuple[int, _UserState, int | None]]) -> set[int]:
        """The uids whose slice is frozen: on v2 as the kernel says in each slice's
        cgroup.events; on v1 the few groups the v1 freezer holds, in one listing."""
        if self.mode != "unified":
            return set(V1Freezer(self._root).frozen_uids())
        frozen = set()
        for uid, _state, _memory in readings:
            events = _read(f"{self._tasks_dir}/user-{uid}.slice/cgroup.events")
            if events is not None and _stat_value(events, b"frozen") == 1:
                frozen.add(uid)
        return frozen

    def _scan_proc(self, wanted: Mapping[int, _Rule]) -> dict[int, list[tuple[int, ProcStat]]]:
        """The whitelisted processes of the ``wanted`` uids, in one pass over /proc.

        Only their processes' stat is read, and the program of those whose name
        passes. Which slice a process is in is read once in its life, from
        /proc/PID/cgroup, and remembered.
        """
        found: dict[int, list[tuple[int, ProcStat]]] = {}
        known = self._owners
        owners: dict[str, tuple[int, int, int]] = {}
        self._scans += 1
        scan = self._scans
        proc = self._proc
        by_program = self.match != MATCH_NAME
        programs: dict[tuple[int, int], str | None] = {}  # this scan's root-only programs
        try:
            listing = os.scandir(proc)
        except OSError:
            return found
        with listing:
            for entry in listing:
                name = entry.name
                inode = entry.inode()  # from the directory listing: no system call
                owner = known.get(name)
                if owner is None or owner[0] != inode:
                    if not name.isdigit():
                        continue
                    uid = self._owner(name)
                    if uid is None:
                        continue  # exited meanwhile
                    owner = (inode, uid, 0)
                owners[name] = owner
                rule = wanted.get(owner[1])
                if rule is None or owner[2] > scan:
                    continue  # not whitelisted when last looked at: see RECHECK_SCANS
                data = _read(f"{proc}/{name}/stat")
                if data is None:
                    continue
                # Most processes are not whitelisted: look at the name before the rest.
                closing = data.rfind(b")")
                comm = data[data.find(b"(") + 1 : closing]
                stat = None
                if closing >= 0 and comm in rule.comms:
                    stat = _parse_after_comm(data, os.fsdecode(comm), closing)
                if (
                    stat is not None
                    and by_program
                    and not self._idle(owner[1], name, stat)  # else its share is 0 anyway
                    and not self._runs_admitted(name, rule, programs)
                ):
                    stat = None
                if stat is None:
                    owners[name] = (owner[0], owner[1], scan + RECHECK_SCANS)
                    continue
                found.setdefault(owner[1], []).append((int(name), stat))
        self._owners = owners  # without the pids that exited
        return found

    def top_processes(self, uid: int, count: int) -> list[Process]:
        """The user's ``count`` processes using most CPU (then memory), read now.

        For the record of a violation: rare, so it may read every process of the slice.
        """
        pids: set[int] = set()
        for folder, _dirs, files in os.walk(f"{self._tasks_dir}/user-{uid}.slice"):
            if "cgroup.procs" in files:
                listed = _read(f"{folder}/cgroup.procs") or b""
                pids.update(int(pid) for pid in listed.split() if pid.isdigit())
        uptime = self._uptime()
        page = os.sysconf("SC_PAGE_SIZE")
        found = []
        for pid in pids:
            data = _read(f"{self._proc}/{pid}/stat")
            stat = None if data is None else parse_proc_stat(data)
            if stat is None:
                continue  # gone
            cores = None
            if uptime is not None and uptime * CLK_TCK > stat.start_ticks:
                cores = stat.cpu_ticks / (uptime * CLK_TCK - stat.start_ticks)
            statm = (_read(f"{self._proc}/{pid}/statm") or b"").split()
            memory = int(statm[1]) * page if len(statm) > 1 and statm[1].isdigit() else None
            try:
                executable: str | None = os.readlink(f"{self._proc}/{pid}/exe")
            except OSError:
                executable = None  # a kernel thread, or gone
            found.append(Process(pid, stat.comm, executable, cores, memory))
        found.sort(key=lambda p: (p.cores or 0.0, p.memory or 0), reverse=True)
        return found[:count]

    def _idle(self, uid: int, pid: str, stat: ProcStat) -> bool:
        """Whitelisted at the uid's last read and used no CPU since.

        What it runs is looked at only when its CPU grew: an exec that keeps the
        name (through a link named rsync) is caught by the first tick it uses.
        """
        prev = self._users.get(uid)
        return prev is not None and prev.pids.get(int(pid)) == (stat.start_ticks, stat.cpu_ticks)

    def _runs_admitted(
        self, pid: str, rule: _Rule, programs: dict[tuple[int, int], str | None]
    ) -> bool:
        """Whether the process runs a program the rule admits, in a file only root can change.

        The file at the path the kernel reports must be the very file the process
        runs (same device and inode): a path seen from another mount namespace, or a
        program deleted or replaced since, does not pass. Processes of one program
        (every sshd) share one look at it per scan.
        """
        link = f"{self._proc}/{pid}/exe"
        try:
            running = os.stat(link)
        except OSError:  # a kernel thread, or gone
            return False
        file = (running.st_dev, running.st_ino)
        if file not in programs:
            try:
                path = os.readlink(link)
            except OSError:
                return False
            programs[file] = path if _root_only_file(path) == file else None
        program = programs[file]
        return program is not None and rule.admits(program)

    def _owner(self, pid: str) -> int | None:
        """The uid of the user slice the process is in, _NOBODY if none, None if it is gone."""
        data = _read(f"{self._proc}/{pid}/cgroup")
        if data is None:
            return None
        match = self._owner_line.search(data)
        return int(match[1]) if match else _NOBODY

    def _uptime(self) -> float | None:
        data = _read(f"{self._proc}/uptime")
        try:
            return float(data.split()[0]) if data else None
        except (ValueError, IndexError):
            return None

    def _cpu_usec(self, slice_name: str) -> int | None:
        if self.mode == "unified":
            data = _read(f"{self._cpu_dir}/{slice_name}/cpu.stat")
            return None if data is None else _stat_value(data, b"usage_usec")
        data = _read(f"{self._cpu_dir}/{slice_name}/cpuacct.usage")
        try:
            return None if data is None else int(data) // 1000  # nanoseconds
        except ValueError:
            return None

    def _memory(self, slice_name: str) -> int | None:
        data = _read(f"{self._memory_dir}/{slice_name}/memory.stat")
        if data is None:
            return None
        if self.mode == "unified":
            anon, mapped = _stat_value(data, b"anon"), _stat_value(data, b"file_mapped")
        else:  # the total_ keys count the whole subtree, not only the slice's own tasks
            anon, mapped = _stat_value(data, b"total_rss"), _stat_value(data, b"total_mapped_file")
        return None if anon is None or mapped is None else anon + mapped


def _whitelisted_ticks(
    procs: list[tuple[int, ProcStat]], prev: _UserState | None
) -> tuple[int, dict[int, tuple[int, int]]]:
    """Clock ticks a slice's whitelisted processes used since ``prev``, and their totals.

    A process seen before (same pid and start time) counts its growth. A new one
    counts all its CPU if it started after the previous read, since all of it falls
    in the interval; otherwise none, as its earlier share is unknown. Processes that
    exited are dropped by not being carried over.
    """
    known = prev.pids if prev is not None else {}
    since = None
    if prev is not None:
        since = prev.pids_uptime if prev.pids_uptime is not None else prev.uptime
    since_ticks = None if since is None else since * CLK_TCK
    ticks = 0
    seen: dict[int, tuple[int, int]] = {}
    for pid, stat in procs:
        seen[pid] = (stat.start_ticks, stat.cpu_ticks)
        old = known.get(pid)
        if old is not None and old[0] == stat.start_ticks:
            ticks += max(0, stat.cpu_ticks - old[1])
        elif since_ticks is not None and stat.start_ticks >= since_ticks:
            ticks += stat.cpu_ticks  # started within the interval (a reused pid too)
    return ticks, seen


def _sample(
    uid: int,
    state: _UserState,
    prev: _UserState | None,
    memory: int | None,
    white_ticks: int,
    frozen: bool,
) -> Sample:
    if prev is None or state.time <= prev.time:
        return Sample(uid, None, state.cpu_usec, memory, None, None, frozen)
    interval = state.time - prev.time
    white_cores = white_ticks / CLK_TCK / interval
    cores = None
    # A total that went down belongs to a new slice of the same name.
    if state.cpu_usec is not None and prev.cpu_usec is not None and state.cpu_usec >= prev.cpu_usec:
        slice_cores = (state.cpu_usec - prev.cpu_usec) / 1e6 / interval
        cores = max(0.0, slice_cores - white_cores)
    return Sample(uid, cores, state.cpu_usec, memory, white_cores, interval, frozen)
