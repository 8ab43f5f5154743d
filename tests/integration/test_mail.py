"""Mail on penalty and release through a real mail server: Debian's exim4 in the VM,
delivering to local mailboxes in /var/mail.

One setup for the module: mona (the user penalized) and mailadm (the admin in
Bcc), a policy whose [notify] sends through localhost:25, exim4 started. Under
the unit as shipped cgpolicyd may not open TCP sockets: it says so, as doctor
does, until the network drop-in is in place. An admin's penalty lands in mona's
mailbox with its tier; with exim4 stopped, a release and a new penalty wait in
the queue (a restart of cgpolicyd in between loses nothing) and arrive once
exim4 is back. exim4 is stopped, the drop-in removed and the previous policy
put back at the end.
"""

from __future__ import annotations

import email
import email.policy
import mailbox
import re
import shlex
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_daemon import daemon_log, diagnostics, log_mark, poll, root, wait_until_serving

from pam_cgpolicy.network import ENABLE

# v2 only: nothing here differs on cgroup v1 (see conftest.py)
pytestmark = [pytest.mark.vm, pytest.mark.v2_only]

REPO = Path(__file__).resolve().parents[2]
USER, UID = "mona", 5101
ADMIN, ADMIN_UID = "mailadm", 5102
BACKUP = "/root/cgpolicy-before-test-mail"
MESSAGE = "Your CPU use was heavy for long: your limits are lower for a while"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUEUED = "SELECT count(*) FROM mail"
DOCTOR = "cgpolicyctl doctor"
BEFORE: dict[str, Any] = {}  # the setup's doctor output and log, before the drop-in

POLICY = {
    # No penalty of the daemon's own during the test: badness would take a day.
    "cgpolicy.toml": f"""
        [general]
        min_uid = 1000
        interval = 2

        [status]
        order = ["mailed"]
        fallback = "others"

        [badness]
        time_to_max_bad = 86400

        [penalty]
        order = ["penalty1"]

        [penalty.penalty1]
        timeout = 600
        cpu_factor = 0.5
        memory_factor = 0.5
        message = "{MESSAGE}"

        [notify]
        host = "localhost"
        port = 25
        from = "cgpolicy@localhost"
        user_address = "{{user}}@localhost"
        admins = ["{ADMIN}@localhost"]
        """,
    "groups.d/mailed.toml": f"""
        users = ["{USER}"]
        [limits]
        CPUQuota = "100%"
        MemoryMax = "512M"
        """,
    "groups.d/others.toml": """
        [limits]
        CPUQuota = "100%"
        """,
}


def mails(vm, user: str) -> list[email.message.EmailMessage]:
    """The messages in the user's mailbox, parsed as a mail reader would."""
    data = root(vm, f"cat /var/mail/{user} 2>/dev/null || true").stdout.encode()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mbox"
        path.write_bytes(data)
        box = mailbox.mbox(path, create=False)
        parsed = [
            email.message_from_bytes(message.as_bytes(), policy=email.policy.default)
            for message in box
        ]
        box.close()
    return parsed  # type: ignore[return-value]


def wait_for_mails(vm, user: str, count: int, timeout: float = 60) -> list[Any]:
    return poll(
        f"{count} mails in /var/mail/{user}",
        lambda: mails(vm, user),
        lambda found: len(found) >= count,
        timeout,
        lambda: queue_text(vm) + diagnostics(vm, user),
        every=2.0,
    )


def queued(vm) -> int:
    """Mail waiting in cgpolicyd's queue, read from its state database."""
    db = "file:/var/lib/cgpolicy/state.db?mode=ro"
    script = (
        f"import sqlite3; db = sqlite3.connect({db!r}, uri=True); "
        f"print(db.execute({QUEUED!r}).fetchone()[0])"
    )
    cmd = f"python3 -c {shlex.quote(script)}"
    return int(root(vm, cmd).stdout.strip())


def queue_text(vm) -> str:
    return (
        f"--- queued mail: {queued(vm)}; exim4: "
        + root(
            vm, "systemctl is-active exim4; tail -n 5 /var/log/exim4/mainlog", check=False
        ).stdout
        + "\n"
    )


def body(message: Any) -> str:
    return message.get_body(("plain",)).get_content()


def check_plot(message: Any) -> None:
    """A PNG part, if there is one, is a decodable PNG shown inline by the HTML."""
    for part in message.walk():
        if part.get_content_type() == "image/png":
            assert part.get_payload(decode=True).startswith(PNG_MAGIC)
            cid = part["Content-ID"].strip("<>")
            assert f"cid:{cid}" in message.get_body(("html",)).get_content()


@pytest.fixture(scope="module")
def mail_node(vm) -> Iterator[Any]:
    from vmharness.install import allow_network, forbid_network, install_cgpolicy

    install_cgpolicy(vm, REPO)
    vm.add_user(USER, UID)
    vm.add_user(ADMIN, ADMIN_UID)
    root(vm, f"rm -rf {BACKUP} && cp -a /etc/cgpolicy {BACKUP}")
    root(vm, "rm -f /etc/cgpolicy/groups.d/*.toml")
    for name, text in POLICY.items():
        data = textwrap.dedent(text).lstrip().encode()
        vm.put_bytes(data, f"/etc/cgpolicy/{name}", mode=0o644)
    forbid_network(vm)  # the unit as shipped
    mark = log_mark(vm)
    # A restart, not a reload: an earlier module may have left cgpolicyd stopped.
    root(vm, "cgpolicyctl check && systemctl restart cgpolicyd")
    BEFORE["doctor"] = root(vm, DOCTOR, check=False).stdout
    BEFORE["log"] = daemon_log(vm, mark)
    allow_network(vm)
    root(vm, f"rm -f /var/mail/{USER} /var/mail/{ADMIN}; systemctl start exim4")
    vm.ssh("nohup sleep 100000 >/dev/null 2>&1 &", user=USER)  # mona's slice
    yield vm
    if vm.running:
        forbid_network(vm)
        # The policy first: with no [notify], the release queues no mail that would wait.
        root(
            vm,
            f"rm -rf /etc/cgpolicy && cp -a {BACKUP} /etc/cgpolicy && rm -rf {BACKUP} && "
            "systemctl restart cgpolicyd",
            check=False,
        )
        root(vm, f"cgpolicyctl release {USER}", check=False)
        root(vm, f"loginctl terminate-user {USER}; systemctl stop exim4", check=False)


def test_without_the_network_dropin_cgpolicyd_and_doctor_say_how_to_add_it(mail_node):
    # at the restart, and at a reload if the daemon before it saw the policy's edit
    lines = [line for line in BEFORE["log"] if "event=network-denied" in line]
    (warning,) = [line for line in BEFORE["doctor"].splitlines() if "] network:" in line]
    assert lines and all("Address family not supported" in line for line in lines), lines
    for said in (*lines, warning):
        assert all(command in said for command in ENABLE), said
    assert warning.startswith("[warn]")
    assert "] network:" not in root(mail_node, DOCTOR, check=False).stdout  # in place now


def test_a_penalty_mail_with_its_tier_lands_in_the_users_mailbox(mail_node):
    vm = mail_node
    root(vm, f"cgpolicyctl penalize {USER} penalty1")
    (mail,) = wait_for_mails(vm, USER, 1)
    assert MESSAGE in mail["Subject"] and "(penalty penalty1)" in mail["Subject"]
    assert mail["To"] == f"{USER}@localhost" and mail["Bcc"] is None
    text = body(mail)
    assert "penalty penalty1" in text and "CPUQuota=50%" in text and "MemoryMax=" in text
    assert "an administrator put you in this penalty (by uid 0 (root))" in text
    check_plot(mail)
    (copy,) = wait_for_mails(vm, ADMIN, 1)  # the admin's Bcc
    assert copy["Subject"] == mail["Subject"]


def first_failures(lines: list[str]) -> dict[str, str]:
    """mail id -> its first mail-failed line among ``lines``."""
    first: dict[str, str] = {}
    for line in lines:
        found = re.search(r"\bmail=(\d+)", line)
        if "event=mail-failed" in line and found:
            first.setdefault(found[1], line)
    return first


def test_mail_waits_while_the_server_is_down_even_across_a_restart(mail_node):
    vm = mail_node
    root(vm, "systemctl stop exim4")
    mark = log_mark(vm)
    root(vm, f"cgpolicyctl release {USER} && cgpolicyctl penalize {USER} penalty1")
    # The penalty's mail is queued once its plot is drawn (seconds in the emulated
    # guest): the release's mail may have failed twice by then.
    first = poll(
        "each mail's first failed try, logged with its reason",
        lambda: first_failures(daemon_log(vm, mark)),
        lambda tries: len(tries) >= 2,
        60,
        lambda: diagnostics(vm, USER),
    )
    assert all("attempt=1" in line and "Connection refused" in line for line in first.values())
    assert queued(vm) == 2 and len(mails(vm, USER)) == 1
    pid = int(root(vm, "systemctl show -p MainPID --value cgpolicyd").stdout)
    root(vm, "systemctl restart cgpolicyd")
    wait_until_serving(vm, other_than=pid)
    assert queued(vm) == 2
    root(vm, "systemctl start exim4")
    found = wait_for_mails(vm, USER, 3, timeout=90)  # the next try may be 30 s away
    # The two waiting mails may arrive in either order: a try that fails while the
    # server starts puts that mail behind the other.
    (release,) = [m for m in found[1:] if "your limits are back" in m["Subject"]]
    (penalty,) = [m for m in found[1:] if MESSAGE in m["Subject"]]
    assert "(penalty penalty1 ended)" in release["Subject"]
    assert "your usual limits are back" in body(release) and "CPUQuota=100%" in body(release)
    check_plot(penalty)
    assert queued(vm) == 0
