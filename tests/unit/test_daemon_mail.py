"""cgpolicyd mails penalties and releases from the one place tier changes are told."""

from __future__ import annotations

import asyncio
import email
import email.policy
import time

import pytest
from policyfiles import DAEMON_SECTIONS
from test_daemon_cycle import ADMINS, BOB, Node

from pam_cgpolicy.notifier import IDLE_WAKE, eviction_facts, queue_mail

NOTIFY = """
[notify]
host = "127.0.0.1"
port = 2525
from = "cgpolicy@login1.example.org"
user_address = "{user}@example.org"
admins = ["hpc@example.org"]
"""


class Outbox:
    """The SMTP sender: each message handed to it (the daemon's code up to smtplib)."""

    def __init__(self) -> None:
        self.sent: list[email.message.EmailMessage] = []

    def __call__(self, notify, data: bytes) -> None:
        self.sent.append(email.message_from_bytes(data, policy=email.policy.default))


@pytest.fixture
def node(tmp_path, monkeypatch):
    node = Node(tmp_path, monkeypatch)
    yield node
    node.store.close()


def mailing(node: Node, monkeypatch, notify: str = NOTIFY):
    (node.config / "cgpolicy.toml").write_text(ADMINS + DAEMON_SECTIONS + notify)
    outbox = Outbox()
    daemon = node.daemon()
    daemon.notifier.send = outbox
    daemon.notifier.processes = lambda uid: ()
    return daemon, outbox


def deliver_all(daemon) -> None:
    async def flush() -> None:
        await daemon.notifier.flush()
        await daemon.notifier.send_due()

    asyncio.run(flush())


def test_an_admins_penalty_and_release_are_mailed_to_the_user(node, monkeypatch):
    daemon, outbox = mailing(node, monkeypatch)

    async def penalize() -> None:
        await daemon.penalize("bob", "penalty2", "root")
        await daemon.notifier.flush()  # as the running daemon's loop would

    asyncio.run(penalize())
    assert node.store.queued_mail()[0].uid == BOB
    deliver_all(daemon)
    (mail,) = outbox.sent
    assert mail["To"] == "bob@example.org" and mail["Bcc"] == "hpc@example.org"
    assert "penalty penalty2" in mail["Subject"]
    text = mail.get_body(("plain",)).get_content()
    assert "an administrator put you in this penalty (by root)" in text
    assert "CPUQuota=50%" in text  # penalty2 keeps half of students' 100%

    async def release() -> None:
        await daemon.release("bob", "root")
        await daemon.notifier.flush()

    asyncio.run(release())
    deliver_all(daemon)
    assert "your limits are back (penalty penalty2 ended)" in outbox.sent[1]["Subject"]
    assert "CPUQuota=100%" in outbox.sent[1].get_body(("plain",)).get_content()
    assert node.store.queued_mail() == []


def test_a_penalty_the_cycle_decides_is_mailed_with_its_badness_and_tier_message(node, monkeypatch):
    daemon, outbox = mailing(node, monkeypatch)
    node.sampler.cores = {BOB: 1.0}

    async def cycles() -> None:  # one loop, as in the daemon: mail is written in the background
        for _ in range(100):
            node.clock.now += 10
            await daemon.cycle()
            await daemon.notifier.flush()
            if node.store.queued_mail():
                return

    asyncio.run(cycles())
    deliver_all(daemon)
    (mail,) = outbox.sent
    assert "cgpolicy on" in mail["Subject"] and "new (penalty penalty1)" in mail["Subject"]
    assert (
        "Why: your usage was heavy for too long (badness "
        in mail.get_body(("plain",)).get_content()
    )


def test_without_notify_no_mail_is_queued(node, monkeypatch):
    daemon, outbox = mailing(node, monkeypatch, notify="")
    asyncio.run(daemon.penalize("bob", "penalty1", "root"))
    deliver_all(daemon)
    assert node.store.queued_mail() == [] and outbox.sent == []


def test_send_mail_wakes_the_idle_sender_for_a_mail_cgpolicyctl_queued(node, monkeypatch):
    daemon, outbox = mailing(node, monkeypatch)
    policy = daemon.policy
    reason = "evicted pid 200 (python3 big.py, 601M) to checkpoint 5600-20270115T080000Z-0a1b2c"

    async def scenario() -> float:
        stop = asyncio.Event()
        sender = asyncio.create_task(daemon.notifier.run(stop))
        await asyncio.sleep(0.2)  # it found the queue empty: asleep for IDLE_WAKE
        facts = eviction_facts(policy, "bob", BOB, "evicted", reason, "root", node.clock.now)
        queue_mail(node.store, policy.notify, facts, node.clock.now)  # as cgpolicyctl does
        started = time.monotonic()
        await daemon.send_mail("root")
        while not outbox.sent and time.monotonic() - started < 5.0:
            await asyncio.sleep(0.05)
        stop.set()
        await sender
        return time.monotonic() - started

    took = asyncio.run(scenario())
    (mail,) = outbox.sent
    assert "saved to disk, not killed" in mail["Subject"] and took < IDLE_WAKE / 10
    assert node.store.queued_mail() == []
