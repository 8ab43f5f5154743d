"""cgpolicyctl evict and restore with the real CRIU, on cgroup v2 and v1.

evy's detached Python job holds 500 MB and counts in a file. It is evicted: its
memory leaves her slice and the count stops; restored, it is back in her slice
and counts on from where it stopped. She is told: until the restore her
logins on a terminal show a line naming the checkpoint, and with [notify] set
(to the VM's exim4) her mailbox gets the eviction's mail and the restore's. A
job CRIU cannot dump (an established TCP connection to a local listener) is
refused with CRIU's reason and runs on. One setup serves both, to keep the VM
time short.

The images of 500 MB do not fit on the image's root file system beside the room
evict leaves to users, so the module grows it to the VM's whole disk first.
(Without evict's check, the dump filled that disk: the restored job's first
write failed with ENOSPC, and Python, unable to print the traceback, exited
with status 120, 0x78 in a kernel trace.)
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_daemon import poll, root
from test_login_message import KEY, with_terminal
from test_mail import body, mails

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]
USER, UID = "evy", 5600
MB = 2**20
HOLD_MB = 500
COUNT_FILE = "/home/evy/count"
BACKUP = "/root/cgpolicy-before-test-evict"
NOTIFY = """
[notify]
host = "localhost"
from = "cgpolicy@localhost"
user_address = "{user}@localhost"
"""
JOB = """\
import os, sys, time
data = bytearray(int(sys.argv[2]) * 2**20)
for i in range(0, len(data), 4096):  # touch every page: resident, not just reserved
    data[i] = 1
n = 0
while True:
    n += 1
    with open(sys.argv[1] + ".tmp", "w") as out:
        out.write(str(n))
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    time.sleep(0.2)
"""
TCP_JOB = """\
import socket, time
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
client = socket.create_connection(server.getsockname())
peer, _ = server.accept()
while True:
    client.send(b"x")
    peer.recv(10)
    time.sleep(0.5)
"""
MAIL_WAIT = 20.0  # seconds: the sender's idle look is 60 s away; exim4 delivers locally
DETACHED = "setsid nohup python3 {script} {args} </dev/null >/dev/null 2>&1 & echo $!"


def memory(vm) -> int:
    out = root(vm, f"systemctl show -P MemoryCurrent user-{UID}.slice").stdout.strip()
    return int(out) if out.isdigit() else -1


def count(vm) -> int | None:
    text = root(vm, f"cat {COUNT_FILE} 2>/dev/null", check=False).stdout.strip()
    return int(text) if text.isdigit() else None


def pid_of(vm, script: str) -> int:
    return int(root(vm, f"pgrep -u {USER} -f {script}").stdout.split()[0])


def diagnostics(vm) -> str:
    return root(
        vm,
        f"ps -o pid,ppid,stat,tty,rss,cgroup:120,args -u {USER}; "
        f"systemd-cgls --no-pager /user.slice/user-{UID}.slice; "
        "tail -n 20 /var/lib/cgpolicy/checkpoints/*/*.log; "
        "journalctl -q --no-pager -n 40 -o short-precise; dmesg | tail -n 15",
        check=False,
    ).stdout


@pytest.fixture(scope="module")
def node(vm) -> Iterator[Any]:
    from vmharness.install import allow_network, forbid_network, install_cgpolicy

    vm.grow_root_fs()
    install_cgpolicy(vm, REPO)
    vm.add_user(USER, UID)
    vm.put_bytes(JOB.encode(), "/home/evy/job.py")
    vm.put_bytes(TCP_JOB.encode(), "/home/evy/tcp.py")
    vm.put_bytes(vm.image.ssh_key.read_bytes(), KEY, mode=0o600)
    root(vm, f"rm -rf {BACKUP} && cp -a /etc/cgpolicy {BACKUP}")
    vm.put_bytes(NOTIFY.encode(), "/root/cgpolicy-evict-notify")
    root(vm, "cat /root/cgpolicy-evict-notify >>/etc/cgpolicy/cgpolicy.toml && cgpolicyctl check")
    allow_network(vm)  # [notify]'s exim4, over TCP; restarts cgpolicyd
    root(vm, f"rm -f /var/mail/{USER} && systemctl start exim4")
    yield vm
    if vm.running:
        forbid_network(vm)
        root(
            vm,
            f"pkill -9 -u {USER}; systemctl stop 'cgpolicy-restore-*.scope'; "
            f"rm -rf /var/lib/cgpolicy/checkpoints /var/mail/{USER} {KEY} "
            f"/root/cgpolicy-evict-notify; loginctl terminate-user {USER}; "
            f"rm -rf /etc/cgpolicy && mv {BACKUP} /etc/cgpolicy; "
            "systemctl stop exim4; systemctl restart cgpolicyd",
            check=False,
        )


def login_lines(vm) -> list[str]:
    """cgpolicy's lines about checkpoints among what evy's login on a terminal shows.

    cgpolicyd may have put the 500 MB job's owner in a penalty meanwhile: its line is
    the penalty's, not ours.
    """
    return [
        line
        for line in with_terminal(vm, USER).splitlines()
        if line.startswith("cgpolicy:") and "checkpoint" in line
    ]


def test_evict_then_restore_continues_where_it_stopped(node):
    vm = node
    vm.ssh(DETACHED.format(script="job.py", args=f"{COUNT_FILE} {HOLD_MB}"), user=USER)
    poll("the job counting", lambda: count(vm), lambda n: bool(n), 120.0, lambda: diagnostics(vm))
    before = poll(
        "the job's memory in the slice",
        lambda: memory(vm),
        lambda used: used > HOLD_MB * MB,
        60.0,
        lambda: diagnostics(vm),
    )
    job = pid_of(vm, "job.py")
    evicted = root(vm, f"cgpolicyctl evict {USER}", check=False, timeout=600)
    assert evicted.returncode == 0, evicted.stderr + diagnostics(vm)
    assert f"evicted pid {job} (python3 job.py" in evicted.stdout, evicted.stdout
    cid = re.search(r"cgpolicyctl restore (\S+)", evicted.stdout)[1]  # type: ignore[index]

    # Gone: the process, its memory, its counting.
    assert root(vm, f"kill -0 {job}", check=False).returncode != 0, diagnostics(vm)
    after = poll(
        "the slice's memory dropping",
        lambda: memory(vm),
        lambda used: used < before - 400 * MB,
        30.0,
        lambda: diagnostics(vm),
    )
    stopped = count(vm)
    time.sleep(2)
    assert count(vm) == stopped
    listing = root(vm, f"stat -c '%U %a' /var/lib/cgpolicy/checkpoints/{cid}").stdout
    assert listing.split() == ["root", "700"]
    (event,) = [
        e
        for e in json.loads(root(vm, f"cgpolicyctl history {USER} --json").stdout)
        if e["kind"] == "evicted"
    ]
    assert cid in event["reason"] and event["actor"] == "root", event
    (line,) = login_lines(vm)  # the terminal's echo of the shell's input may follow it
    assert line.startswith(
        f"cgpolicy: an administrator evicted a job of yours to disk (checkpoint {cid}); "
        "it is not running, and an administrator can restore it on this node"
    ), line + diagnostics(vm)

    restored = root(vm, f"cgpolicyctl restore {cid}", check=False, timeout=600)
    assert restored.returncode == 0, restored.stderr + diagnostics(vm)
    resumed = poll(
        "the restored job counting on",
        lambda: count(vm),
        lambda n: n is not None and n > (stopped or 0),
        60.0,
        lambda: diagnostics(vm),
    )
    assert resumed is not None and stopped is not None
    assert resumed < stopped + 100, f"counted from {resumed}, not on from {stopped}"
    cgroup = root(vm, f"cat /proc/{job}/cgroup").stdout
    assert f"user-{UID}.slice/cgpolicy-restore-{cid}.scope" in cgroup, cgroup
    assert root(vm, f"ps -o tty= -p {job}").stdout.strip() == "?"
    assert memory(vm) > after + 400 * MB, diagnostics(vm)
    kinds = [e["kind"] for e in json.loads(root(vm, f"cgpolicyctl history {USER} --json").stdout)]
    # cgpolicyd may have judged the 500 MB job meanwhile (a penalty, a release): not ours.
    ours = [kind for kind in kinds if kind in ("evicted", "restored")]
    assert ours[:2] == ["restored", "evicted"], kinds
    assert login_lines(vm) == [], diagnostics(vm)
    root(vm, f"kill -9 {job}")

    # cgpolicyctl woke cgpolicyd's sender for each: no wait for its minute's look. Mail
    # about a penalty cgpolicyd gave the job meanwhile may be there too: not ours.
    subjects = {"evicted": "saved to disk, not killed", "restored": "your evicted job runs again"}

    def by_kind(found: list[Any]) -> dict[str, list[Any]]:
        return {k: [m for m in found if s in m["Subject"]] for k, s in subjects.items()}

    found = poll(
        "the eviction's and the restore's mail in her mailbox",
        lambda: by_kind(mails(vm, USER)),
        lambda found: all(found.values()),
        MAIL_WAIT,
        lambda: diagnostics(vm) + root(vm, "journalctl -q -n 20 -u cgpolicyd").stdout,
        every=3.0,
    )
    (evicted_mail,), (restored_mail,) = found["evicted"], found["restored"]
    assert f"to checkpoint {cid}" in body(evicted_mail), body(evicted_mail)
    assert "an administrator can restore it" in body(evicted_mail)
    assert f"restored checkpoint {cid}" in body(restored_mail), body(restored_mail)


def test_a_job_criu_cannot_dump_runs_on(node):
    vm = node
    vm.ssh(DETACHED.format(script="tcp.py", args=""), user=USER)
    job = poll(
        "the TCP job",
        lambda: root(vm, f"pgrep -u {USER} -f tcp.py", check=False).stdout.split(),
        bool,
        30.0,
        lambda: diagnostics(vm),
    )[0]
    # Its connection up, both ends: before that there is nothing CRIU refuses (under a
    # penalty's CPU quota the interpreter takes seconds to get there).
    poll(
        "the TCP job's connection",
        lambda: root(vm, f"ss -Htnp state established | grep -c 'pid={job},'", check=False),
        lambda done: done.stdout.strip().isdigit() and int(done.stdout) >= 2,
        60.0,
        lambda: diagnostics(vm),
    )
    refused = root(vm, f"cgpolicyctl evict {USER} --pid {job}", check=False, timeout=300)
    assert refused.returncode == 1, refused.stdout + diagnostics(vm)
    assert "it keeps running, nothing was killed" in refused.stderr, refused.stderr
    assert "TCP" in refused.stderr, refused.stderr
    state = root(vm, f"ps -o stat= -p {job}").stdout.strip()
    assert state and state[0] in "RS", f"{job} is {state!r}\n{diagnostics(vm)}"
    root(vm, f"kill -9 {job}")
