"""A hostile user's PAM environment steers nothing: real sshd, Linux-PAM and systemd.

The node's sshd stack gets `pam_env.so user_readenv=1` above common-session,
so the user's ~/.pam_environment reaches the hook. Each login then carries
one kind of attack; after it the real policy's limits are on the slice, the
journal says so, and no file outside cgpolicy's own changed. cgpolicyd is
stopped meanwhile: the limits seen are the hook's.
"""

from __future__ import annotations

import shlex
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_daemon import poll
from test_login_node import POLICY, hook_lines, root, slice_props, write_policy
from vmharness.install import installed_python

# v2 only: nothing here differs on cgroup v1 (see conftest.py)
pytestmark = [pytest.mark.vm, pytest.mark.v2_only]

REPO = Path(__file__).resolve().parents[2]
USER, UID = "mallory", 2710  # in the fallback group "normal": CPUQuota 100%, TasksMax 128
HOME = f"/home/{USER}"
EXPECTED = {"CPUQuotaPerSecUSec": "1s", "TasksMax": "128"}
VICTIM = "/var/tmp/cgpolicy-victim"  # root's, where the user's state-dir link points
FAKE_BUS = f"{HOME}/fake-bus"
FAKE_BUS_LOG = "/root/fake-bus.log"
PWNED = "/var/tmp/cgpolicy-pwned"  # what the user's Python code would create
EARLY_PAM_ENV = "session required pam_env.so user_readenv=1"

# Each login's ~/.pam_environment (pam_env's own format: NAME DEFAULT=value).
ATTACKS = {
    "identity": {"PAM_USER": "root", "PAM_TYPE": "close_session"},
    "redirect": {
        "CGPOLICY_CONFIG_DIR": f"{HOME}/evil-etc",
        "CGPOLICY_STATE_DIR": f"{HOME}/state-link",
        "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={FAKE_BUS}",
        "PYTHONPATH": f"{HOME}/py",
        "PYTHONSTARTUP": f"{HOME}/py/sitecustomize.py",
    },
    "forged copies": {"CGPOLICY_STATE_DIR": f"{HOME}/state"},
}

FAKE_BUS_SERVER = f"""
import socket, os
server = socket.socket(socket.AF_UNIX)
server.bind({FAKE_BUS!r})
os.chown({FAKE_BUS!r}, {UID}, {UID})
server.listen(16)
while True:
    conn, _ = server.accept()
    with open({FAKE_BUS_LOG!r}, "a") as log:
        log.write("connected\\n")
"""

# Written as root with the node's own cgpolicy, then handed to the user: a
# compiled policy whose fingerprint matches /etc/cgpolicy but that exempts
# the fallback group, and a penalty that lifts every CPU limit of the user.
FORGE = f"""
import marshal, os
from pam_cgpolicy.compiled import FORMAT, fingerprint, load_in_force
policy = load_in_force("/etc/cgpolicy", "/root/forge/policy.compiled").policy
policy["groups"]["normal"]["exempt"] = True
os.makedirs("{HOME}/state", exist_ok=True)
with open("{HOME}/state/policy.compiled", "wb") as out:
    out.write(marshal.dumps({{"format": FORMAT, "fingerprint": fingerprint("/etc/cgpolicy"),
                             "policy": policy}}))
penalty = (4e9, (("CPUQuotaPerSecUSec", "t", 2**64 - 1), ("TasksMax", "t", 2**64 - 1)))
with open("{HOME}/state/penalties.compiled", "wb") as out:
    out.write(marshal.dumps({{"format": FORMAT, "penalties": {{{UID}: penalty}}}}))
"""

EVIL_PYTHON = f"open({PWNED!r}, 'w').write('ran user code as root')\n"


def files_state(vm: Any) -> str:
    """Every file the attacks point at, with content digest, mode, owner and mtime."""
    paths = f"{VICTIM} {HOME}/evil-etc {HOME}/state {HOME}/py"
    return root(
        vm,
        f"find {paths} -printf '%p %m %u %T@\\n' | sort; "
        f"find {paths} -type f -exec sha256sum {{}} + | sort",
    ).stdout


@pytest.fixture(scope="module")
def hostile_node(vm: Any) -> Iterator[Any]:
    from vmharness.install import install_cgpolicy

    install_cgpolicy(vm, REPO)
    vm.add_user(USER, UID)
    root(vm, "rm -f /etc/cgpolicy/groups.d/*.toml")
    write_policy(vm, POLICY)
    root(vm, "cgpolicyctl check && systemctl stop cgpolicyd")
    q = shlex.quote
    python = installed_python(vm)
    setup = f"""
        set -e
        cp -a /etc/pam.d/sshd /root/sshd.pam.orig
        sed -i '0,/^@include common-session/s//{EARLY_PAM_ENV}\\n&/' /etc/pam.d/sshd
        grep -q '^{EARLY_PAM_ENV}$' /etc/pam.d/sshd
        rm -rf {VICTIM} {PWNED} {FAKE_BUS_LOG} /root/forge
        install -d -m 0755 {VICTIM} /root/forge
        echo 'root-owned victim' > {VICTIM}/policy.compiled
        echo 'root-owned victim' > {VICTIM}/penalties.compiled
        touch -d '2020-01-01' {VICTIM}/policy.compiled {VICTIM}/penalties.compiled
        ln -sfn {VICTIM} {HOME}/state-link
        mkdir -p {HOME}/evil-etc/groups.d {HOME}/py/pam_cgpolicy
        printf '[general]\\nmin_uid = 1000\\n[status]\\norder = []\\nfallback = "x"\\n' \\
            > {HOME}/evil-etc/cgpolicy.toml
        echo 'exempt = true' > {HOME}/evil-etc/groups.d/x.toml
        for f in sitecustomize.py pam_cgpolicy/__init__.py pam_cgpolicy/hook.py; do
            printf '%s\n' {q(EVIL_PYTHON)} > {HOME}/py/$f
        done
        printf '%s\n' {q(FAKE_BUS_SERVER)} > /root/fake-bus.py
        setsid -f {python} /root/fake-bus.py </dev/null >/dev/null 2>&1
        {python} -I -c {q(FORGE)}
        chown -hR {USER}: {HOME}
    """
    root(vm, textwrap.dedent(setup))
    poll(
        "the fake bus listening",
        lambda: root(vm, f"test -S {FAKE_BUS}", check=False).returncode,
        lambda code: code == 0,
        20,
        lambda: "",
        every=0.2,
    )
    yield vm
    if vm.running:
        teardown = f"""
            cp -a /root/sshd.pam.orig /etc/pam.d/sshd
            pkill -f /root/fake-bus.py
            pkill -u {USER}
            rm -f {HOME}/.pam_environment
            systemctl revert user-{UID}.slice
            systemctl start cgpolicyd
        """
        root(vm, textwrap.dedent(teardown), check=False)


def test_doctor_warns_of_the_users_environment_before_the_hook(hostile_node: Any) -> None:
    out = root(hostile_node, "cgpolicyctl doctor", check=False).stdout
    assert "[warn] PAM environment: /etc/pam.d/sshd:" in out
    assert "pam_env.so user_readenv=1 runs before the hook" in out


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_hostile_pam_environment_steers_nothing(hostile_node: Any, attack: str) -> None:
    vm = hostile_node
    variables = ATTACKS[attack]
    env_file = "".join(f'{name} DEFAULT="{value}"\n' for name, value in variables.items())
    vm.put_bytes(env_file.encode(), f"{HOME}/.pam_environment", mode=0o644)
    root(vm, f"chown {USER}: {HOME}/.pam_environment; systemctl revert user-{UID}.slice")
    assert slice_props(vm, UID, *EXPECTED) != EXPECTED  # the login below must set them
    files_before = files_state(vm)
    lines_before = len(hook_lines(vm, USER))

    probe = "; ".join(f'printf "%s\\n" "${name}"' for name in variables)
    seen = vm.ssh(probe, user=USER).stdout.splitlines()
    # The user's variables really reached the PAM environment (so the hook's).
    assert seen == list(variables.values())

    new_lines = poll(
        "the hook's line for this login",
        lambda: hook_lines(vm, USER)[lines_before:],
        bool,
        20,
        lambda: root(vm, "journalctl -n 30 --no-pager", check=False).stdout,
        every=0.3,
    )
    (line,) = new_lines
    assert line.startswith(f"user={USER} uid={UID} group=normal rule=fallback ")
    assert " action=applied " in line and "penalty" not in line
    assert slice_props(vm, UID, *EXPECTED) == EXPECTED
    assert files_state(vm) == files_before
    assert root(vm, f"cat {FAKE_BUS_LOG} 2>/dev/null; ls {PWNED} 2>&1", check=False).stdout == (
        f"ls: cannot access '{PWNED}': No such file or directory\n"
    )
    state = root(vm, "stat -c '%a %U %n' /var/lib/cgpolicy /var/lib/cgpolicy/*.compiled").stdout
    assert state.splitlines()[0] == "700 root /var/lib/cgpolicy"
    assert all(entry.startswith("600 root ") for entry in state.splitlines()[1:])
