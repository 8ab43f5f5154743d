"""The penalty mail's text, HTML and parts, built from plain facts."""

from __future__ import annotations

import email
import email.policy
import itertools
import os

from mailfacts import FACTS

from pam_cgpolicy.mail import MailFacts, build_mail, plain_text, top_processes
from pam_cgpolicy.policy import Notify

NOTIFY = Notify(
    host="localhost",
    sender="cgpolicy@node.example.org",
    user_address="{user}@example.org",
    admins=("hpc@example.org", "ops@example.org"),
)
PNG = b"\x89PNG\r\n\x1a\n" + b"plot" * 50


def parsed(facts: MailFacts = FACTS, png: bytes | None = PNG) -> email.message.EmailMessage:
    message = build_mail(NOTIFY, facts, png)
    assert message is not None
    parsed = email.message_from_bytes(bytes(message), policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


def test_a_penalty_mail_goes_to_the_user_with_admins_in_bcc_and_names_the_tier_message():
    mail = parsed()
    assert mail["To"] == "bob@example.org"
    assert mail["Bcc"] == "hpc@example.org, ops@example.org"
    assert mail["From"] == "cgpolicy@node.example.org"
    assert FACTS.message in mail["Subject"] and "penalty1" in mail["Subject"]
    assert mail["Auto-Submitted"] == "auto-generated"


def test_its_text_says_tier_limits_until_when_why_and_the_top_processes():
    text = parsed().get_body(("plain",)).get_content()
    assert "penalty penalty1" in text
    assert "CPUQuota=80% MemoryMax=1.6G" in text
    assert "(30 min)" in text and " until " in text
    assert "badness 100.4 >= 100: cpu 80.2, memory 20.2" in text
    assert "80% of your CPU quota or 50% of your memory limit" in text
    table = text.split("Top processes")[1].splitlines()
    assert table[1].split()[:3] == ["PID", "CPU", "(cores)"]
    assert table[2].split()[:4] == ["4242", "3.97", "512M", "python3"]


def test_html_and_plain_are_alternatives_and_the_plot_is_an_inline_related_png():
    mail = parsed()
    assert mail.get_content_type() == "multipart/alternative"
    plain, related = mail.get_payload()
    assert plain.get_content_type() == "text/plain"
    assert related.get_content_type() == "multipart/related"
    html_part, image = related.get_payload()
    assert image.get_content_type() == "image/png"
    assert image.get_payload(decode=True) == PNG
    cid = image["Content-ID"].strip("<>")
    html = html_part.get_content()
    assert f'src="cid:{cid}"' in html
    assert "<td>4242</td>" in html
    assert "&lt;b&gt;x&lt;/b&gt;" in html and "<b>x</b>" not in html  # a process's own name


def test_without_a_plot_the_html_has_no_image():
    mail = parsed(png=None)
    assert [part.get_content_type() for part in mail.walk()] == [
        "multipart/alternative",
        "text/plain",
        "text/html",
    ]
    assert "<img" not in mail.get_body(("html",)).get_content()


def test_a_release_mail_says_the_limits_are_back():
    released = MailFacts(**{**FACTS.__dict__, "kind": "released", "limits": "CPUQuota=100%"})
    mail = parsed(released)
    assert "limits are back" in mail["Subject"]
    text = mail.get_body(("plain",)).get_content()
    assert "your usual limits are back" in text and "CPUQuota=100%" in text


def test_an_admins_penalty_says_so():
    by_admin = MailFacts(**{**FACTS.__dict__, "actor": "root", "reason": "by root"})
    assert "an administrator put you in this penalty (by root)" in plain_text(by_admin)


def test_a_watched_event_goes_to_admins_alone():
    watched = MailFacts(**{**FACTS.__dict__, "watched": True})
    mail = parsed(watched)
    assert mail["To"] == "hpc@example.org, ops@example.org"
    assert mail["Bcc"] is None
    assert mail["Subject"].startswith("[watch] ")
    assert (
        "No limit was changed and the user was not told" in mail.get_body(("plain",)).get_content()
    )


def test_a_name_that_makes_no_address_leaves_admins_alone_and_nobody_is_nothing():
    odd = MailFacts(**{**FACTS.__dict__, "user": "bob smith"})
    assert parsed(odd)["To"] == "hpc@example.org, ops@example.org"
    lonely = Notify(host="h", sender="a@b.org", user_address="{user}@example.org")
    assert build_mail(lonely, MailFacts(**{**FACTS.__dict__, "watched": True})) is None


def test_top_processes_reads_this_users_processes_busiest_first():
    found = top_processes(os.getuid(), count=10_000)
    assert os.getpid() in [p.pid for p in found]
    assert all(a.cores >= b.cores for a, b in itertools.pairwise(found))
    mine = next(p for p in found if p.pid == os.getpid())
    assert mine.memory > 0 and os.path.isabs(mine.executable)
    assert len(top_processes(os.getuid(), count=1)) == 1


def eviction(kind: str) -> MailFacts:
    return MailFacts(
        user="eve",
        uid=5600,
        host="login1",
        kind=kind,
        tier="-",
        message="",
        limits=None,
        expiry=None,
        reason="evicted pid 200 (python3 big.py, 601M) to checkpoint 5600-20270115T080000Z-0a1b2c",
        actor="admin",
        cpu_threshold=0.8,
        memory_threshold=0.5,
    )


def test_an_eviction_mail_says_what_was_saved_and_who_can_bring_it_back():
    mail = parsed(eviction("evicted"), png=None)
    assert mail["To"] == "eve@example.org" and mail["Bcc"] == "hpc@example.org, ops@example.org"
    assert mail["Subject"] == "cgpolicy on login1: a job of yours was saved to disk, not killed"
    text = mail.get_body(("plain",)).get_content()
    assert "An administrator (admin) stopped one of your jobs on login1" in text
    assert "checkpoint 5600-20270115T080000Z-0a1b2c" in text
    assert "an administrator can restore it on login1" in text
    assert "penalty" not in text and "Badness" not in text  # no tier's words
    assert "checkpoint 5600-20270115T080000Z-0a1b2c" in mail.get_body(("html",)).get_content()


def test_a_restore_mail_says_the_job_runs_again():
    mail = parsed(eviction("restored"), png=None)
    assert mail["Subject"] == "cgpolicy on login1: your evicted job runs again"
    text = mail.get_body(("plain",)).get_content()
    assert "An administrator (admin) restored your evicted job on login1" in text
    assert "runs again from where it stopped" in text and "penalty" not in text
