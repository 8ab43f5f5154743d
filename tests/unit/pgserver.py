"""A private PostgreSQL server for the sync tests: its own data directory and socket.

Skipped where the machine has no PostgreSQL server installed. Run as the postgres
account when the tests run as root (the server refuses root).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PASSWORD = "s3cret-sync"
USER = "cgpolicy"


@dataclass(frozen=True)
class Server:
    socket_dir: str  # libpq's host: a directory is a unix socket's
    port: int
    password_file: Path

    def stop(self, data: Path, as_user: list[str]) -> None:
        subprocess.run(
            [*as_user, _tool("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            check=False,
            capture_output=True,
        )


def _tool(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None
    )
    if found is None:
        pytest.skip(f"no PostgreSQL server on this machine ({name})")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(private: Path) -> Iterator[Server]:
    """A server until the generator ends; ``private`` keeps the node's password file."""
    initdb, pg_ctl = _tool("initdb"), _tool("pg_ctl")
    # its own directory: pytest's are root's alone, and the server runs as postgres
    root = Path(tempfile.mkdtemp(prefix="cgpolicy-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        account = pwd.getpwnam("postgres")
        os.chown(root, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    pwfile = root / "pw"
    pwfile.write_text(PASSWORD + "\n")
    os.chmod(pwfile, 0o644)  # initdb's, readable by postgres; the node's copy is below
    data, port = root / "data", _free_port()
    subprocess.run(
        [
            *as_user,
            initdb,
            "-D",
            str(data),
            "-U",
            USER,
            f"--pwfile={pwfile}",
            "--auth=scram-sha-256",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *as_user,
            pg_ctl,
            "-D",
            str(data),
            "-w",
            "-l",
            str(root / "log"),
            "-o",
            f"-k {root} -p {port} -c listen_addresses=''",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    secret = private / "password"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    server = Server(str(root), port, secret)
    try:
        yield server
    finally:
        server.stop(data, as_user)
        shutil.rmtree(root, ignore_errors=True)
