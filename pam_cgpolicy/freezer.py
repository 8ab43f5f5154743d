"""The kernel's v1 freezer: freezing a user on a cgroup v1 node, where systemd cannot.

A frozen user's tasks are held in ``freezer/cgpolicy/user-UID.slice``, a group
systemd does not manage, whose parent only root may read: other users cannot
list who is frozen. A task that enters the slice later (a new login, cron,
``systemd --user``) would start in the hierarchy's root and run, so the slice
is swept: at freeze, by cgpolicyd at every cycle, and by the login hook, which
holds a frozen user's new login as cgroup v2 does (see README). At thaw each
task goes back to the freezer group it came from: the few that did not come
from the hierarchy's root are recorded, root-only, in the state directory.

Imported by the login hook: plain os, no pathlib.
"""

from __future__ import annotations

import errno
import os
import time

from .constants import state_dir
from .errors import FreezeError

CGROUP_DIR = "/sys/fs/cgroup"
V1_FREEZER_GROUP = "cgpolicy"  # our directory under the v1 freezer hierarchy
_STATES = {"THAWED": "running", "FREEZING": "freezing", "FROZEN": "frozen"}
_PROCS = "cgroup.procs"
_ROOT_ONLY = 0o700


def _write(path: str, text: str, deadline: float) -> None:
    """Write one value to a cgroup file, retrying while the kernel says EBUSY."""
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
            return
        except OSError as err:
            if err.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
        time.sleep(0.01)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as source:
            return source.read()
    except OSError:  # a cgroup removed or a task gone while we look
        return None


def _pids_in(directory: str) -> set[int]:
    text = _read(f"{directory}/{_PROCS}") or ""
    return {int(pid) for pid in text.split() if pid.isdigit()}


def _pids_below(directory: str) -> set[int]:
    """The tasks of a cgroup and all its descendants."""
    pids: set[int] = set()
    for current, _dirs, _files in os.walk(directory):
        pids |= _pids_in(current)
    return pids


def _freezer_group(pid: int) -> str | None:
    """The task's group in the v1 freezer hierarchy, from /proc/PID/cgroup."""
    for line in (_read(f"/proc/{pid}/cgroup") or "").splitlines():
        _, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if "freezer" in controllers.split(","):
            return path
    return None


def start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat: tells a task from a later one with the same pid."""
    text = _read(f"/proc/{pid}/stat")
    fields = text[text.rfind(")") + 2 :].split() if text else []
    return fields[19] if len(fields) > 19 else None


class V1Freezer:
    """Freeze, sweep and thaw a user slice's tasks in the v1 freezer hierarchy."""

    def __init__(
        self, root: str | os.PathLike[str] = CGROUP_DIR, timeout: float = 10.0, records: str = ""
    ) -> None:
        self.hierarchy = os.path.join(root, "freezer")
        self.base = os.path.join(self.hierarchy, V1_FREEZER_GROUP)
        self.systemd_tree = os.path.join(root, "systemd")  # systemd's own v1 hierarchy
        self.records = records or os.path.join(state_dir(), "v1-freezer")
        self.timeout = timeout

    def available(self) -> bool:
        return os.path.isdir(self.hierarchy)

    def group_dir(self, uid: int) -> str:
        return f"{self.base}/user-{uid}.slice"

    def _records_dir(self, uid: int) -> str:
        return f"{self.records}/user-{uid}.slice"

    def state(self, uid: int) -> str:
        """'running', 'freezing' or 'frozen', in systemd's words."""
        raw = (_read(f"{self.group_dir(uid)}/freezer.state") or "THAWED").strip()
        return _STATES.get(raw, raw.lower())

    def frozen_uids(self) -> list[int]:
        """The uids whose group is frozen, or freezing."""
        try:
            names = os.listdir(self.base)
        except OSError:
            return []
        uids = []
        for name in names:
            number = name.removeprefix("user-").removesuffix(".slice")
            valid = name == f"user-{number}.slice" and number.isdigit()
            if valid and self.state(int(number)) != "running":
                uids.append(int(number))
        return sorted(uids)

    def freeze(self, uid: int) -> None:
        """Freeze every task of user-UID.slice, and what enters it until thaw."""
        if not self.available():
            raise FreezeError("this node has no cgroup v1 freezer hierarchy")
        deadline = time.monotonic() + self.timeout
        if not os.path.isdir(self.base):
            os.mkdir(self.base, _ROOT_ONLY)
        os.chmod(self.base, _ROOT_ONLY)  # cgroupfs creates directories readable by all
        group = self.group_dir(uid)
        if not os.path.isdir(group):
            os.mkdir(group)
        # Frozen first, then fill: a task moved in is frozen on arrival, so none
        # runs on in between, and a frozen task cannot fork a new one to chase.
        _write(f"{group}/freezer.state", "FROZEN", deadline)
        self.sweep(uid, deadline)
        while (state := self.state(uid)) != "frozen":
            if time.monotonic() > deadline:
                self.thaw(uid)
                raise FreezeError(
                    f"user-{uid}.slice stayed {state} for {self.timeout:g}s; thawed it again"
                )
            _write(f"{group}/freezer.state", "FROZEN", deadline)  # the kernel retries stragglers
            time.sleep(0.01)

    def sweep(self, uid: int, deadline: float | None = None, spare: int = 0) -> int:
        """Move the slice's tasks that are not held yet into the frozen group; how many.

        Does nothing unless the user is frozen. ``spare`` is a pid left out: the
        login hook's own, so that it can still exit and let PAM go on.
        """
        if self.state(uid) == "running":
            return 0
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        group = self.group_dir(uid)
        source = f"{self.systemd_tree}/user.slice/user-{uid}.slice"
        moved: set[int] = set()
        while time.monotonic() <= deadline:
            pending = _pids_below(source) - _pids_in(group) - moved - {spare}
            if not pending:
                break
            for pid in pending:
                self._hold(uid, pid, group, deadline)
            moved |= pending
        return len(moved)

    def _hold(self, uid: int, pid: int, group: str, deadline: float) -> None:
        origin = _freezer_group(pid)
        if origin not in (None, "/", group.removeprefix(self.hierarchy)):
            self._record(uid, pid, origin)
        try:  # noqa: SIM105 (the hook does not load contextlib)
            _write(f"{group}/{_PROCS}", str(pid), deadline)
        except ProcessLookupError:
            pass  # exited meanwhile

    def _record(self, uid: int, pid: int, origin: str) -> None:
        """Where the task was, to put it back at thaw; root-only like the state directory."""
        start = start_time(pid)
        if start is None:
            return
        directory = self._records_dir(uid)
        os.makedirs(directory, _ROOT_ONLY, exist_ok=True)
        temporary = f"{directory}/.{pid}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, f"{start} {origin}".encode())
        finally:
            os.close(fd)
        os.rename(temporary, f"{directory}/{pid}")

    def _origins(self, uid: int) -> dict[int, str]:
        """The recorded groups of the tasks still alive (same pid, same start time)."""
        directory = self._records_dir(uid)
        origins = {}
        for name in os.listdir(directory) if os.path.isdir(directory) else ():
            start, _, origin = (_read(f"{directory}/{name}") or "").partition(" ")
            if name.isdigit() and origin.startswith("/") and start_time(int(name)) == start:
                origins[int(name)] = origin
        return origins

    def _forget(self, uid: int) -> None:
        directory = self._records_dir(uid)
        for name in os.listdir(directory) if os.path.isdir(directory) else ():
            os.unlink(f"{directory}/{name}")
        if os.path.isdir(directory):
            os.rmdir(directory)

    def thaw(self, uid: int) -> None:
        """Thaw the user, and put each task back in the freezer group it came from."""
        group = self.group_dir(uid)
        if not os.path.isdir(group):
            return
        deadline = time.monotonic() + self.timeout
        _write(f"{group}/freezer.state", "THAWED", deadline)
        while self.state(uid) != "running":
            if time.monotonic() > deadline:
                raise FreezeError(f"user-{uid}.slice did not thaw in {self.timeout:g}s")
            time.sleep(0.01)
        origins = self._origins(uid)
        for pid in _pids_in(group):
            self._restore(pid, origins.get(pid, "/"), deadline)
        self._forget(uid)
        # Remove our group, so a thawed node looks as if cgpolicy had never frozen anyone.
        try:  # noqa: SIM105 (the hook does not load contextlib)
            os.rmdir(group)
        except OSError:
            pass  # a task on its way out; an empty group is harmless

    def _restore(self, pid: int, origin: str, deadline: float) -> None:
        back = os.path.normpath(self.hierarchy + origin)
        for directory in (back, self.hierarchy):
            if not directory.startswith(self.hierarchy):
                continue
            try:
                _write(f"{directory}/{_PROCS}", str(pid), deadline)
                return
            except ProcessLookupError:
                return  # exited meanwhile
            except OSError:
                continue  # its old group is gone: the root, like any other task


def hold_frozen_login(uid: int, deadline: float) -> int:
    """At a login of a user frozen on cgroup v1: the login joins the frozen group.

    Everything of the slice but the hook itself: sshd's session process then
    stops where it waits for the hook, and the login goes on at thaw, as on
    cgroup v2. A no-op (one failed open) for users who are not frozen.
    """
    return V1Freezer().sweep(uid, deadline, spare=os.getpid())
