"""What cgpolicy reads or writes in cgroupfs itself: the mode, and the v1 freezer.

systemd owns the user slices' cgroups and is asked first for everything. The
exception is freezing on a cgroup v1 node, where systemd refuses (it only
freezes through cgroup v2's cgroup.freeze). There the kernel's v1 freezer
controller, which systemd does not manage, holds the slice's tasks instead.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from pathlib import Path

from .errors import FreezeError

CGROUP_ROOT = Path("/sys/fs/cgroup")
V1_FREEZER_GROUP = "cgpolicy"  # our directory under the v1 freezer hierarchy

_STATES = {"THAWED": "running", "FREEZING": "freezing", "FROZEN": "frozen"}


def cgroup_mode(root: Path = CGROUP_ROOT) -> str:
    """'unified' (v2), 'hybrid' (v1 controllers, v2 for systemd) or 'legacy' (v1)."""
    if (root / "cgroup.controllers").exists():
        return "unified"
    if (root / "unified" / "cgroup.controllers").exists():
        return "hybrid"
    return "legacy"


def _write(path: Path, text: str, deadline: float) -> None:
    """Write one value to a cgroup file, retrying while the kernel says EBUSY."""
    while True:
        try:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
            return
        except OSError as err:
            if err.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
        time.sleep(0.01)


def _pids_below(directory: Path) -> set[int]:
    pids: set[int] = set()
    for procs in directory.rglob("cgroup.procs"):
        try:
            pids.update(int(line) for line in procs.read_text().split())
        except (OSError, ValueError):
            continue  # a cgroup removed while we walk has no tasks left to hold
    return pids


def _move(pids: set[int], procs_file: Path, deadline: float) -> None:
    for pid in pids:
        try:
            _write(procs_file, str(pid), deadline)
        except ProcessLookupError:
            continue  # exited meanwhile


class V1Freezer:
    """Freeze a user slice's tasks in ``freezer/cgpolicy/user-UID.slice``."""

    def __init__(self, root: Path = CGROUP_ROOT, timeout: float = 10.0) -> None:
        self.hierarchy = root / "freezer"
        self.systemd_tree = root / "systemd"  # systemd's own v1 hierarchy holds every task
        self.timeout = timeout

    def available(self) -> bool:
        return self.hierarchy.is_dir()

    def group_dir(self, uid: int) -> Path:
        return self.hierarchy / V1_FREEZER_GROUP / f"user-{uid}.slice"

    def state(self, uid: int) -> str:
        """'running', 'freezing' or 'frozen', in systemd's words."""
        try:
            raw = (self.group_dir(uid) / "freezer.state").read_text().strip()
        except FileNotFoundError:
            return "running"
        return _STATES.get(raw, raw.lower())

    def freeze(self, uid: int, control_group: str) -> None:
        """Freeze every task of the slice whose systemd cgroup path is ``control_group``."""
        if not self.hierarchy.is_dir():
            raise FreezeError("this node has no cgroup v1 freezer hierarchy")
        deadline = time.monotonic() + self.timeout
        group = self.group_dir(uid)
        group.mkdir(parents=True, exist_ok=True)
        state_file = group / "freezer.state"
        # Frozen first, then fill: a task moved in is frozen on arrival, so none
        # runs on in between, and a frozen task cannot fork a new one to chase.
        _write(state_file, "FROZEN", deadline)
        source = self.systemd_tree / control_group.lstrip("/")
        moved: set[int] = set()
        while True:
            pending = _pids_below(source) - moved
            if not pending:
                break
            _move(pending, group / "cgroup.procs", deadline)
            moved |= pending
            if time.monotonic() > deadline:
                break
        while (state := self.state(uid)) != "frozen":
            if time.monotonic() > deadline:
                self.thaw(uid)
                raise FreezeError(
                    f"user-{uid}.slice stayed {state} for {self.timeout:g}s; thawed it again"
                )
            _write(state_file, "FROZEN", deadline)  # the kernel retries tasks it could not catch
            time.sleep(0.01)

    def thaw(self, uid: int) -> None:
        group = self.group_dir(uid)
        if not group.is_dir():
            return
        deadline = time.monotonic() + self.timeout
        _write(group / "freezer.state", "THAWED", deadline)
        while self.state(uid) != "running":
            if time.monotonic() > deadline:
                raise FreezeError(f"user-{uid}.slice did not thaw in {self.timeout:g}s")
            time.sleep(0.01)
        # Hand the tasks back to the hierarchy's root and remove our group, so a
        # thawed node looks as if cgpolicy had never frozen anyone.
        _move(_pids_below(group), self.hierarchy / "cgroup.procs", deadline)
        with contextlib.suppress(OSError):  # a task on its way out; an empty group is harmless
            group.rmdir()
