"""The mail queue: sent through a real SMTP conversation, kept while the server is
down, tried again later and later, and kept across a restart."""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
from dataclasses import replace
from pathlib import Path

import pytest
from fakesmtp import FakeSmtp
from mailfacts import FACTS, T0

from pam_cgpolicy import notifier as notifier_mod
from pam_cgpolicy.errors import MailError
from pam_cgpolicy.mail import deliver, read_password
from pam_cgpolicy.notifier import RETRY_FIRST, RETRY_MAX, Notifier, retry_delay
from pam_cgpolicy.policy import Notify
from pam_cgpolicy.state import StateStore


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def smtp():
    server = FakeSmtp().start()
    yield server
    server.stop()


@pytest.fixture
def logs(monkeypatch):
    lines: list[str] = []
    monkeypatch.setattr(notifier_mod.log, "error", lambda _kind, text, **_who: lines.append(text))
    monkeypatch.setattr(notifier_mod.log, "info", lambda _kind, _text, **_who: None)
    return lines


def settings(port: int) -> Notify:
    return Notify(
        host="127.0.0.1",
        port=port,
        sender="cgpolicy@example.org",
        user_address="{user}@example.org",
        admins=("hpc@example.org",),
        timeout=5,
    )


class Queue:
    """A notifier on its own state database, as cgpolicyd builds one."""

    def __init__(self, path: Path, port: int, clock: Clock) -> None:
        self.store = StateStore.open(path)
        self.notifier = Notifier(
            self.store, lambda: settings(port), processes=lambda uid: (), clock=clock
        )

    def send_due(self) -> int:
        return asyncio.run(self.notifier.send_due())


@pytest.fixture
def queue(tmp_path, smtp):
    clock = Clock()
    queue = Queue(tmp_path / "state.db", smtp.port, clock)
    queue.clock = clock  # type: ignore[attr-defined]
    yield queue
    queue.store.close()


def test_deliver_sends_to_user_and_bcc_without_showing_the_bcc(smtp):
    from pam_cgpolicy.mail import build_mail

    message = build_mail(settings(smtp.port), FACTS)
    assert message is not None
    deliver(settings(smtp.port), bytes(message))
    (got,) = smtp.box.received
    assert got.sender == "cgpolicy@example.org"
    assert sorted(got.recipients) == ["bob@example.org", "hpc@example.org"]
    mail = email.message_from_bytes(got.data, policy=email.policy.default)
    assert mail["Bcc"] is None and "penalty1" in mail["Subject"]


def test_a_refused_recipient_is_permanent_and_a_busy_server_is_not(smtp):
    data = b"Subject: x\r\nFrom: a@example.org\r\nTo: b@example.org\r\n\r\nhi\r\n"
    smtp.box.reply_to_rcpt = "550 5.1.1 no such user"
    with pytest.raises(MailError, match=r"550 5\.1\.1 no such user") as refused:
        deliver(settings(smtp.port), data)
    assert refused.value.permanent
    smtp.box.reply_to_rcpt = "250 ok"
    smtp.box.reply_to_data = "451 4.3.0 try later"
    with pytest.raises(MailError, match="451") as busy:
        deliver(settings(smtp.port), data)
    assert not busy.value.permanent


def test_a_server_down_says_why_and_is_not_permanent(smtp):
    smtp.stop()
    with pytest.raises(MailError, match="ConnectionRefusedError") as down:
        deliver(settings(smtp.port), b"Subject: x\r\nTo: b@example.org\r\n\r\nhi\r\n")
    assert not down.value.permanent


def test_backoff_doubles_from_the_first_wait_up_to_the_longest():
    assert [retry_delay(n) for n in (1, 2, 3)] == [RETRY_FIRST, 2 * RETRY_FIRST, 4 * RETRY_FIRST]
    assert retry_delay(100) == RETRY_MAX


def test_mail_waits_while_the_server_is_down_and_goes_when_it_is_back(queue, smtp, logs):
    queue.notifier.enqueue(FACTS)
    smtp.stop()
    assert queue.send_due() == 0
    (mail,) = queue.store.queued_mail()
    assert mail.attempts == 1 and mail.next_try == T0 + RETRY_FIRST
    assert "ConnectionRefusedError" in mail.last_error
    assert len(logs) == 1 and "event=mail-failed" in logs[0] and "attempt=1" in logs[0]
    assert "ConnectionRefused" in logs[0] and "retry=" in logs[0]
    queue.clock.now += RETRY_FIRST - 1  # not due yet: not tried
    assert queue.send_due() == 0 and len(logs) == 1
    queue.clock.now += 1
    assert queue.send_due() == 0  # second failure: the wait doubles
    (mail,) = queue.store.queued_mail()
    assert mail.attempts == 2 and mail.next_try == queue.clock.now + 2 * RETRY_FIRST
    assert len(logs) == 2 and "attempt=2" in logs[1]
    smtp.start()
    queue.clock.now += 2 * RETRY_FIRST
    assert queue.send_due() == 1
    assert queue.store.queued_mail() == []
    assert [r.recipients[0] for r in smtp.box.received] == ["bob@example.org"]


def test_queued_mail_survives_a_restart(tmp_path, smtp, logs):
    clock = Clock()
    smtp.stop()
    first = Queue(tmp_path / "state.db", smtp.port, clock)
    first.notifier.enqueue(FACTS)
    assert first.send_due() == 0
    first.store.close()  # the daemon stops, or is killed: the queue is on disk
    smtp.start()
    clock.now += RETRY_FIRST
    second = Queue(tmp_path / "state.db", smtp.port, clock)
    assert second.send_due() == 1
    assert second.store.queued_mail() == []
    assert len(smtp.box.received) == 1
    second.store.close()


def test_a_permanent_refusal_is_dropped_and_logged(queue, smtp, logs):
    smtp.box.reply_to_rcpt = "550 5.1.1 no such user"
    queue.notifier.enqueue(FACTS)
    assert queue.send_due() == 0
    assert queue.store.queued_mail() == []
    assert 'retry="never, dropped"' in logs[0] and "550" in logs[0]


def test_without_notify_nothing_is_queued_and_the_queue_is_kept(tmp_path, smtp):
    store = StateStore.open(tmp_path / "state.db")
    current: list[Notify | None] = [settings(smtp.port)]
    notifier = Notifier(store, lambda: current[0], processes=lambda uid: ())
    notifier.enqueue(FACTS)
    current[0] = None
    assert notifier.enqueue(FACTS) is None
    assert asyncio.run(notifier.send_due()) == 0
    assert len(store.queued_mail()) == 1  # kept until [notify] is back
    store.close()


def test_notify_never_raises_into_a_cycle_it_logs(queue, logs):
    queue.store.close()  # the database gone: queuing fails

    async def cycle() -> None:
        queue.notifier.notify(FACTS)  # returns at once
        await queue.notifier.flush()

    asyncio.run(cycle())
    assert any("event=mail-failed" in line and "user=bob" in line for line in logs)
    queue.store = StateStore.open(queue.store.path)


def test_the_sender_task_sends_what_notify_queued_with_processes_and_plot(tmp_path, smtp):
    store = StateStore.open(tmp_path / "state.db")
    png = b"\x89PNG\r\n\x1a\nplot"
    notifier = Notifier(store, lambda: settings(smtp.port), png=lambda uid: png)

    async def daemon() -> None:
        stop = asyncio.Event()
        sender = asyncio.create_task(notifier.run(stop))
        notifier.notify(replace(FACTS, uid=os.getuid()))  # this test's processes
        for _ in range(100):
            await asyncio.sleep(0.05)
            if smtp.box.received:
                break
        stop.set()
        await sender

    asyncio.run(daemon())
    (got,) = smtp.box.received
    mail = email.message_from_bytes(got.data, policy=email.policy.default)
    text = mail.get_body(("plain",)).get_content()
    assert "Top processes" in text  # read from /proc in the background
    images = [p for p in mail.walk() if p.get_content_type() == "image/png"]
    assert [p.get_payload(decode=True) for p in images] == [png]
    assert store.queued_mail() == []
    store.close()


def test_the_password_file_must_stay_root_only(tmp_path):
    secret = tmp_path / "smtp-password"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    assert read_password(str(secret)) == "s3cret"
    secret.chmod(0o640)
    with pytest.raises(MailError, match="readable by others"):
        read_password(str(secret))
    assert os.geteuid() == os.stat(secret).st_uid


def test_a_version_2_database_gains_the_queue_and_keeps_its_rows(tmp_path):
    import sqlite3

    from pam_cgpolicy import state

    path = tmp_path / "state.db"
    with sqlite3.connect(path) as conn:  # as the cgpolicy before the queue left it
        for statement in state._SCHEMA:
            if statement not in state._MAIL_TABLE + state._OUTBOX_TABLE:
                conn.execute(statement)
        conn.execute("INSERT INTO users VALUES (2002, 'bob', NULL, NULL, 1, 10.0, 0.0, NULL, 1.0)")
        conn.execute("PRAGMA user_version=2")
    conn.close()
    with StateStore.open(path) as store:
        assert store.get(2002).occurrences == 1
        store.enqueue_mail(2002, b"Subject: x\r\n\r\nhi\r\n", T0)
        assert [m.uid for m in store.queued_mail()] == [2002]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (state.SCHEMA_VERSION,)
    conn.close()
