"""Evict a runaway job to a checkpoint on disk instead of killing it, and bring it back.

cgpolicyctl evict freezes the user, picks one process tree of their slice (the
one using the most memory, or the one under --pid), thaws, checkpoints it with CRIU
into a root-only directory under the state directory, checks the images, and
only then kills the tree.
A tree CRIU cannot dump (an established TCP connection, a terminal) keeps
running: the failure is reported and nothing is killed. cgpolicyctl restore
brings a checkpoint back on the same node, detached from any terminal, in a
scope of the user's slice.

A checkpoint waits for its restore exactly while its directory holds both its
record (checkpoint.json, written once the dump is verified) and CRIU's
inventory image (removed after a failed dump and at the restore, before the
record changes): the login hook reads that much from the directory to tell the
user, without reading the record.

Nothing the user controls steers root here: checkpoint ids are made by us and
checked before they name a directory, and every pid is read from the user's
own cgroup while the user is frozen, and again (with its start time) before
the dump and before it is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from .cgroups import CGROUP_ROOT, cgroup_mode
from .constants import CHECKPOINT_INVENTORY, CHECKPOINT_META, checkpoints_dir, slice_name
from .errors import EvictError
from .freezer import start_time
from .slicelimits import format_size

CRIU = "criu"
SYSTEMD_RUN = "systemd-run"
DUMP_TIMEOUT = 900.0  # seconds: writing a few GB of pages on a busy disk
RESTORE_TIMEOUT = 300.0
RESTORE_SETTLE = 2.0  # seconds a restored job must live before restore says done
# What a dump must leave free to the node's users where the checkpoints live (often
# the file system of /home and /tmp too): a full disk fails every job's next write,
# the restored job's first of all.
USERS_ROOM = 256 * 2**20
# What a restored job must leave free under the slice's MemoryMax: the user's next
# login (sshd, a shell, the hook) is charged there too, and over MemoryMax the
# kernel's OOM killer picks the largest task, the job.
RESTORE_HEADROOM = 64 * 2**20
ID_PATTERN = re.compile(r"(?P<uid>[1-9][0-9]*)-(?P<when>[0-9]{8}T[0-9]{6}Z)-[0-9a-f]{6}")
# What a complete dump holds whatever the job: CRIU writes these last two only
# once the whole tree is collected, and says so in the last line of its log.
REQUIRED_IMAGES = (CHECKPOINT_INVENTORY, "pstree.img")
DUMP_LOG = "dump.log"
RESTORE_LOG = "restore.log"
META = CHECKPOINT_META
DUMP_DONE = "Dumping finished successfully"
RESTORE_DONE = "Restore finished successfully"
_ROOT_ONLY = 0o700


@dataclass(frozen=True)
class Task:
    """One process of the user's slice, as /proc showed it while the user was frozen."""

    pid: int
    ppid: int
    uid: int
    rss: int  # bytes
    command: str
    manager: bool = False  # the user's own service manager: never evicted, never a tree's part


@dataclass(frozen=True)
class Tree:
    """The process tree to evict: its root, every pid in it, their summed memory."""

    root: int
    pids: tuple[int, ...]
    rss: int
    command: str


@dataclass
class Checkpoint:
    """What checkpoint.json records beside the images; the id names the directory."""

    id: str
    uid: int
    user: str
    root: int
    pids: list[int]
    rss: int
    command: str
    time: float
    state: str  # "dumped", "failed" or "restored"


# -- pure parts -------------------------------------------------------------


def new_id(uid: int, now: float, token: str | None = None) -> str:
    """A checkpoint id: the uid, the UTC time and a random part; never a user's word."""
    when = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")
    cid = f"{uid}-{when}-{token or secrets.token_hex(3)}"
    if not ID_PATTERN.fullmatch(cid):
        raise ValueError(f"not a checkpoint id: {cid!r}")
    return cid


def checked_id(text: str) -> str:
    """An id given on the command line, refused unless it is one of ours in form."""
    if not ID_PATTERN.fullmatch(text):
        raise EvictError(f"{text!r} is not a checkpoint id (UID-YYYYmmddTHHMMSSZ-xxxxxx)")
    return text


def _children(tasks: Mapping[int, Task]) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for task in tasks.values():
        children.setdefault(task.ppid, []).append(task.pid)
    return children


def subtree(tasks: Mapping[int, Task], root: int) -> tuple[int, ...]:
    """``root`` and its descendants in the slice, parents first."""
    children = _children(tasks)
    order, pending = [], [root]
    while pending:
        pid = pending.pop(0)
        order.append(pid)
        pending.extend(sorted(children.get(pid, ())))
    return tuple(order)


def _evictable(task: Task, uid: int) -> bool:
    return task.uid == uid and not task.manager


def tree_roots(tasks: Mapping[int, Task], uid: int) -> list[int]:
    """The tops of the user's own process trees: tasks whose parent is not one of
    theirs (sshd's privileged half, init, the user's service manager)."""
    return sorted(
        task.pid
        for task in tasks.values()
        if _evictable(task, uid) and not (task.ppid in tasks and _evictable(tasks[task.ppid], uid))
    )


def _tree(tasks: Mapping[int, Task], root: int) -> Tree:
    pids = subtree(tasks, root)
    return Tree(root, pids, sum(tasks[pid].rss for pid in pids), tasks[root].command)


def choose_tree(tasks: Mapping[int, Task], uid: int, pid: int | None = None) -> Tree:
    """The tree under ``pid``, or the user's tree using the most memory.

    A tree with a task that is not the user's (a setuid helper) is never chosen:
    CRIU would checkpoint it with root's rights.
    """
    if pid is not None:
        task = tasks.get(pid)
        if task is None:
            raise EvictError(f"pid {pid} is not in {slice_name(uid)}")
        if not _evictable(task, uid):
            raise EvictError(f"pid {pid} ({task.command}) is not the user's own job")
        tree = _tree(tasks, pid)
    else:
        trees = [_tree(tasks, root) for root in tree_roots(tasks, uid)]
        if not trees:
            raise EvictError(f"{slice_name(uid)} has no process of uid {uid}")
        tree = max(trees, key=lambda tree: (tree.rss, -tree.root))
    strangers = [p for p in tree.pids if not _evictable(tasks[p], uid)]
    if strangers:
        raise EvictError(f"the tree of pid {tree.root} holds pids {strangers} of another user")
    return tree


def verify_dump(directory: str, returncode: int, log_text: str) -> list[str]:
    """Why the dump in ``directory`` is not a complete image; empty when it is."""
    problems = []
    if returncode != 0:
        problems.append(f"criu dump exited with status {returncode}")
    if DUMP_DONE not in log_text:
        problems.append(f"the log does not end with {DUMP_DONE!r}")
    for name in REQUIRED_IMAGES:
        path = os.path.join(directory, name)
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            problems.append(f"{name} is missing or empty")
    return problems


def room_problem(tree: Tree, free_to_users: int) -> str | None:
    """Why the file system with ``free_to_users`` bytes cannot take the tree's images;
    None when it can. The images hold the tree's resident pages, about its memory."""
    if free_to_users - tree.rss >= USERS_ROOM:
        return None
    return (
        f"its images take about {format_size(tree.rss)} and {checkpoints_dir()} has "
        f"{format_size(max(free_to_users, 0))} free to users, who must keep "
        f"{format_size(USERS_ROOM)}"
    )


def memory_problem(checkpoint: Checkpoint, room: int | None) -> str | None:
    """Why the user's slice, ``room`` bytes under its MemoryMax, cannot take the job
    back; None when it can (or has no MemoryMax). Over it, the kernel's OOM killer
    would end the job the eviction saved."""
    if room is None or checkpoint.rss + RESTORE_HEADROOM <= room:
        return None
    return (
        f"the job held {format_size(checkpoint.rss)} and {slice_name(checkpoint.uid)} "
        f"has {format_size(max(room, 0))} left under its MemoryMax, of which "
        f"{format_size(RESTORE_HEADROOM)} stays for logins: it would be killed "
        f"for want of memory. Its images are kept; restore it once the slice has room "
        f"(when its penalty ends, or after cgpolicyctl release {checkpoint.user})"
    )


def log_tail(text: str, lines: int = 6) -> str:
    """The last lines of a CRIU log where it says what went wrong."""
    wanted = [line for line in text.splitlines() if "Error" in line or "error" in line]
    return "\n".join((wanted or text.splitlines())[-lines:])


def dump_argv(root: int, directory: str) -> list[str]:
    # --leave-stopped: the tree stays stopped after the dump, so it is killed only
    # once the images are checked; after a failed dump CRIU lets it run on.
    # No --tcp-established or --shell-job: such a job would come back broken.
    return [CRIU, "dump", "--tree", str(root), "--images-dir", directory, "--leave-stopped",
            "--log-file", DUMP_LOG, "-v4"]  # fmt: skip


def restore_argv(checkpoint: Checkpoint, directory: str) -> list[str]:
    # A scope of the user's slice holds CRIU and, once it detaches (-d), the job:
    # its memory counts against the user again, on cgroup v2 and v1 alike.
    # --manage-cgroups=ignore: the job stays where CRIU runs, not in the cgroups of
    # the session it was dumped from, which may be gone.
    return [
        SYSTEMD_RUN, "--scope", "--quiet", "--collect",
        f"--unit=cgpolicy-restore-{checkpoint.id}", f"--slice={slice_name(checkpoint.uid)}",
        CRIU, "restore", "--restore-detached", "--images-dir", directory,
        "--manage-cgroups=ignore", "--log-file", RESTORE_LOG, "-v4",
    ]  # fmt: skip


# -- the node -----------------------------------------------------------------


def slice_cgroup(uid: int) -> str:
    """The user's slice in the hierarchy systemd keeps (v1: its own, named one)."""
    base = str(CGROUP_ROOT) if cgroup_mode() == "unified" else f"{CGROUP_ROOT}/systemd"
    return f"{base}/user.slice/{slice_name(uid)}"


def _status(pid: int) -> dict[str, str]:
    fields = {}
    with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as source:
        for line in source:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as source:
            words = source.read().rstrip(b"\0").split(b"\0")
    except OSError:
        return "?"
    return " ".join(word.decode(errors="replace") for word in words)[:200] or "?"


def read_tasks(uid: int) -> dict[int, Task]:
    """Every process of the user's slice, from its cgroup (read while frozen)."""
    top = slice_cgroup(uid)
    manager = f"{top}/user@{uid}.service/init.scope"
    tasks = {}
    for directory, _dirs, files in os.walk(top):
        if "cgroup.procs" not in files:
            continue
        with open(f"{directory}/cgroup.procs", encoding="ascii") as source:
            pids = [int(word) for word in source.read().split()]
        for pid in pids:
            try:
                status = _status(pid)
            except OSError:
                continue  # gone
            rss = int(status.get("VmRSS", "0 kB").split()[0]) * 1024
            tasks[pid] = Task(
                pid=pid,
                ppid=int(status["PPid"]),
                uid=int(status["Uid"].split()[0]),
                rss=rss,
                command=_command(pid),
                manager=directory == manager,
            )
    return tasks


def _private_dir(path: str) -> None:
    """``path`` exists as root's own 0700 directory, and is no link to elsewhere."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, _ROOT_ONLY)
    info = os.lstat(path)
    if not os.path.isdir(path) or os.path.islink(path) or info.st_uid != os.geteuid():
        raise EvictError(f"{path} is not root's own directory")
    os.chmod(path, _ROOT_ONLY)


def checkpoint_dir(cid: str) -> str:
    return os.path.join(checkpoints_dir(), checked_id(cid))


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as source:
            return source.read()
    except OSError:
        return ""


def _save(checkpoint: Checkpoint, directory: str) -> None:
    temporary = os.path.join(directory, f".{META}")
    with open(temporary, "w", encoding="utf-8") as out:
        json.dump(asdict(checkpoint), out, indent=2)
    os.rename(temporary, os.path.join(directory, META))


def _remove_images(directory: str) -> None:
    """Remove a checkpoint's images, the inventory first: from then on the user's
    login no longer names the checkpoint as waiting (loginmessage.waiting_checkpoints)."""
    names = sorted(os.listdir(directory), key=lambda name: name != CHECKPOINT_INVENTORY)
    for name in names:
        if name.endswith(".img"):
            os.unlink(os.path.join(directory, name))


def load(cid: str) -> Checkpoint:
    directory = checkpoint_dir(cid)
    info = os.lstat(directory) if os.path.lexists(directory) else None
    if info is None or not os.path.isdir(directory) or os.path.islink(directory):
        raise EvictError(f"no checkpoint {cid}")
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise EvictError(f"{directory} is not root's alone; refusing it")
    try:
        return Checkpoint(**json.loads(_read(os.path.join(directory, META))))
    except (TypeError, ValueError):
        raise EvictError(f"checkpoint {cid} has no readable {META}") from None


def dump(tree: Tree, uid: int, user: str, now: float, start: str | None) -> Checkpoint:
    """Checkpoint ``tree`` into a new directory; the tree is left stopped, not killed.

    On any failure the images are removed (the log is kept), the tree runs on,
    and EvictError says why.
    """
    _private_dir(checkpoints_dir())
    disk = os.statvfs(checkpoints_dir())
    problem = room_problem(tree, disk.f_bavail * disk.f_frsize)  # not root's reserve
    if problem:
        raise EvictError(
            f"no room to checkpoint pid {tree.root} ({tree.command}); it keeps running, "
            f"nothing was killed: {problem}"
        )
    cid = new_id(uid, now)
    directory = os.path.join(checkpoints_dir(), cid)
    os.mkdir(directory, _ROOT_ONLY)
    checkpoint = Checkpoint(
        cid, uid, user, tree.root, list(tree.pids), tree.rss, tree.command, now, "dumped"
    )
    try:
        done = subprocess.run(
            dump_argv(tree.root, directory),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=DUMP_TIMEOUT,
            check=False,
        )
        returncode = done.returncode
    except subprocess.TimeoutExpired:
        returncode = -1
    log_text = _read(os.path.join(directory, DUMP_LOG))
    problems = verify_dump(directory, returncode, log_text)
    if problems:
        if returncode in (0, -1):  # CRIU left it stopped, or was killed holding it
            signal_tree(uid, tree.root, start, signal.SIGCONT)
        checkpoint.state = "failed"
        _remove_images(directory)
        _save(checkpoint, directory)
        raise EvictError(
            f"could not checkpoint pid {tree.root} ({tree.command}); it keeps running, "
            f"nothing was killed. {'; '.join(problems)}. CRIU's log "
            f"({os.path.join(directory, DUMP_LOG)}) ends:\n{log_tail(log_text)}"
        )
    _save(checkpoint, directory)
    return checkpoint


def same_process(uid: int, pid: int, start: str | None) -> dict[int, Task] | None:
    """The slice's tasks if ``pid`` is still there with start time ``start``; else None
    (it ended, or its number now belongs to someone else)."""
    tasks = read_tasks(uid)
    return tasks if pid in tasks and start is not None and start_time(pid) == start else None


def signal_tree(uid: int, root: int, start: str | None, signum: int) -> list[int]:
    """Send ``signum`` to the tree under ``root`` as it is now in the slice, if its
    root is still the process chosen; the pids signalled."""
    tasks = same_process(uid, root, start)
    sent = []
    for pid in subtree(tasks, root) if tasks else ():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
            sent.append(pid)
    return sent


def kill_tree(checkpoint: Checkpoint, start: str | None) -> list[int]:
    """SIGKILL the dumped tree (CRIU holds it stopped, so it cannot fork)."""
    return signal_tree(checkpoint.uid, checkpoint.root, start, signal.SIGKILL)


def evict(
    uid: int,
    user: str,
    pid: int | None,
    freeze: Callable[[], object],
    thaw: Callable[[], object],
) -> Checkpoint:
    """Freeze to choose, thaw, dump, check, kill: the whole eviction of one tree.

    The user is frozen while the tree is chosen, so that what is read of the
    slice holds still; thawed before the dump because CRIU stops the tree
    itself and cannot seize a task that a cgroup freezer holds (it would wait
    forever on cgroup v2).
    """
    freeze()
    try:
        tree = choose_tree(read_tasks(uid), uid, pid)
        start = start_time(tree.root)
    finally:
        thaw()
    if same_process(uid, tree.root, start) is None:
        raise EvictError(f"pid {tree.root} ended or left the slice; nothing was done")
    checkpoint = dump(tree, uid, user, time.time(), start)
    kill_tree(checkpoint, start)
    return checkpoint


def running_as(pid: int, uid: int) -> bool:
    try:
        return int(_status(pid)["Uid"].split()[0]) == uid
    except (OSError, KeyError, ValueError):
        return False


def restore(cid: str, room: Callable[[int], int | None]) -> tuple[Checkpoint, str]:
    """Bring a dumped checkpoint back in the user's slice; returns it and the scope.

    ``room(uid)``: the bytes the user's slice can still take under its MemoryMax
    (None: no limit), asked only of a checkpoint that would be restored."""
    checkpoint = load(cid)
    if checkpoint.state != "dumped":
        raise EvictError(f"checkpoint {cid} is {checkpoint.state}, not restorable")
    problem = memory_problem(checkpoint, room(checkpoint.uid))
    if problem is not None:
        raise EvictError(f"checkpoint {cid} not restored: {problem}")
    directory = checkpoint_dir(cid)
    argv = restore_argv(checkpoint, directory)
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=RESTORE_TIMEOUT,
            check=False,
            start_new_session=True,  # no terminal of the admin's reaches the job
        )
        returncode, output = done.returncode, done.stderr
    except subprocess.TimeoutExpired:
        returncode, output = -1, "timed out"
    log_text = _read(os.path.join(directory, RESTORE_LOG))
    if returncode != 0 or RESTORE_DONE not in log_text:
        raise EvictError(
            f"could not restore checkpoint {cid} (status {returncode}); its images are kept. "
            f"{output.strip()}\nCRIU's log ({os.path.join(directory, RESTORE_LOG)}) ends:\n"
            f"{log_tail(log_text)}"
        )
    time.sleep(RESTORE_SETTLE)
    if not running_as(checkpoint.root, checkpoint.uid):
        raise EvictError(
            f"CRIU reported checkpoint {cid} restored, but pid {checkpoint.root} is not "
            f"running {RESTORE_SETTLE:g}s later; its images are kept"
        )
    _remove_images(directory)  # the job runs again: its pages are stale
    checkpoint.state = "restored"
    _save(checkpoint, directory)
    return checkpoint, f"cgpolicy-restore-{cid}.scope"
