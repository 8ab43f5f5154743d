"""Log entries in the journal's native protocol: fields, their encoding, the fallback."""

from __future__ import annotations

import array
import os
import re
import socket
from pathlib import Path

import pytest

from pam_cgpolicy import log


def parse(datagram: bytes) -> list[tuple[str, bytes]]:
    """The journal's reading of a native datagram: NAME=value lines, or NAME\\n + le64 + data."""
    fields, i = [], 0
    while i < len(datagram):
        end = datagram.index(b"\n", i)
        line = datagram[i:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            i = end + 1
        else:
            name, size = line, int.from_bytes(datagram[end + 1 : end + 9], "little")
            value = datagram[end + 9 : end + 9 + size]
            assert datagram[end + 9 + size : end + 10 + size] == b"\n"
            i = end + 10 + size
        fields.append((name.decode(), value))
    return fields


@pytest.fixture
def journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A datagram socket standing in for the journal's."""
    path = str(tmp_path / "journal-socket")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(5)
    monkeypatch.setattr(log, "JOURNAL_SOCKET", path)
    log.close_log()
    log.open_log("cgpolicy-test")
    yield server
    log.close_log()
    server.close()


def test_plain_values_are_name_equals_value() -> None:
    assert log.journal_field("CGPOLICY_USER", "bob") == b"CGPOLICY_USER=bob\n"


def test_a_value_with_a_newline_cannot_start_a_field_of_its_own() -> None:
    forged = "bob\nCGPOLICY_USER=root\nMESSAGE_ID=0"
    fields = parse(log.journal_field("CGPOLICY_USER", forged))
    assert fields == [("CGPOLICY_USER", forged.encode())]


def test_an_entry_carries_its_fields(journal: socket.socket) -> None:
    log.info("penalized", "user=bob event=penalized", user="bob", uid=5201, tier="penalty1")
    fields = dict(parse(journal.recv(65536)))
    assert fields["MESSAGE"] == b"user=bob event=penalized"
    assert fields["CGPOLICY_EVENT"] == b"penalized"
    assert fields["CGPOLICY_USER"] == b"bob"
    assert fields["CGPOLICY_UID"] == b"5201"
    assert fields["CGPOLICY_TIER"] == b"penalty1"
    assert fields["MESSAGE_ID"] == log.MESSAGE_IDS["penalized"].encode()
    assert fields["PRIORITY"] == b"6" and fields["SYSLOG_IDENTIFIER"] == b"cgpolicy-test"


def test_a_forged_process_name_stays_inside_its_message(journal: socket.socket) -> None:
    log.error("held", "name=x\nCGPOLICY_USER=root", uid=5201)
    fields = parse(journal.recv(65536))
    assert [name for name, _ in fields].count("CGPOLICY_USER") == 0
    assert dict(fields)["MESSAGE"] == b"name=x\nCGPOLICY_USER=root"


def test_an_entry_too_big_for_a_datagram_goes_as_a_memfd(journal: socket.socket) -> None:
    big = "x" * (4 * 1024 * 1024)
    log.error("call-failed", big)
    fds = array.array("i")
    _, ancillary, _, _ = journal.recvmsg(1, socket.CMSG_SPACE(fds.itemsize))
    fds.frombytes(ancillary[0][2][: fds.itemsize])
    with os.fdopen(fds[0], "rb") as memfd:
        memfd.seek(0)  # the journal reads it from the start, whatever its offset
        assert dict(parse(memfd.read()))["MESSAGE"] == big.encode()


def test_without_the_journal_the_entry_goes_to_syslog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    said: list[tuple[int, str]] = []
    monkeypatch.setattr(log, "JOURNAL_SOCKET", str(tmp_path / "absent"))
    log.close_log()
    monkeypatch.setattr(log.syslog, "syslog", lambda priority, text: said.append((priority, text)))
    log.info("reloaded", "event=reloaded groups=3")
    log.close_log()
    assert said == [(6, "event=reloaded groups=3")]


def test_each_event_kind_has_its_own_uuid() -> None:
    ids = list(log.MESSAGE_IDS.values())
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_every_event_the_code_names_has_a_message_id() -> None:
    """Literal kinds in log.info/log.error calls, and the actions a decision can take."""
    root = Path(__file__).resolve().parents[2] / "pam_cgpolicy"
    named = set()
    for source in root.glob("*.py"):
        named |= set(re.findall(r'log\.(?:info|error)\(\s*"([\w-]+)"', source.read_text()))
    named |= {"applied", "exempt", "skipped", "failed", "released", "penalized", "forgiven"}
    assert named - set(log.MESSAGE_IDS) == set()
