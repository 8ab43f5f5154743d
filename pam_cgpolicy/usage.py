"""Per-user CPU and memory usage for cgpolicyd, read from the user slices' cgroups.

Each cycle the daemon passes the active uids to sample(). It reads each slice's
cumulative CPU time and its memory, on cgroup v2 and v1 alike, and averages the
CPU over the time since that uid's previous sample. The CPU of whitelisted
processes (sshd, scp, rsync...) over the same interval, read from /proc, is taken
off, so that moving files around is not heavy use; memory is never reduced.

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

CLK_TCK = os.sysconf("SC_CLK_TCK")
COMM_LEN = 15  # the kernel keeps the first 15 bytes of a process name (TASK_COMM_LEN - 1)

_SLICE = re.compile(r"user-(0|[1-9][0-9]*)\.slice")
_CHUNK = 16384  # every single-value cgroup or /proc file we read is smaller
# Where a v1 node mounts cpuacct: Debian co-mounts it with cpu; others on its own.
_CPUACCT_DIRS = ("cpu,cpuacct", "cpuacct,cpu", "cpuacct")
_NO_NAMES: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Sample:
    """One uid's usage over the interval ending at a sample.

    ``cores`` is the slice's CPU averaged over ``interval`` less the whitelisted
    processes' share, never below 0; it and ``interval`` are None at the first
    sample of a uid, or when the slice's CPU could not be read now or before.
    """

    uid: int
    cores: float | None
    cpu_usec_total: int | None  # the slice's cumulative CPU time, as read
    memory_bytes: int | None  # anonymous plus mapped-file memory of the slice
    whitelisted_cores: float | None  # None when there was no interval to average over
    interval: float | None  # seconds since this uid's previous sample


@dataclass(frozen=True, slots=True)
class ProcStat:
    """What the whitelist needs from /proc/PID/stat."""

    comm: str  # the same task name /proc/PID/comm shows
    cpu_ticks: int  # utime + stime, in clock ticks
    start_ticks: int  # starttime: clock ticks after boot


@dataclass(slots=True)
class _UserState:
    time: float  # the caller's clock at the previous sample
    uptime: float | None  # /proc/uptime at the previous sample
    cpu_usec: int | None
    pids_uptime: float | None = None  # /proc/uptime when ``pids`` were read
    pids: dict[int, tuple[int, int]] = field(default_factory=dict)  # pid: (start, cpu ticks)


def parse_proc_stat(data: bytes) -> ProcStat | None:
    """Parse /proc/PID/stat; None for a short or garbled read."""
    # The name is in parentheses and may itself hold ") (": only the last ')' ends it.
    opening = data.find(b"(")
    closing = data.rfind(b")")
    if opening < 0 or closing < opening:
        return None
    fields = data[closing + 2 :].split()  # fields[0] is field 3, state
    if len(fields) < 20:
        return None
    try:
        cpu = int(fields[11]) + int(fields[12])  # utime, stime
        start = int(fields[19])
    except ValueError:
        return None
    return ProcStat(os.fsdecode(data[opening + 1 : closing]), cpu, start)


def _read(path: str) -> bytes | None:
    """A small file with a single value or record, in one read; None if unreadable."""
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


def _read_list(path: str) -> bytes | None:
    """A file of many records (cgroup.procs), read to the end.

    seq_file may return less than asked before the end, so a short read proves nothing.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        parts = []
        while chunk := os.read(fd, _CHUNK):
            parts.append(chunk)
        return b"".join(parts)
    except OSError:
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


def _comm_names(names: frozenset[str]) -> frozenset[str]:
    """Whitelist names cut as the kernel cuts process names, so long names still match."""
    return frozenset(os.fsdecode(os.fsencode(name)[:COMM_LEN]) for name in names)


class UsageSampler:
    """Reads the user slices' usage; keeps each uid's previous totals between samples."""

    def __init__(
        self,
        root: Path = CGROUP_ROOT,
        proc: Path = Path("/proc"),
        mode: str | None = None,
    ) -> None:
        self.mode = mode or cgroup_mode(root)
        if self.mode == "unified":
            self._tasks_dir = f"{root}/user.slice"
            self._cpu_dir = self._memory_dir = self._tasks_dir
        elif self.mode in ("hybrid", "legacy"):
            # v1: systemd's own named hierarchy has every slice and all its tasks.
            self._tasks_dir = f"{root}/systemd/user.slice"
            cpuacct = next((d for d in _CPUACCT_DIRS if (root / d).is_dir()), _CPUACCT_DIRS[0])
            self._cpu_dir = f"{root}/{cpuacct}/user.slice"
            self._memory_dir = f"{root}/memory/user.slice"
        else:
            raise ValueError(f"unknown cgroup mode {self.mode!r}")
        self._proc = str(proc)
        self._users: dict[int, _UserState] = {}

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

        ``whitelist`` holds process names, for all uids alike or per uid (a uid not
        in the mapping has none). A uid left out of a call is forgotten: its next
        sample is a first one again.
        """
        uptime = self._uptime()
        per_uid, shared = (
            (whitelist, _NO_NAMES) if isinstance(whitelist, Mapping) else (None, whitelist)
        )
        # One truncated copy of each distinct whitelist per call; most uids share one.
        comm_names: dict[frozenset[str], frozenset[str]] = {}
        users: dict[int, _UserState] = {}
        samples: dict[int, Sample] = {}
        for uid in uids:
            slice_name = f"user-{uid}.slice"
            cpu_usec = self._cpu_usec(slice_name)
            memory = self._memory(slice_name)
            prev = self._users.get(uid)
            state = _UserState(now, uptime, cpu_usec)
            interval = None
            slice_cores = None
            if prev is not None and now > prev.time:
                interval = now - prev.time
                # A total that went down belongs to a new slice of the same name.
                if cpu_usec is not None and prev.cpu_usec is not None and cpu_usec >= prev.cpu_usec:
                    slice_cores = (cpu_usec - prev.cpu_usec) / 1e6 / interval

            names = per_uid.get(uid, _NO_NAMES) if per_uid is not None else shared
            white_ticks = 0
            if (
                names
                and prev is not None
                and prev.pids_uptime is not None
                and cpu_usec is not None
                and cpu_usec == prev.cpu_usec
            ):
                # Nothing in the slice ran, so no process's CPU moved: the per-process
                # totals read before are still exact, and /proc need not be read.
                state.pids, state.pids_uptime = prev.pids, prev.pids_uptime
            elif names:
                cut = comm_names.get(names)
                if cut is None:
                    cut = comm_names[names] = _comm_names(names)
                white_ticks, state.pids = self._whitelisted(slice_name, cut, prev)
                state.pids_uptime = uptime

            white_cores = None
            cores = None
            if interval is not None:
                white_cores = white_ticks / CLK_TCK / interval
                if slice_cores is not None:
                    cores = max(0.0, slice_cores - white_cores)
            users[uid] = state
            samples[uid] = Sample(uid, cores, cpu_usec, memory, white_cores, interval)
        self._users = users
        return samples

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

    def _slice_pids(self, slice_name: str) -> list[int]:
        """The processes of a slice and of all the cgroups below it."""
        pids: list[int] = []
        pending = [f"{self._tasks_dir}/{slice_name}"]
        while pending:
            directory = pending.pop()
            data = _read_list(f"{directory}/cgroup.procs")
            if data:
                pids.extend(int(pid) for pid in data.split() if pid.isdigit())
            try:
                with os.scandir(directory) as entries:
                    pending.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))
            except OSError:
                continue  # removed while we walk
        return pids

    def _whitelisted(
        self, slice_name: str, names: frozenset[str], prev: _UserState | None
    ) -> tuple[int, dict[int, tuple[int, int]]]:
        """Clock ticks the slice's whitelisted processes used since ``prev``, and their totals.

        A process seen before (same pid and start time) counts its growth. A new one
        counts all its CPU if it started after the previous read, since all of it
        falls in the interval; otherwise none, as its earlier share is unknown.
        Processes that exited are dropped by not being carried over.
        """
        known = prev.pids if prev is not None else {}
        since = None
        if prev is not None:
            since = prev.pids_uptime if prev.pids_uptime is not None else prev.uptime
        since_ticks = None if since is None else since * CLK_TCK
        ticks = 0
        seen: dict[int, tuple[int, int]] = {}
        for pid in self._slice_pids(slice_name):
            if pid in seen:
                continue  # moved between two cgroups while we walked
            data = _read(f"{self._proc}/{pid}/stat")
            stat = None if data is None else parse_proc_stat(data)
            if stat is None or stat.comm not in names:
                continue
            seen[pid] = (stat.start_ticks, stat.cpu_ticks)
            old = known.get(pid)
            if old is not None and old[0] == stat.start_ticks:
                ticks += max(0, stat.cpu_ticks - old[1])
            elif since_ticks is not None and stat.start_ticks >= since_ticks:
                ticks += stat.cpu_ticks  # started within the interval (a reused pid too)
        return ticks, seen
