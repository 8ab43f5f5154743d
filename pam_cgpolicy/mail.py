"""The mail about a penalty or its end, or an eviction or its restore: what it says, and
one SMTP conversation to send it.

``build_mail`` makes the message from plain facts (no I/O), so that its text is
tested without a server; ``deliver`` sends one stored message with smtplib. The
user's address comes from the policy's ``user_address`` template alone, never
from NSS's GECOS field: users can change that field themselves (chfn), and a
root daemon must not mail whoever they name there.
"""

from __future__ import annotations

import email
import email.policy
import html
import os
import smtplib
import socket
import ssl
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from .errors import MailError
from .policy import Notify, is_address
from .slicelimits import format_size
from .trust import why_unsafe

TOP_PROCESSES = 5  # rows of the mail's process table
EVICTION_KINDS = ("evicted", "restored")
PLOT_NAME = "usage.png"


@dataclass(frozen=True)
class Process:
    """One of the user's processes as /proc shows it when the mail is written."""

    pid: int
    name: str
    executable: str
    cores: float  # CPU time over the process's lifetime, in cores
    memory: int  # resident bytes


@dataclass(frozen=True)
class MailFacts:
    """Everything one mail says. ``kind``: "penalized", "released" or "sample" (a test
    an admin sends: a penalty's mail that changed nothing), or one of EVICTION_KINDS
    (an admin's cgpolicyctl evict or restore: no tier, ``reason`` says what was done)."""

    user: str
    uid: int
    host: str
    kind: str
    tier: str
    message: str  # the tier's own message from the policy; may be empty
    limits: str | None  # the limits now in force, in the policy's notation
    expiry: float | None  # when the tier ends (epoch seconds)
    reason: str  # the change's own words: the badness and its parts, or the admin's action
    actor: str | None  # the admin who acted; None: the daemon judged the usage
    cpu_threshold: float
    memory_threshold: float
    processes: tuple[Process, ...] = ()
    watched: bool = False  # watch mode: nothing was changed, admins alone are told
    when: float = field(default_factory=time.time)


def user_address(notify: Notify, user: str) -> str | None:
    """The user's address from the template; None when it makes no plain address."""
    address = notify.user_address.format(user=user)
    return address if is_address(address) else None


def _local(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(when))


def _duration(seconds: float) -> str:
    minutes = max(0, round(seconds / 60))
    return f"{minutes} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def subject(facts: MailFacts) -> str:
    if facts.kind == "evicted":
        return f"cgpolicy on {facts.host}: a job of yours was saved to disk, not killed"
    if facts.kind == "restored":
        return f"cgpolicy on {facts.host}: your evicted job runs again"
    watch = "[watch] " if facts.watched else "[sample] " if facts.kind == "sample" else ""
    if facts.kind == "released":
        return f"{watch}cgpolicy on {facts.host}: your limits are back (penalty {facts.tier} ended)"
    what = facts.message or f"you are in penalty {facts.tier}"
    return f"{watch}cgpolicy on {facts.host}: {what} (penalty {facts.tier})"


def _paragraphs(facts: MailFacts) -> list[str]:
    """The body's paragraphs, plain text; the HTML part shows the same ones."""
    if facts.watched:
        lines = [
            f"Watch mode: {facts.user} (uid {facts.uid}) would have been "
            f"{'released from' if facts.kind == 'released' else 'put in'} penalty "
            f"{facts.tier} on {facts.host}. No limit was changed and the user was not told."
        ]
    else:
        lines = [f"Hello {facts.user},"]
    if facts.kind in EVICTION_KINDS:
        return [*lines, *_eviction_paragraphs(facts)]
    if facts.kind == "sample":
        lines.append(
            "This is a sample of the mail cgpolicy sends at a penalty, sent by an "
            "administrator to test the mail settings: none of your limits was changed."
        )
    if facts.kind == "released":
        lines.append(
            f"Your penalty {facts.tier} on {facts.host} ended at {_local(facts.when)}: "
            "your usual limits are back."
        )
        if facts.limits:
            lines.append(f"Your limits now: {facts.limits}")
        return lines
    if facts.message:
        lines.append(facts.message)
    until = ""
    if facts.expiry is not None:
        until = f" until {_local(facts.expiry)} ({_duration(facts.expiry - facts.when)})"
    lines.append(
        f"On {facts.host}, your processes have been given lower limits{until}: "
        f"penalty {facts.tier}."
    )
    if facts.limits:
        lines.append(f"Your limits until then: {facts.limits}")
    rule = (
        f"Badness grows while you use more than {facts.cpu_threshold:.0%} of your CPU "
        f"quota or {facts.memory_threshold:.0%} of your memory limit, and falls while you "
        "use less; at 100 the next penalty begins. When a penalty ends, your limits come "
        "back by themselves."
    )
    if facts.actor is None:
        lines.append(f"Why: your usage was heavy for too long ({facts.reason}). {rule}")
    else:
        lines.append(f"Why: an administrator put you in this penalty ({facts.reason}). {rule}")
    return lines


def _eviction_paragraphs(facts: MailFacts) -> list[str]:
    who = f"An administrator ({facts.actor})" if facts.actor else "An administrator"
    if facts.kind == "restored":
        return [
            f"{who} restored your evicted job on {facts.host} at {_local(facts.when)}: "
            f"{facts.reason}.",
            "It runs again from where it stopped, in the background, detached from any "
            "terminal, and counts against your limits again.",
        ]
    return [
        f"{who} stopped one of your jobs on {facts.host} at {_local(facts.when)} and saved "
        f"it to disk instead of killing it: {facts.reason}. The rest of your session runs on.",
        "The job is not running now, and nothing of it is lost: an administrator can "
        f"restore it on {facts.host}, where it goes on from where it stopped. Ask them when "
        "you need it back, naming its checkpoint.",
    ]


def _rows(facts: MailFacts) -> list[tuple[str, ...]]:
    return [
        (str(p.pid), f"{p.cores:.2f}", format_size(p.memory), p.name, p.executable)
        for p in facts.processes
    ]


HEADER = ("PID", "CPU (cores)", "Memory", "Name", "Executable")
TABLE_TITLE = "Top processes when this mail was written (CPU: cores on average since each started)"


def plain_text(facts: MailFacts) -> str:
    parts = _paragraphs(facts)
    rows = _rows(facts)
    if rows:
        widths = [max(len(row[i]) for row in [HEADER, *rows]) for i in range(len(HEADER))]
        table = [
            "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
            for row in [HEADER, *rows]
        ]
        parts.append(f"{TABLE_TITLE}:\n" + "\n".join(table))
    return "\n\n".join(parts) + "\n"


def html_text(facts: MailFacts, plot_cid: str | None) -> str:
    body = [f"<p>{html.escape(text)}</p>" for text in _paragraphs(facts)]
    rows = _rows(facts)
    if rows:
        cells = "".join(f"<th>{html.escape(h)}</th>" for h in HEADER)
        lines = [f"<tr>{cells}</tr>"]
        for row in rows:
            lines.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
        body.append(
            f"<p>{html.escape(TABLE_TITLE)}:</p>"
            '<table border="1" cellpadding="4" cellspacing="0">' + "".join(lines) + "</table>"
        )
    if plot_cid is not None:
        body.append(
            f'<p>Your last hour:</p><p><img src="cid:{plot_cid[1:-1]}" alt="CPU and memory '
            'over the last hour"></p>'
        )
    return "<html><body>" + "".join(body) + "</body></html>"


def build_mail(notify: Notify, facts: MailFacts, png: bytes | None = None) -> EmailMessage | None:
    """The mail for ``facts``: to the user, admins in Bcc; to admins alone when watched.

    None when it would reach nobody (no admins for a watched event, and neither
    a user address nor admins).
    """
    to = None if facts.watched else user_address(notify, facts.user)
    admins = list(notify.admins)
    if to is None and not admins:
        return None
    message = EmailMessage()
    message["Subject"] = subject(facts)
    message["From"] = notify.sender
    message["To"] = to or ", ".join(admins)
    if to is not None and admins:
        message["Bcc"] = ", ".join(admins)
    message["Date"] = formatdate(facts.when, localtime=True)
    message["Message-ID"] = make_msgid("cgpolicy", domain=_domain(notify.sender))
    message["Auto-Submitted"] = "auto-generated"  # no vacation replies to the daemon
    message.set_content(plain_text(facts))
    cid = make_msgid("plot", domain=_domain(notify.sender)) if png else None
    message.add_alternative(html_text(facts, cid), subtype="html")
    if png and cid:
        html_part = message.get_body(("html",))
        assert isinstance(html_part, EmailMessage)
        html_part.add_related(png, "image", "png", cid=cid, filename=PLOT_NAME)
    return message


def _domain(address: str) -> str:
    return address.rpartition("@")[2] or socket.gethostname()


def read_password(path: str) -> str:
    """The SMTP password: the file's first line, if the file is still root's alone."""
    reason = why_unsafe(path, {0, os.geteuid()})
    if reason is None and os.lstat(path).st_mode & 0o077:
        reason = "readable by others than root"
    if reason is not None:
        raise MailError(f"password file {path}: {reason}")
    try:
        with open(path, encoding="utf-8") as file:
            return file.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as err:
        raise MailError(f"password file {path}: {err}") from err


def deliver(notify: Notify, data: bytes) -> None:
    """Send one stored message over SMTP; MailError says why not.

    Blocking, bounded by ``notify.timeout`` per network step: run it in a thread.
    A refusal for good (5xx for every recipient, or for the message) is
    ``permanent``; anything else may pass on a later try.
    """
    message = email.message_from_bytes(data, policy=email.policy.SMTP)
    try:
        with smtplib.SMTP(notify.host, notify.port, timeout=notify.timeout) as smtp:
            if notify.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if notify.user:
                smtp.login(notify.user, read_password(notify.password_file))
            smtp.send_message(message)  # takes Bcc off the message it sends
    except smtplib.SMTPRecipientsRefused as err:
        codes = [code for code, _text in err.recipients.values()]
        raise MailError(
            f"every recipient refused: {_refusals(err.recipients)}",
            permanent=all(code >= 500 for code in codes),
        ) from err
    except smtplib.SMTPDataError as err:
        raise MailError(
            f"message refused: {err.smtp_code} {_text(err.smtp_error)}",
            permanent=err.smtp_code >= 500,
        ) from err
    except smtplib.SMTPResponseException as err:
        raise MailError(
            f"{notify.host}:{notify.port}: {err.smtp_code} {_text(err.smtp_error)}"
        ) from err
    except (OSError, smtplib.SMTPException) as err:  # refused, unreachable, timed out
        raise MailError(f"{notify.host}:{notify.port}: {type(err).__name__}: {err}") from err


def _text(reply: bytes | str) -> str:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply


def _refusals(recipients: dict[str, tuple[int, bytes]]) -> str:
    return "; ".join(f"{to}: {code} {_text(text)}" for to, (code, text) in recipients.items())


def top_processes(uid: int, count: int = TOP_PROCESSES, proc: str = "/proc") -> tuple[Process, ...]:
    """The user's processes using the most CPU over their lifetime, then memory."""
    ticks = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    try:
        with open(os.path.join(proc, "uptime"), encoding="ascii") as file:
            uptime = float(file.read().split()[0])
        pids = [name for name in os.listdir(proc) if name.isdigit()]
    except (OSError, ValueError, IndexError):
        return ()
    found = []
    for pid in pids:
        base = os.path.join(proc, pid)
        try:
            if os.stat(base).st_uid != uid:
                continue
            with open(os.path.join(base, "stat"), "rb") as file:
                stat = file.read()
            closing = stat.rindex(b")")
            name = stat[stat.index(b"(") + 1 : closing].decode("utf-8", "replace")
            rest = stat[closing + 2 :].split()
            cpu = (int(rest[11]) + int(rest[12])) / ticks  # utime + stime
            age = max(uptime - int(rest[19]) / ticks, 1.0)
            memory = int(rest[21]) * page  # rss
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or a kernel thread
        try:
            executable = os.readlink(os.path.join(base, "exe"))
        except OSError:
            executable = ""
        found.append(Process(int(pid), name, executable, cpu / age, memory))
    found.sort(key=lambda p: (p.cores, p.memory), reverse=True)
    return tuple(found[:count])
