"""cgpolicyctl notify-test USER: the sample mail, sent straight to the server."""

from __future__ import annotations

import email
import email.policy
import os
import pwd

import pytest
from fakesmtp import FakeSmtp
from policyfiles import DAEMON_SECTIONS, MAIN, write_policy

from pam_cgpolicy import cli

ME = pwd.getpwuid(os.getuid()).pw_name


def notify(port: int) -> str:
    return (
        f'\n[notify]\nhost = "127.0.0.1"\nport = {port}\nfrom = "cgpolicy@example.org"\n'
        'user_address = "{user}@example.org"\nadmins = ["hpc@example.org"]\n'
    )


@pytest.fixture
def smtp():
    server = FakeSmtp().start()
    yield server
    server.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="notify-test is root's: run the suite as root")
def test_notify_test_sends_the_first_tiers_sample_and_says_to_whom(tmp_path, smtp, capsys):
    config = write_policy(tmp_path / "etc", MAIN + DAEMON_SECTIONS + notify(smtp.port))
    assert cli.main(["--config-dir", str(config), "notify-test", ME]) == 0
    out = capsys.readouterr().out
    assert out == f"{ME}: sample mail sent to {ME}@example.org (Bcc: hpc@example.org)\n"
    (got,) = smtp.box.received
    assert sorted(got.recipients) == sorted([f"{ME}@example.org", "hpc@example.org"])
    mail = email.message_from_bytes(got.data, policy=email.policy.default)
    assert mail["Subject"].startswith("[sample] ") and "new (penalty penalty1)" in mail["Subject"]
    assert "none of your limits was changed" in mail.get_body(("plain",)).get_content()


def test_notify_test_says_why_it_cannot_send(tmp_path, smtp, capsys, monkeypatch):
    config = write_policy(tmp_path / "etc", MAIN + DAEMON_SECTIONS + notify(smtp.port))
    if os.geteuid() == 0:
        smtp.stop()
        assert cli.main(["--config-dir", str(config), "notify-test", ME]) == 1
        assert "ConnectionRefusedError" in capsys.readouterr().err
        write_policy(tmp_path / "etc", MAIN + DAEMON_SECTIONS)
        assert cli.main(["--config-dir", str(config), "notify-test", ME]) == 1
        assert "no [notify] table" in capsys.readouterr().err
    monkeypatch.setattr(cli.os, "geteuid", lambda: 1000)
    assert cli.main(["--config-dir", str(config), "notify-test", ME]) == 1
    assert "notify-test is for root" in capsys.readouterr().err
