"""cgpolicyd's mail queue: penalties and releases become mail, sent with retries.

An admin's eviction or restore (cgpolicyctl, outside cgpolicyd) becomes mail
too: the command writes it into the same queue with ``queue_mail`` and wakes
cgpolicyd's sender over the bus (SendMail), which sends it with the rest.

``notify`` writes the mail into the state database and returns: it never waits
for a mail server, and any failure is logged, never raised into a cycle. The
``sender`` task sends what is due, one SMTP conversation at a time in a thread;
a mail leaves the queue only once the server took it (or refused it for good),
so a restart or a server down for hours loses nothing: the next try waits
longer after each failure, up to RETRY_MAX.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import replace

from . import log
from .badness import Change, UserScore
from .errors import CgpolicyError, MailError
from .mail import EVICTION_KINDS, MailFacts, Process, build_mail, deliver, top_processes
from .policy import Notify, Policy
from .state import QueuedMail, StateStore

RETRY_FIRST = 15.0  # seconds before the second try
RETRY_MAX = 900.0  # the longest wait between two tries
IDLE_WAKE = 60.0  # the sender looks at the queue at least this often
PLOT_TIMEOUT = 30.0  # seconds the plot of a mail may take before it goes without

Png = Callable[[int], "bytes | None"]  # the plot of a uid's last hour; None: no history
Deliver = Callable[[Notify, bytes], None]


def no_png(_uid: int) -> bytes | None:
    return None


def retry_delay(attempts: int) -> float:
    """The wait after the ``attempts``-th failed try: doubling from RETRY_FIRST."""
    return float(min(RETRY_FIRST * 2.0 ** max(attempts - 1, 0), RETRY_MAX))


class Notifier:
    """The queue's two ends. ``settings`` gives the policy's [notify] now (None: no mail)."""

    def __init__(
        self,
        store: StateStore,
        settings: Callable[[], Notify | None],
        *,
        png: Png = no_png,
        send: Deliver = deliver,
        processes: Callable[[int], tuple[Process, ...]] = top_processes,
        clock: Callable[[], float] = time.time,
        host: str | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.png = png
        self.send = send
        self.processes = processes
        self.clock = clock
        self.host = host or socket.gethostname()
        self.wake = asyncio.Event()
        self.writing: set[asyncio.Task[None]] = set()  # mails being written

    def notify(self, facts: MailFacts) -> None:
        """Queue the mail for ``facts`` in the background; returns at once."""
        if self.settings() is None:
            return
        task = asyncio.get_running_loop().create_task(self._write(facts))
        self.writing.add(task)
        task.add_done_callback(self.writing.discard)

    async def _write(self, facts: MailFacts) -> None:
        try:
            # /proc and the plot are slow next to a cycle: read them off the loop.
            if not facts.processes:
                found = await asyncio.to_thread(self.processes, facts.uid)
                facts = replace(facts, processes=found)
            png = await self._png(facts.uid)
            self.enqueue(facts, png)
        except Exception as err:  # a mail must never end the daemon
            log.error(
                "mail-failed",
                log.fields(event="mail-failed", user=facts.user, uid=facts.uid, error=_reason(err)),
            )

    async def _png(self, uid: int) -> bytes | None:
        try:
            return await asyncio.wait_for(asyncio.to_thread(self.png, uid), PLOT_TIMEOUT)
        except Exception as err:  # a mail without its plot is better than none
            log.error(
                "mail-plot-failed",
                log.fields(event="mail-plot-failed", uid=uid, error=_reason(err)),
            )
            return None

    def enqueue(self, facts: MailFacts, png: bytes | None = None) -> int | None:
        """Write the mail into the queue now; its id, or None when it goes to nobody."""
        notify = self.settings()
        if notify is None:
            return None
        mail_id = queue_mail(self.store, notify, facts, self.clock(), png)
        if mail_id is not None:
            self.wake.set()
        return mail_id

    async def flush(self) -> None:
        """Wait for the mails being written (at shutdown: they reach the queue)."""
        if self.writing:
            await asyncio.gather(*self.writing, return_exceptions=True)

    async def send_due(self) -> int:
        """Try every mail that is due, once; the number sent."""
        notify = self.settings()
        if notify is None:
            return 0  # kept until [notify] is back
        sent = 0
        for mail in self.store.due_mail(self.clock()):
            if await self._try(notify, mail):
                sent += 1
        return sent

    async def _try(self, notify: Notify, mail: QueuedMail) -> bool:
        try:
            await asyncio.to_thread(self.send, notify, mail.message)
        except Exception as err:
            permanent = isinstance(err, MailError) and err.permanent
            attempt = mail.attempts + 1
            fields = {"event": "mail-failed", "mail": mail.id, "uid": mail.uid, "attempt": attempt}
            if permanent:
                self.store.mail_sent(mail.id)  # refused for good: retrying cannot help
                log.error(
                    "mail-failed", log.fields(**fields, error=_reason(err), retry="never, dropped")
                )
                return False
            delay = retry_delay(attempt)
            self.store.mail_failed(mail.id, self.clock() + delay, _reason(err))
            log.error(
                "mail-failed", log.fields(**fields, error=_reason(err), retry=f"in {delay:g}s")
            )
            return False
        self.store.mail_sent(mail.id)
        log.info(
            "mail-sent",
            log.fields(event="mail-sent", mail=mail.id, uid=mail.uid, attempt=mail.attempts + 1),
        )
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """The sender: send what is due, then sleep until the next is, or new mail."""
        while not stop.is_set():
            self.wake.clear()
            try:
                await self.send_due()
                due = self.store.next_mail_try()
            except Exception as err:  # the database busy or damaged, or a bug: try later
                log.error(
                    "mail-queue-failed", log.fields(event="mail-queue-failed", error=_reason(err))
                )
                due = None
            wait = IDLE_WAKE if due is None else min(max(due - self.clock(), 0.5), IDLE_WAKE)
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.wake.wait())]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED), wait
                )
            for waiter in waiters:
                waiter.cancel()


def queue_mail(
    store: StateStore, notify: Notify, facts: MailFacts, now: float, png: bytes | None = None
) -> int | None:
    """Write the mail for ``facts`` into the queue; its id, or None when it goes to nobody."""
    message = build_mail(notify, facts, png)
    if message is None:
        log.info(
            "mail-skipped",
            log.fields(event="mail-skipped", user=facts.user, reason="no recipient"),
        )
        return None
    mail_id = store.enqueue_mail(facts.uid, bytes(message), now)
    log.info(
        "mail-queued",
        log.fields(
            event="mail-queued",
            user=facts.user,
            uid=facts.uid,
            mail=mail_id,
            kind=facts.kind,
            tier=facts.tier,
            to=message["To"],
            watched="yes" if facts.watched else None,
        ),
    )
    return mail_id


def facts_for(
    policy: Policy,
    user: str,
    uid: int,
    change: Change,
    state: UserScore | None,
    limits: str | None,
    *,
    actor: str | None,
    watched: bool,
    host: str,
    when: float,
) -> MailFacts | None:
    """What the mail about ``change`` says; None for a change nobody is mailed about."""
    if change.kind == "penalized":
        tier = change.new_tier
    elif change.kind == "released":
        tier = change.old_tier
    else:
        return None  # a forgiven occurrence changes no limit
    found = policy.penalty.find(tier) if policy.penalty and tier else None
    return MailFacts(
        user=user,
        uid=uid,
        host=host,
        kind=change.kind,
        tier=tier or "-",
        message=found.message if found else "",
        limits=limits,
        expiry=state.tier_expiry if state and change.kind == "penalized" else None,
        reason=change.reason,
        actor=actor,
        cpu_threshold=policy.badness.cpu_threshold,
        memory_threshold=policy.badness.memory_threshold,
        watched=watched,
        when=when,
    )


def sample_facts(policy: Policy, user: str, uid: int, limits: str | None, when: float) -> MailFacts:
    """What ``cgpolicyctl notify-test`` sends: the mail of the policy's first tier."""
    tier = policy.penalty.tiers[0] if policy.penalty else None
    return MailFacts(
        user=user,
        uid=uid,
        host=socket.gethostname(),
        kind="sample",
        tier=tier.name if tier else "sample",
        message=tier.message if tier else "",
        limits=limits,
        expiry=when + (tier.timeout if tier else 1800),
        reason="a sample: no usage was judged",
        actor="cgpolicyctl notify-test",
        cpu_threshold=policy.badness.cpu_threshold,
        memory_threshold=policy.badness.memory_threshold,
        when=when,
    )


def eviction_facts(
    policy: Policy, user: str, uid: int, kind: str, reason: str, actor: str, when: float
) -> MailFacts:
    """What the mail about an admin's eviction or restore says: ``reason`` is the
    history's own words for it (which job, which checkpoint)."""
    if kind not in EVICTION_KINDS:
        raise ValueError(f"not an eviction's kind: {kind!r}")
    return MailFacts(
        user=user,
        uid=uid,
        host=socket.gethostname(),
        kind=kind,
        tier="-",
        message="",
        limits=None,
        expiry=None,
        reason=reason,
        actor=actor,
        cpu_threshold=policy.badness.cpu_threshold,
        memory_threshold=policy.badness.memory_threshold,
        when=when,
    )


def _reason(err: BaseException) -> str:
    return str(err) if isinstance(err, CgpolicyError) else f"{type(err).__name__}: {err}"
