"""The hook as pam_exec runs it, in a real process, when things around it break."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from policyfiles import GROUPS, write_policy

HOOK_TIMEOUT = 1.5  # policyfiles.MAIN
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# Starts argv with exactly these environment entries, in this order and with
# repeats, as pam_exec does (a mapping cannot hold two entries of one name).
LAUNCHER = """
import ctypes, json, sys
argv, env = json.load(sys.stdin)
def strings(words):
    return (ctypes.c_char_p * (len(words) + 1))(*[w.encode() for w in words], None)
ctypes.CDLL(None).execve(argv[0].encode(), strings(argv), strings(env))
sys.exit("execve failed")
"""


def run_hook(
    tmp_path,
    bus_address,
    pam_type="open_session",
    user="nobody",
    pam_environment=(),
    args=None,
    merged=False,
):
    """The hook as pam_exec starts it: the PAM environment, then pam_exec's own items.

    ``merged``: stderr on the stdout pipe, as pam_exec's stdout option has it.
    """
    if args is None:
        args = [
            f"--config-dir={tmp_path / 'etc'}",
            "--state-dir",
            str(tmp_path / "state"),
            f"--bus-address={bus_address}",
        ]
    argv = [sys.executable, "-m", "pam_cgpolicy.hook", *args]
    env = [
        *(f"{name}={value}" for name, value in os.environ.items()),
        *pam_environment,
        f"PAM_USER={user}",
        f"PAM_TYPE={pam_type}",
    ]
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", LAUNCHER],
        input=json.dumps([argv, env]),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merged else subprocess.PIPE,
        text=True,
        timeout=30,
    )
    return done, time.monotonic() - started


@pytest.fixture
def silent_bus(tmp_path):
    """A socket that accepts connections and never says a word: a hung bus."""
    path = tmp_path / "bus"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(8)
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"unix:path={path}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_hung_bus_lets_the_login_through_within_the_timeout(tmp_path, silent_bus):
    write_policy(tmp_path / "etc")
    done, elapsed = run_hook(tmp_path, silent_bus)
    assert done.returncode == 0
    assert elapsed < HOOK_TIMEOUT + 1.0
    assert "user=nobody" in done.stderr and "action=" in done.stderr
    assert "Traceback" not in done.stderr


def test_dead_bus_lets_the_login_through(tmp_path):
    write_policy(tmp_path / "etc")
    done, _ = run_hook(tmp_path, f"unix:path={tmp_path}/no-such-bus")
    assert done.returncode == 0
    assert "action=failed" in done.stderr and "Failed to connect to bus" in done.stderr


def test_broken_policy_without_a_last_good_copy(tmp_path):
    write_policy(tmp_path / "etc", groups=dict(GROUPS, normal="[limits\n"))
    done, _ = run_hook(tmp_path, f"unix:path={tmp_path}/no-such-bus")
    assert done.returncode == 0
    assert "normal.toml:1: not valid TOML" in done.stderr
    assert 'action=skipped reason="no valid policy"' in done.stderr


def test_unknown_user_and_close_session(tmp_path):
    write_policy(tmp_path / "etc")
    done, _ = run_hook(tmp_path, "unix:path=/dev/null", user="no-such-user-x")
    assert done.returncode == 0 and "no such user" in done.stderr
    done, _ = run_hook(tmp_path, "unix:path=/dev/null", pam_type="close_session")
    assert done.returncode == 0 and done.stderr == ""


def test_root_is_skipped_without_touching_the_bus(tmp_path):
    write_policy(tmp_path / "etc")
    done, _ = run_hook(tmp_path, "unix:path=/dev/null", user="root")
    assert done.returncode == 0
    assert 'action=skipped reason="root is never limited"' in done.stderr


def test_the_hook_imports_nothing_heavy():
    """The login cost depends on it: no D-Bus stack, asyncio, typing, enum or TOML parser."""
    code = (
        f"import sys; sys.path.insert(0, {ROOT!r}); import pam_cgpolicy.hook; "
        "print(' '.join(sorted(sys.modules)))"
    )
    loaded = set(
        subprocess.run(
            [sys.executable, "-I", "-S", "-c", code], check=True, capture_output=True, text=True
        ).stdout.split()
    )
    heavy = {
        "asyncio",
        "dbus_fast",
        "typing",
        "enum",
        "dataclasses",
        "tomllib",
        "sqlite3",
        "json",
        "re",
        "pathlib",
        "subprocess",
        "signal",
    }
    assert "pam_cgpolicy.hook" in loaded
    assert loaded & heavy == set()
