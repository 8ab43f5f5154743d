"""Eviction's own decisions: which tree, the checkpoint ids, the check of a dump, and
every refusal; CRIU is a small script here (the VM test runs the real one)."""

import email
import email.policy
import os
import signal
import stat
import subprocess
import textwrap
from types import SimpleNamespace

import pytest
from policyfiles import DAEMON_SECTIONS, MAIN, write_policy
from test_daemon_mail import NOTIFY

from pam_cgpolicy import cli, evict
from pam_cgpolicy.constants import checkpoints_dir
from pam_cgpolicy.errors import EvictError
from pam_cgpolicy.evict import Task, choose_tree, tree_roots, verify_dump
from pam_cgpolicy.loginmessage import waiting_checkpoints
from pam_cgpolicy.notifier import eviction_facts
from pam_cgpolicy.policy import load_policy
from pam_cgpolicy.state import StateStore

UID = 5600
MB = 2**20


def tasks(*rows):
    return {row.pid: row for row in rows}


SESSION = tasks(
    Task(100, 1, 0, 8 * MB, "sshd: eve [priv]"),  # root's half of sshd, in the slice
    Task(101, 100, UID, 4 * MB, "sshd: eve@notty"),
    Task(102, 101, UID, 3 * MB, "bash"),
    Task(103, 102, UID, 50 * MB, "python3 small.py"),
    Task(200, 1, UID, 1 * MB, "python3 big.py"),  # detached with setsid: parent is init
    Task(201, 200, UID, 600 * MB, "python3 big.py worker"),
    Task(300, 1, UID, 9 * MB, "/lib/systemd/systemd --user", manager=True),
    Task(301, 300, UID, 2 * MB, "dbus-daemon --session"),
)


def test_roots_stop_at_processes_not_the_users_own():
    assert tree_roots(SESSION, UID) == [101, 200, 301]


def test_default_is_the_tree_using_the_most_memory():
    tree = choose_tree(SESSION, UID)
    assert (tree.root, tree.pids, tree.rss) == (200, (200, 201), 601 * MB)
    assert tree.command == "python3 big.py"


def test_a_pid_picks_its_subtree():
    tree = choose_tree(SESSION, UID, 102)
    assert tree.pids == (102, 103)


@pytest.mark.parametrize(
    ("pid", "why"),
    [
        (999, "is not in user-5600.slice"),
        (100, "is not the user's own job"),
        (300, "is not the user's own job"),
    ],
)
def test_pids_refused(pid, why):
    with pytest.raises(EvictError, match=why):
        choose_tree(SESSION, UID, pid)


def test_a_tree_holding_another_users_process_is_refused():
    setuid = {**SESSION, 202: Task(202, 201, 0, 1 * MB, "sudo -v")}
    with pytest.raises(EvictError, match=r"holds pids \[202\] of another user"):
        choose_tree(setuid, UID)


def test_a_slice_without_the_users_processes():
    with pytest.raises(EvictError, match="has no process of uid 5600"):
        choose_tree(tasks(Task(100, 1, 0, MB, "sshd")), UID)


def test_ids_are_ours_and_checked():
    cid = evict.new_id(UID, 1_800_000_000.0, "0a1b2c")
    assert cid == "5600-20270115T080000Z-0a1b2c"
    assert evict.checked_id(cid) == cid
    assert evict.new_id(UID, 0.0) != evict.new_id(UID, 0.0)  # the random part
    for bad in ("../5600", "5600-20270115T080000Z-0a1b2c/..", "0-20270115T080000Z-0a1b2c", ""):
        with pytest.raises(EvictError, match="is not a checkpoint id"):
            evict.checked_id(bad)


def complete_dump(directory):
    for name in ("inventory.img", "pstree.img", "pages-1.img"):
        (directory / name).write_bytes(b"\x01")


def test_verify_a_complete_dump(tmp_path):
    complete_dump(tmp_path)
    assert verify_dump(str(tmp_path), 0, "(00.9) Dumping finished successfully\n") == []


def test_verify_names_every_problem(tmp_path):
    (tmp_path / "pstree.img").write_bytes(b"")
    problems = verify_dump(str(tmp_path), 1, "Error (criu/sk-inet.c:191): Connected TCP socket")
    assert problems == [
        "criu dump exited with status 1",
        "the log does not end with 'Dumping finished successfully'",
        "inventory.img is missing or empty",
        "pstree.img is missing or empty",
    ]


def test_a_zero_status_alone_is_not_enough(tmp_path):
    assert verify_dump(str(tmp_path), 0, "Dumping finished successfully")  # no images


FAKE_CRIU = """\
#!/bin/sh
# dump --tree PID --images-dir DIR ...: the images and the log a real dump leaves
dir=$5
echo "$@" > "$dir/argv"
if [ "$FAKE_CRIU" = silent ]; then exit 0; fi  # a zero status, and nothing written
if [ "$FAKE_CRIU" = fail ]; then
    echo 'pages' > "$dir/pages-1.img"
    echo 'Error (criu/sk-inet.c:191): inet: Connected TCP socket' > "$dir/dump.log"
    exit 1
fi
for name in inventory.img pstree.img pages-1.img; do echo x > "$dir/$name"; done
echo 'Dumping finished successfully' > "$dir/dump.log"
"""


@pytest.fixture
def node(tmp_path, monkeypatch):
    """A state directory and a fake criu; the slice holds SESSION."""
    criu = tmp_path / "criu"
    criu.write_text(textwrap.dedent(FAKE_CRIU))
    criu.chmod(0o755)
    monkeypatch.setattr(evict, "CRIU", str(criu))
    monkeypatch.setenv("CGPOLICY_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "state").mkdir()
    monkeypatch.setattr(evict, "read_tasks", lambda uid: SESSION)
    monkeypatch.setattr(evict, "start_time", lambda pid: "42")
    killed = []
    monkeypatch.setattr(evict, "kill_tree", lambda checkpoint, start: killed.append(checkpoint))
    signals = []
    monkeypatch.setattr(
        evict, "signal_tree", lambda uid, root, start, signum: signals.append((root, signum))
    )
    return {"killed": killed, "signals": signals}


def run_evict(calls, pid=None):
    return evict.evict(
        UID, "eve", pid, lambda: calls.append("freeze"), lambda: calls.append("thaw")
    )


def test_evict_chooses_frozen_then_dumps_checks_and_kills(node, tmp_path):
    calls = []
    checkpoint = run_evict(calls)
    assert calls == ["freeze", "thaw"]
    assert node == {"killed": [checkpoint], "signals": []}
    assert (checkpoint.root, checkpoint.pids, checkpoint.state) == (200, [200, 201], "dumped")
    directory = tmp_path / "state" / "checkpoints" / checkpoint.id
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(directory.parent.stat().st_mode) == 0o700
    argv = (directory / "argv").read_text().split()
    assert argv[:6] == ["dump", "--tree", "200", "--images-dir", str(directory), "--leave-stopped"]
    assert "--tcp-established" not in argv and "--shell-job" not in argv
    assert evict.load(checkpoint.id) == checkpoint


def test_a_failed_dump_kills_nothing(node, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_CRIU", "fail")
    calls = []
    with pytest.raises(EvictError) as raised:
        run_evict(calls)
    assert calls == ["freeze", "thaw"]
    assert node == {"killed": [], "signals": []}
    message = str(raised.value)
    assert "it keeps running, nothing was killed" in message
    assert "Connected TCP socket" in message
    (directory,) = (tmp_path / "state" / "checkpoints").iterdir()
    assert sorted(os.listdir(directory)) == ["argv", "checkpoint.json", "dump.log"]
    assert waiting_checkpoints(checkpoints_dir(), UID) == []  # nothing to tell the user
    with pytest.raises(EvictError, match="is failed, not restorable"):
        evict.restore(directory.name, NO_LIMIT)


def test_room_for_the_images_and_for_the_users_after_them():
    tree = evict.Tree(200, (200,), 500 * MB, "python3 big.py")
    assert evict.room_problem(tree, 500 * MB + evict.USERS_ROOM) is None
    problem = evict.room_problem(tree, 500 * MB + evict.USERS_ROOM - 1)
    assert problem is not None and "about 500M" in problem and "must keep 256M" in problem


def test_no_room_on_the_disk_dumps_nothing_and_kills_nothing(node, tmp_path, monkeypatch):
    real = os.statvfs

    def statvfs(path):  # the users' room alone is left: none for the images
        if str(path) != checkpoints_dir():
            return real(path)
        return SimpleNamespace(f_bavail=evict.USERS_ROOM // 4096, f_frsize=4096)

    monkeypatch.setattr(evict.os, "statvfs", statvfs)
    with pytest.raises(EvictError) as raised:
        run_evict([])
    assert node == {"killed": [], "signals": []}
    message = str(raised.value)
    assert message.startswith("no room to checkpoint pid 200 (python3 big.py); it keeps running")
    assert "free to users" in message
    assert os.listdir(checkpoints_dir()) == []  # CRIU never ran


def test_a_dump_that_says_done_but_is_not_lets_the_tree_run_on(node, monkeypatch):
    monkeypatch.setenv("FAKE_CRIU", "silent")
    with pytest.raises(EvictError, match=r"inventory\.img is missing or empty"):
        run_evict([])
    assert node == {"killed": [], "signals": [(200, signal.SIGCONT)]}


def test_a_refused_pid_is_never_dumped(node, tmp_path):
    calls = []
    with pytest.raises(EvictError, match="not the user's own job"):
        run_evict(calls, pid=100)
    assert calls == ["freeze", "thaw"]
    assert not (tmp_path / "state" / "checkpoints").exists()


def NO_LIMIT(uid: int) -> None:
    return None


def test_a_restore_the_slice_has_no_memory_for_is_refused_and_runs_nothing(
    node, tmp_path, monkeypatch
):
    checkpoint = run_evict([])  # its tree holds checkpoint.rss
    ran = tmp_path / "ran"
    fake = tmp_path / "systemd-run"
    fake.write_text(f"#!/bin/sh\ntouch {ran}\n")
    fake.chmod(0o755)
    monkeypatch.setattr(evict, "SYSTEMD_RUN", str(fake))
    asked = []

    def room(uid: int) -> int:
        asked.append(uid)
        return checkpoint.rss + evict.RESTORE_HEADROOM - 1

    with pytest.raises(EvictError, match="would be killed for want of memory") as err:
        evict.restore(checkpoint.id, room)
    assert asked == [UID] and not ran.exists()
    assert "images are kept" in str(err.value) and "user-5600.slice" in str(err.value)
    assert evict.load(checkpoint.id).state == "dumped"
    assert waiting_checkpoints(checkpoints_dir(), UID) == [checkpoint.id]
    assert evict.memory_problem(checkpoint, checkpoint.rss + evict.RESTORE_HEADROOM) is None
    assert evict.memory_problem(checkpoint, None) is None


def test_restore_refuses_what_is_not_root_alones(node, tmp_path):
    checkpoint = run_evict([])
    directory = tmp_path / "state" / "checkpoints" / checkpoint.id
    directory.chmod(0o755)
    with pytest.raises(EvictError, match="is not root's alone"):
        evict.restore(checkpoint.id, NO_LIMIT)
    with pytest.raises(EvictError, match="no checkpoint"):
        evict.restore("5600-20270115T080000Z-ffffff", NO_LIMIT)
    with pytest.raises(EvictError, match="is not a checkpoint id"):
        evict.restore("../../etc", NO_LIMIT)


def test_restore_runs_criu_in_a_scope_of_the_users_slice(node, tmp_path, monkeypatch):
    checkpoint = run_evict([])
    assert waiting_checkpoints(checkpoints_dir(), UID) == [checkpoint.id]
    directory = evict.checkpoint_dir(checkpoint.id)
    argv = evict.restore_argv(checkpoint, directory)
    assert argv[:2] == ["systemd-run", "--scope"]
    assert "--slice=user-5600.slice" in argv
    assert argv[argv.index(evict.CRIU) :][:2] == [evict.CRIU, "restore"]
    assert "--restore-detached" in argv and "--manage-cgroups=ignore" in argv
    fake = tmp_path / "systemd-run"
    fake.write_text("#!/bin/sh\necho 'Restore finished successfully' > restore.log\n")
    fake.chmod(0o755)
    monkeypatch.setattr(evict, "SYSTEMD_RUN", str(fake))
    monkeypatch.chdir(directory)  # where the fake writes its log, as criu does with -D
    monkeypatch.setattr(evict, "RESTORE_SETTLE", 0.0)
    monkeypatch.setattr(evict, "running_as", lambda pid, uid: False)
    with pytest.raises(EvictError, match="is not running 0s later; its images are kept"):
        evict.restore(checkpoint.id, NO_LIMIT)
    assert [name for name in os.listdir(directory) if name.endswith(".img")]
    assert waiting_checkpoints(checkpoints_dir(), UID) == [checkpoint.id]  # still waits
    monkeypatch.setattr(evict, "running_as", lambda pid, uid: (pid, uid) == (200, UID))
    restored, scope = evict.restore(checkpoint.id, NO_LIMIT)
    assert (restored.state, scope) == ("restored", f"cgpolicy-restore-{checkpoint.id}.scope")
    assert not [name for name in os.listdir(directory) if name.endswith(".img")]
    assert waiting_checkpoints(checkpoints_dir(), UID) == []
    with pytest.raises(EvictError, match="is restored, not restorable"):
        evict.restore(checkpoint.id, NO_LIMIT)


def test_an_eviction_in_the_history_leaves_the_tier_as_it_was(tmp_path):
    with StateStore.open(tmp_path / "state.db") as store:
        store.record_event(UID, "eve", "evicted", "evicted pid 200 to checkpoint X", "admin")
        (event,) = store.history(UID)
    assert (event.kind, event.actor, event.reason) == (
        "evicted",
        "admin",
        "evicted pid 200 to checkpoint X",
    )
    assert (event.old_tier, event.new_tier, event.old_occurrences) == (None, None, 0)


def test_running_as():
    assert evict.running_as(os.getpid(), os.getuid())
    assert not evict.running_as(os.getpid(), os.getuid() + 1)
    assert not evict.running_as(2**22 + 1, 0)  # above pid_max: no such process


def test_a_root_that_is_another_process_by_the_dump_is_left_alone(node, monkeypatch):
    starts = iter(["42", "43"])  # chosen, then a new process with the same pid
    monkeypatch.setattr(evict, "start_time", lambda pid: next(starts))
    with pytest.raises(EvictError, match="ended or left the slice; nothing was done"):
        run_evict([])
    assert node == {"killed": [], "signals": []}


def test_kill_the_tree_only_while_its_root_is_the_process_dumped(monkeypatch):
    root = subprocess.Popen(["sleep", "60"])
    child = subprocess.Popen(["sleep", "60"])
    try:
        slice_tasks = tasks(
            Task(root.pid, 1, UID, MB, "sleep"), Task(child.pid, root.pid, UID, MB, "sleep")
        )
        monkeypatch.setattr(evict, "read_tasks", lambda uid: slice_tasks)
        checkpoint = evict.Checkpoint(
            "x", UID, "eve", root.pid, [root.pid], MB, "sleep", 0.0, "dumped"
        )
        assert evict.kill_tree(checkpoint, "1") == []  # as if the pid had been reused
        assert root.poll() is None and child.poll() is None
        start = evict.start_time(root.pid)
        assert evict.kill_tree(checkpoint, start) == [root.pid, child.pid]
        assert root.wait(timeout=5) == child.wait(timeout=5) == -9
    finally:
        root.kill()
        child.kill()
        root.wait()
        child.wait()


@pytest.fixture
def admin_node(tmp_path, monkeypatch):
    """The node's own policy and state directory, as cgpolicyctl finds them."""
    monkeypatch.setenv("CGPOLICY_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CGPOLICY_CONFIG_DIR", str(tmp_path / "etc"))
    (tmp_path / "state").mkdir()
    monkeypatch.setattr(cli, "_actor", lambda: "admin")
    monkeypatch.setattr(cli, "_wake_sender", lambda: WOKEN.append(subjects(tmp_path)))
    WOKEN.clear()
    return tmp_path


WOKEN: list[list[str]] = []  # the queue each time cgpolicyctl asked cgpolicyd to send


REASON = "evicted pid 200 (python3 big.py, 601M) to checkpoint 5600-20270115T080000Z-0a1b2c"


def queued_mail(tmp_path):
    with StateStore.open(tmp_path / "state" / "state.db") as store:
        return [
            email.message_from_bytes(mail.message, policy=email.policy.default)
            for mail in store.queued_mail()
        ], store.history(UID)


def subjects(tmp_path):
    return [mail["Subject"] for mail in queued_mail(tmp_path)[0]]


def test_an_eviction_is_recorded_and_its_mail_queued_for_cgpolicyd(admin_node):
    write_policy(admin_node / "etc", main=MAIN + DAEMON_SECTIONS + NOTIFY)
    cli._record_event(UID, "eve", "evicted", REASON)
    (mail,), (event,) = queued_mail(admin_node)
    assert (event.kind, event.reason, event.actor) == ("evicted", REASON, "admin")
    assert mail["To"] == "eve@example.org" and "saved to disk, not killed" in mail["Subject"]
    assert REASON in mail.get_body(("plain",)).get_content()
    assert [[mail["Subject"]]] == WOKEN  # asked once the mail was in the queue: it goes now


def test_without_notify_the_eviction_is_recorded_and_nothing_mailed(admin_node, capsys):
    write_policy(admin_node / "etc", main=MAIN + DAEMON_SECTIONS)
    cli._record_event(UID, "eve", "restored", "restored checkpoint X")
    assert queued_mail(admin_node)[0] == []
    (admin_node / "etc" / "cgpolicy.toml").write_text("[general\n")  # broken
    cli._record_event(UID, "eve", "restored", "restored checkpoint Y")
    mails, events = queued_mail(admin_node)
    assert mails == [] and [e.reason for e in events] == [
        "restored checkpoint Y",
        "restored checkpoint X",
    ]
    assert "warning: no mail to eve: " in capsys.readouterr().err
    assert WOKEN == []  # nothing to send: cgpolicyd is not bothered


def test_only_an_eviction_or_a_restore_has_eviction_facts(tmp_path):
    policy = load_policy(write_policy(tmp_path, main=MAIN + DAEMON_SECTIONS))
    facts = eviction_facts(policy, "eve", UID, "evicted", REASON, "admin", 1e9)
    assert (facts.kind, facts.reason, facts.actor, facts.watched) == (
        "evicted",
        REASON,
        "admin",
        False,
    )
    with pytest.raises(ValueError, match="not an eviction's kind"):
        eviction_facts(policy, "eve", UID, "penalized", REASON, "admin", 1e9)
