"""A mail server for unit tests: just enough SMTP, on a socket, in a thread.

The real proof is the VM's mail server; this one lets the unit tests see what
smtplib sends and make it fail on purpose: ``reply_to_data`` other than 250
refuses the message, ``stop()`` takes the server away altogether.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from dataclasses import dataclass, field


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes


@dataclass
class Mailbox:
    received: list[Received] = field(default_factory=list)
    reply_to_data: str = "250 2.0.0 queued"
    reply_to_rcpt: str = "250 2.1.5 ok"
    tries: int = 0  # DATA commands seen, accepted or not


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")

    def handle(self) -> None:
        box = self.server.box
        self.reply("220 fake ESMTP")
        sender, recipients = "", []
        while True:
            line = self.rfile.readline()
            if not line:
                return
            command = line.decode("ascii", "replace").strip()
            verb = command[:4].upper()
            if verb in ("EHLO", "HELO"):
                self.reply("250 fake")
            elif verb == "MAIL":
                sender, recipients = command.partition(":")[2].strip(" <>"), []
                self.reply("250 2.1.0 ok")
            elif verb == "RCPT":
                if box.reply_to_rcpt.startswith("250"):
                    recipients.append(command.partition(":")[2].strip(" <>"))
                self.reply(box.reply_to_rcpt)
            elif verb == "DATA":
                self.reply("354 go on")
                lines = []
                while (line := self.rfile.readline()) not in (b".\r\n", b""):
                    lines.append(line[1:] if line.startswith(b"..") else line)
                box.tries += 1
                if box.reply_to_data.startswith("250"):
                    box.received.append(Received(sender, recipients, b"".join(lines)))
                self.reply(box.reply_to_data)
            elif verb == "QUIT":
                self.reply("221 bye")
                return
            else:
                self.reply("250 ok")


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    box: Mailbox


class FakeSmtp:
    """A server on 127.0.0.1; ``port`` stays the same across stop() and start()."""

    def __init__(self) -> None:
        self.box = Mailbox()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._server: _Server | None = None

    def start(self) -> FakeSmtp:
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.box = self.box
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
