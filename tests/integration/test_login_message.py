"""The login message and the journal's fields, over real ssh, sshd and PAM.

lena is penalized by root; nora is not. Logging in with a terminal (`ssh -tt`), lena
sees the hook's one line among sshd's login messages and nora sees none. Without
one, lena's scp, sftp, rsync and `ssh host command` carry her file byte for
byte: pam_exec's stdout option makes the line a PAM text message, which sshd
never writes into a session's data. The clients run inside the guest, with the
harness key, so rsync needs nothing on the host. Then `journalctl
CGPOLICY_USER=lena` finds the hook's entries and cgpolicyd's.

One set-up for every check, and it leaves the node as it found it: the policy
files back, nobody penalized.
"""

from __future__ import annotations

import json
import shlex
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_daemon import POLICY, diagnostics, root, write_policy

# v2 only: nothing here differs on cgroup v1 (see conftest.py)
pytestmark = [pytest.mark.vm, pytest.mark.v2_only]

REPO = Path(__file__).resolve().parents[2]
USERS = {"lena": 5201, "nora": 5202}  # both in the fallback group "normal"
KEY = "/root/.cgpolicy-login-key"
BACKUP = "/root/cgpolicy-login-policy"
LINE = "cgpolicy: your limits are lowered to penalty tier penalty1"
# test_daemon.py's policy, with a penalty that outlasts the module and badness too
# slow to penalize anyone by itself meanwhile.
MAIN = (
    textwrap.dedent(POLICY["cgpolicy.toml"])
    .replace("time_to_max_bad = 10", "time_to_max_bad = 86400")
    .replace("timeout = 40", "timeout = 3600")
)
OPTIONS = (
    f"-i {KEY} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
    "-o LogLevel=ERROR -o BatchMode=yes"
)
SSH = f"ssh {OPTIONS}"
DATA = "/root/cgpolicy-login-data"  # random bytes, and a line end or two


@pytest.fixture(scope="module")
def node(vm) -> Iterator[Any]:
    from vmharness.install import install_cgpolicy

    install_cgpolicy(vm, REPO)
    for name, uid in USERS.items():
        vm.add_user(name, uid)
    root(vm, f"rm -rf {BACKUP} && cp -a /etc/cgpolicy {BACKUP}")
    write_policy(vm, {**POLICY, "cgpolicy.toml": MAIN})
    root(vm, "cgpolicyctl check && systemctl restart cgpolicyd")  # it may have been stopped
    vm.put_bytes(vm.image.ssh_key.read_bytes(), KEY, mode=0o600)
    root(vm, f"head -c 200000 /dev/urandom >{DATA} && printf 'a\\r\\nb\\n' >>{DATA}")
    for name in USERS:
        root(vm, f"install -o {name} -m 0644 {DATA} /home/{name}/data")
    try:
        yield vm
    finally:
        if vm.running:
            root(vm, "cgpolicyctl release lena", check=False)
            root(vm, f"rm -rf /etc/cgpolicy && mv {BACKUP} /etc/cgpolicy", check=False)
            root(vm, f"rm -f {KEY} {DATA} /tmp/cgpolicy-login-*", check=False)
            root(vm, "systemctl restart cgpolicyd", check=False)


def with_terminal(vm, user: str) -> str:
    """What an interactive login prints: sshd's login messages, the shell's prompt.

    sshd shows login messages only to a login shell on a terminal (not with a
    command, nor after ~/.hushlogin), so the shell reads its exit from stdin.
    """
    return root(vm, f"printf 'exit\\n' | {SSH} -tt {user}@127.0.0.1", check=False).stdout


def test_the_line_a_penalized_user_sees_and_nothing_in_the_data(node) -> None:
    vm = node
    root(vm, "cgpolicyctl penalize lena penalty1")
    lena = with_terminal(vm, "lena")
    lines = [line for line in lena.splitlines() if line.startswith("cgpolicy:")]
    assert len(lines) == 1 and lines[0].startswith(LINE), lena + diagnostics(vm, "lena")
    assert " until " in lines[0] and ": by " in lines[0], lines[0]  # no tier message: who
    nora = with_terminal(vm, "nora")
    assert "cgpolicy" not in nora, nora

    # Without a terminal: every transfer of lena's is her file, byte for byte.
    host = "lena@127.0.0.1"
    transfers = {
        "scp": f"scp -q {OPTIONS} {host}:data /tmp/cgpolicy-login-scp",
        "sftp": f"echo 'get data /tmp/cgpolicy-login-sftp' | sftp -q -b - {OPTIONS} {host}",
        "rsync": f"rsync -e {shlex.quote(SSH)} {host}:data /tmp/cgpolicy-login-rsync",
        "ssh": f"{SSH} {host} cat data >/tmp/cgpolicy-login-ssh </dev/null",
    }
    for name, command in transfers.items():
        done = root(vm, f"{command} && cmp {DATA} /tmp/cgpolicy-login-{name}", check=False)
        assert done.returncode == 0, f"{name}: {done.stdout}{done.stderr}"
    root(vm, f"{SSH} {host} 'cat >data2' <{DATA} && {SSH} {host} cat data2 </dev/null | cmp {DATA}")

    # The journal's fields: the hook's entries of her logins, and cgpolicyd's penalty.
    found = root(vm, "journalctl -b CGPOLICY_USER=lena -o json --no-pager").stdout
    entries = [json.loads(line) for line in found.splitlines() if line]
    by = {(e["SYSLOG_IDENTIFIER"], e["CGPOLICY_EVENT"], e.get("CGPOLICY_TIER")) for e in entries}
    assert ("cgpolicy-pam-hook", "applied", "penalty1") in by, by
    assert ("cgpolicyd", "penalized", "penalty1") in by, by
    assert {e["CGPOLICY_UID"] for e in entries} == {"5201"}
    assert all(len(e["MESSAGE_ID"]) == 32 for e in entries), entries
    assert root(vm, "journalctl -b CGPOLICY_USER=nora -o cat --no-pager").stdout.strip()
