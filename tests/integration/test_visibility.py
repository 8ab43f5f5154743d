"""What users see of each other, and admin actions that could not take effect, on a real node.

cgpolicyd runs with test_daemon.py's node (its fixture, policy and users): ann is
in the admin group, carol is not, bob is the one being penalized and frozen. Listeners are small
dbus-fast clients (the library cgpolicy installs) run by each user over SSH:
one subscribes as any client would, and tries to eavesdrop as well. Refusals are
checked through cgpolicyctl and busctl, as an admin meets them.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
import test_daemon
from test_daemon import (
    USERS,
    busctl,
    daemon_log,
    dbus_send,
    diagnostics,
    log_mark,
    login,
    poll,
    root,
)
from vmharness.install import installed_python

# v2 only: nothing here differs on cgroup v1 (see conftest.py)
pytestmark = [pytest.mark.vm, pytest.mark.v2_only]

# test_daemon.py's set-up (install, users, policy, logins), made again for this module.
node = test_daemon.node

LISTENER = "/usr/local/lib/cgpolicy-test/listen.py"
GO = "/tmp/cgpolicy-visibility-go"  # root creates it when the actions are done
CTL = "/usr/sbin/cgpolicyctl"  # users' PATH has no sbin

# Prints one JSON line per cgpolicyd signal it receives. When GO appears it calls
# GetUser on itself: cgpolicyd's reply comes after every message cgpolicyd sent this
# connection before it (the bus keeps one sender's messages in order), so
# "barrier" means every signal meant for this listener has arrived.
LISTEN = """
import asyncio, json, os, pwd, sys
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

IFACE = "org.cgpolicy1.Manager"

def out(**line):
    print(json.dumps(line), flush=True)

def bus_call(member, *body):
    return Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                   interface="org.freedesktop.DBus", member=member,
                   signature="s" * len(body), body=list(body))

async def main():
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    def on_message(msg):
        if msg.message_type == MessageType.SIGNAL and msg.interface == IFACE:
            out(signal=msg.member, body=msg.body, destination=msg.destination)
        return False
    bus.add_message_handler(on_message)
    rule = f"type='signal',interface='{IFACE}'"
    for match in (rule, rule + ",eavesdrop='true'"):
        reply = await bus.call(bus_call("AddMatch", match))
        out(match=match, error=reply.error_name)
    out(ready=True)
    while not os.path.exists(sys.argv[1]):
        await asyncio.sleep(0.2)
    me = pwd.getpwuid(os.getuid()).pw_name
    reply = await bus.call(Message(destination="org.cgpolicy1", path="/org/cgpolicy1",
                                   interface=IFACE, member="GetUser", signature="s", body=[me]))
    out(barrier=reply.error_name or "ok")

asyncio.run(main())
"""


def listener_lines(vm, user: str) -> list[dict[str, Any]]:
    text = root(vm, f"cat /tmp/listen-{user}.out 2>/dev/null", check=False).stdout
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def wait_for_line(vm, user: str, key: str) -> list[dict[str, Any]]:
    return poll(
        f"{user}'s listener printing {key}",
        lambda: listener_lines(vm, user),
        lambda lines: any(key in line for line in lines),
        60,
        lambda: root(vm, f"cat /tmp/listen-{user}.out", check=False).stdout + diagnostics(vm),
        every=0.5,
    )


def history_count(vm, user: str) -> int:
    done = root(vm, f"cgpolicyctl history {user} --json --limit 100000")
    return len(json.loads(done.stdout))


@pytest.fixture(scope="module")
def listening(node: Any) -> Iterator[Any]:
    """test_daemon.py's node, with the listener script in place."""
    node.put_bytes(textwrap.dedent(LISTEN).lstrip().encode(), LISTENER, mode=0o644)
    yield node
    if node.running:
        root(node, f"rm -f {GO} /tmp/listen-*.out; cgpolicyctl thaw bob", check=False)
        root(node, "cgpolicyctl release bob", check=False)


def test_only_root_and_admins_hear_of_other_users_changes(listening):
    vm = listening
    listeners = ("carol", "ann")
    root(vm, f"rm -f {GO} /tmp/listen-*.out")
    python = installed_python(vm)
    for user in listeners:
        cmd = f"{python} -I {LISTENER} {GO}"
        login(vm, user, f"nohup {cmd} >/tmp/listen-{user}.out 2>&1 &")
    for user in listeners:
        wait_for_line(vm, user, "ready")
    for action in ("penalize bob penalty1", "freeze bob", "thaw bob", "release bob"):
        done = root(vm, f"cgpolicyctl {action}", check=False)
        assert done.returncode == 0, f"cgpolicyctl {action}: {done.stdout}{done.stderr}"
    root(vm, f"touch {GO}")
    heard = {user: wait_for_line(vm, user, "barrier") for user in listeners}

    def signals(user: str) -> list[tuple[str, list[Any]]]:
        return [(line["signal"], line["body"]) for line in heard[user] if "signal" in line]

    # Nothing at all for carol; for ann, bob's changes (a login's CPU may judge others too).
    assert signals("carol") == [], (
        f"carol, who is no admin, heard of bob: {heard['carol']}\n{diagnostics(vm)}"
    )
    assert [line["barrier"] for line in heard["carol"] if "barrier" in line] == ["ok"]
    ann = [(member, body) for member, body in signals("ann") if body[0] == "bob"]
    assert [(member, body[0], body[-1]) for member, body in ann[1:3]] == [
        ("UserFreezerChanged", "bob", "frozen"),
        ("UserFreezerChanged", "bob", "running"),
    ], heard["ann"]
    assert [(member, body[:3]) for member, body in (ann[0], ann[3])] == [
        ("UserTierChanged", ["bob", "", "penalty1"]),
        ("UserTierChanged", ["bob", "penalty1", ""]),
    ], heard["ann"]
    assert len(ann) == 4, heard["ann"]


def test_cgpolicyctl_shows_others_only_to_root_and_admins(node):
    commands = ("classify", "status", "history")
    script = "\n".join(f'{CTL} {command} bob 2>&1; echo "@@rc $?"' for command in commands)
    done = login(node, "carol", script, check=False)
    chunks = done.stdout.split("@@rc ")
    assert len(chunks) == len(commands) + 1, done.stdout + done.stderr
    for command, before, after in zip(commands, chunks[:-1], chunks[1:], strict=True):
        assert after.startswith("1"), f"carol's {command} bob: {done.stdout}"
        assert (
            f"error: {command} of another user is for root and the policy's admin group; "
            f"uid {USERS['carol'][0]} is in neither"
        ) in before, done.stdout
        assert "students" not in before and "penalty" not in before, done.stdout
    own = login(node, "carol", f"{CTL} status --json", check=False)
    assert own.returncode == 0, own.stdout + own.stderr
    assert [row["user"] for row in json.loads(own.stdout)] == ["carol"], own.stdout
    mine = login(node, "carol", f"{CTL} classify carol", check=False)
    assert mine.returncode == 0 and "group normal" in mine.stdout, mine.stdout + mine.stderr
    admin = login(node, "ann", f"{CTL} classify bob", check=False)
    assert admin.returncode == 0 and "group students" in admin.stdout, admin.stdout + admin.stderr


REFUSED = [
    ("penalize root penalty1", "root (uid 0) cannot be penalized: root is never limited"),
    ("penalize daemon penalty1", "daemon (uid 1) cannot be penalized: uid below min_uid 1000"),
    ("penalize ann penalty1", "ann (uid 2006) cannot be penalized: group admins is exempt"),
    ("penalize nosuchuser penalty1", "no such user: 'nosuchuser'"),
    ("release ann", "ann (uid 2006) is in no penalty tier; nothing to release"),
    ("freeze daemon", "daemon (uid 1) is never frozen: uid below min_uid 1000"),
]


def test_admin_actions_that_cannot_take_effect_are_refused_and_nothing_recorded(node):
    # Only the refused users' events count: a login's CPU may get another user judged.
    before = history_count(node, "ann")
    mark = log_mark(node)
    for args, text in REFUSED:
        done = root(node, f"cgpolicyctl {args}", check=False)
        assert done.returncode == 1 and done.stdout == "", f"{args}: {done}"
        assert done.stderr.startswith(f"error: {text}"), f"{args}: {done.stderr}"
    for user in ("root", "ann"):
        done = root(node, busctl("Penalize", "ss", user, "penalty1", json_out=False), check=False)
        assert done.returncode != 0 and "cannot be penalized" in done.stderr, done
        sent = root(node, dbus_send("Penalize", user, "penalty1") + " 2>&1", check=False)
        assert "Error org.cgpolicy1.Error.NotManaged:" in sent.stdout, sent.stdout
    assert history_count(node, "ann") == before, root(node, "cgpolicyctl history").stdout
    assert history_count(node, "root") == history_count(node, "daemon") == 0
    refused_users = ("root", "daemon", "ann", "nosuchuser")
    events = [
        line
        for line in daemon_log(node, mark)
        if " event=" in line and line.startswith(tuple(f"user={u} " for u in refused_users))
    ]
    assert events == [], events
