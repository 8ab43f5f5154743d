"""TCP under the unit as shipped: which policies need it, and doctor's warning, worded by
network.denied as cgpolicyd's log line is (test_daemon_reload)."""

from __future__ import annotations

import errno
import socket
from dataclasses import replace
from pathlib import Path

import pytest
from policyfiles import write_policy

from pam_cgpolicy import cli, network
from pam_cgpolicy.constants import NETWORK_DROPIN
from pam_cgpolicy.errors import SystemdError
from pam_cgpolicy.policy import Notify, Policy, Sync, load_policy

SMTP = Notify("smtp.example.org", sender="a@example.org", user_address="{user}@example.org")


def sync(host: str) -> Sync:
    return Sync(host, "cgpolicy", "cgpolicy", "login", "login1")


@pytest.fixture
def plain(tmp_path: Path) -> Policy:
    return load_policy(write_policy(tmp_path / "plain"))


def test_mail_and_a_database_over_tcp_need_it_a_socket_directory_does_not(plain):
    assert network.needs(plain) == ()
    assert network.needs(replace(plain, notify=SMTP)) == ("[notify]",)
    assert network.needs(replace(plain, sync=sync("db.example.org"))) == ("[sync]",)
    assert network.needs(replace(plain, sync=sync("10.0.0.5"))) == ("[sync]",)
    assert network.needs(replace(plain, sync=sync("/var/run/postgresql"))) == ()
    both = replace(plain, notify=SMTP, sync=sync("db"))
    assert network.needs(both) == ("[notify]", "[sync]")


def test_the_words_name_the_sections_the_dropin_and_the_commands():
    text = network.denied(("[notify]", "[sync]"))
    assert text.startswith("[notify] and [sync] reach their servers over TCP")
    assert NETWORK_DROPIN in text
    assert text.endswith(" && ".join(network.ENABLE))
    assert network.denied(("[notify]",)).startswith("[notify] reaches its server over TCP")


@pytest.mark.parametrize(
    ("allow_list", "families", "allowed"),
    [
        (True, ["AF_UNIX"], False),  # the unit as shipped
        (True, ["AF_UNIX", "AF_INET", "AF_INET6"], True),  # with the drop-in
        (True, [], False),  # RestrictAddressFamilies=none
        (False, [], True),  # no restriction at all
        (False, ["AF_INET"], False),  # ~AF_INET
        (False, ["AF_PACKET"], True),  # ~AF_PACKET
    ],
)
def test_the_units_families_as_systemd_gives_them(allow_list, families, allowed):
    assert network.unit_allows(allow_list, families) is allowed


def test_doctor_warns_only_when_the_policy_needs_tcp_and_the_unit_refuses_it(plain):
    mail = network.needs(replace(plain, notify=SMTP))
    assert network.doctor_warning(mail, True, ["AF_UNIX"]) == network.denied(("[notify]",))
    assert network.doctor_warning(mail, True, ["AF_UNIX", "AF_INET", "AF_INET6"]) is None
    assert network.doctor_warning(network.needs(plain), True, ["AF_UNIX"]) is None


def test_doctors_check_asks_systemd_only_when_the_policy_needs_tcp(plain, monkeypatch):
    asked: list[bool] = []

    def unit_says(allow_list: bool, families: list[str]):
        def with_systemd(_work):
            asked.append(True)
            return allow_list, families

        return with_systemd

    monkeypatch.setattr(cli, "_with_systemd", unit_says(True, ["AF_UNIX"]))
    assert cli._network_check(plain) == [] and not asked
    mail = replace(plain, notify=SMTP)
    assert cli._network_check(mail) == [("warn", "network", network.denied(("[notify]",)))]
    monkeypatch.setattr(cli, "_with_systemd", unit_says(True, ["AF_UNIX", "AF_INET"]))
    assert cli._network_check(mail) == []

    def unreachable(_work):
        raise SystemdError("org.freedesktop.DBus.Error.NoReply", "no bus")

    monkeypatch.setattr(cli, "_with_systemd", unreachable)
    assert cli._network_check(mail) == []  # the systemd check says so already


def test_only_the_refusal_the_unit_gives_counts(monkeypatch):
    assert network.refused() is None  # this test's process may open TCP sockets

    def failing(code: int):
        def make(*_args):
            raise OSError(code, "no")

        return make

    monkeypatch.setattr(socket, "socket", failing(errno.EAFNOSUPPORT))
    err = network.refused()
    assert err is not None and err.errno == errno.EAFNOSUPPORT
    monkeypatch.setattr(socket, "socket", failing(errno.EMFILE))
    assert network.refused() is None
