"""The demo behind scripts/demo: a login node, three users, limits, a penalty, a freeze.

The penalty's mail (and the PNG of bob's usage inside it) is saved in demo-output/.
"""

from __future__ import annotations

import email
import email.policy
import mailbox
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "demo-output"
LOGIN_KEY = "/root/.demo-login-key"
NOTIFY = """
[notify]
host = "localhost"
port = 25
from = "cgpolicy@cgnode"
user_address = "{user}@localhost"
admins = ["root@localhost"]
"""
sys.path.insert(0, str(REPO / "tests"))

from vmharness.install import allow_network, install_cgpolicy  # noqa: E402
from vmharness.machine import VM  # noqa: E402

USERS = [  # name, uid, supplementary groups: the default policy puts them in
    ("alice", 2001, ["sudo"]),  # admins (exempt)
    ("bob", 2002, ["students"]),  # students: 1 core, 4G
    ("carol", 2003, []),  # normal, the fallback: 2 cores, 8G
]


def say(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def show(vm: VM, cmd: str, user: str = "root") -> str:
    prompt = "#" if user == "root" else "$"
    print(f"{user}@cgnode{prompt} {cmd}")
    out = vm.ssh(cmd, user=user, check=False)
    text = (out.stdout + out.stderr).rstrip()
    if text:
        print(text)
    return out.stdout


def save_mail(vm: VM, user: str) -> None:
    """The user's first mail, as their mail reader shows it; saved with its plot."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        raw = vm.ssh(f"cat /var/mail/{user} 2>/dev/null || true").stdout
        if raw.startswith("From "):
            break
        time.sleep(3)
    else:
        print(f"(no mail reached /var/mail/{user}; see journalctl -t cgpolicyd)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        box_path = Path(tmp) / "mbox"
        box_path.write_text(raw)
        first = next(iter(mailbox.mbox(box_path)))
        message = email.message_from_bytes(first.as_bytes(), policy=email.policy.default)
    OUTPUT.mkdir(exist_ok=True)
    (OUTPUT / f"{user}-penalty.eml").write_bytes(message.as_bytes())
    print(f"Subject: {message['Subject']}\nTo: {message['To']}\n")
    body = message.get_body(preferencelist=("plain",))
    print(body.get_content() if body else "(no text part)")
    for part in message.walk():
        if part.get_content_type() == "image/png":
            png = OUTPUT / f"{user}-usage.png"
            png.write_bytes(part.get_payload(decode=True))
            print(f"the mail's plot of {user}'s last hour: saved as {png.relative_to(REPO)}")
    print(f"the whole mail: saved as {(OUTPUT / f'{user}-penalty.eml').relative_to(REPO)}")


def login_with_terminal(vm: VM, user: str) -> None:
    """An interactive login, as the user sees it: sshd's login messages, then the shell."""
    vm.ssh(
        f"test -f {LOGIN_KEY} || ssh-keygen -q -t ed25519 -N '' -f {LOGIN_KEY}; "
        f"home=$(getent passwd {user} | cut -d: -f6); "
        f'grep -qf {LOGIN_KEY}.pub "$home/.ssh/authorized_keys" || '
        f'cat {LOGIN_KEY}.pub >> "$home/.ssh/authorized_keys"'
    )
    print(f"$ ssh {user}@cgnode")
    out = vm.ssh(
        f"printf 'exit\\n' | ssh -i {LOGIN_KEY} -o StrictHostKeyChecking=no "
        f"-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -tt {user}@127.0.0.1",
        check=False,
    )
    print(out.stdout.replace("\r", "").rstrip())


def main() -> None:
    mode = "v1" if "--v1" in sys.argv else "v2"
    say(f"Booting a Debian 12 login node (cgroup {mode}) under emulation")
    with VM(cgroup=mode) as vm:
        how = "its Debian package" if mode == "v2" else "packaging/install.sh"
        say(f"Installing cgpolicy the way the README says ({how})")
        install_cgpolicy(vm, REPO)
        show(vm, "cgpolicyctl doctor")
        show(vm, "cat /etc/cgpolicy/cgpolicy.toml | grep -v '^#' | grep -v '^$'")

        say("The node's mail server and node_exporter; cgpolicy mails whom it penalizes")
        show(vm, "systemctl start exim4 prometheus-node-exporter && echo started")
        vm.ssh(f"cat >> /etc/cgpolicy/cgpolicy.toml <<'EOF'\n{NOTIFY}EOF")
        show(vm, "grep -A6 '^\\[notify\\]' /etc/cgpolicy/cgpolicy.toml && cgpolicyctl reload")
        print("(the unit as shipped allows no TCP: cgpolicyd says how to allow it)")
        show(vm, "journalctl -t cgpolicyd -o cat --no-pager | grep event=network-denied")
        allow_network(vm)  # the README's two commands
        show(vm, "systemctl show cgpolicyd -p RestrictAddressFamilies")

        say("Three researchers log in over SSH; the PAM hook classifies each one")
        vm.ssh("groupadd -f students")
        for name, uid, groups in USERS:
            vm.add_user(name, uid, groups=groups)
            show(vm, "nohup sleep 100000 >/dev/null 2>&1 & echo logged in", user=name)
        for name, _, _ in USERS:
            show(vm, f"cgpolicyctl classify {name}")
        show(vm, "journalctl -o cat --no-pager -t cgpolicy-pam-hook | grep user=")

        say("Their limits, as systemd reports them")
        show(vm, "cgpolicyctl status")
        show(vm, "systemctl show user-2002.slice -p CPUQuotaPerSecUSec -p MemoryMax -p TasksMax")

        say("bob starts four busy loops; his slice holds them to one core together")
        show(
            vm,
            "for i in 1 2 3 4; do nohup sh -c 'while :; do :; done' >/dev/null 2>&1 & "
            "done; echo started",
            user="bob",
        )
        before = int(vm.ssh("systemctl show -P CPUUsageNSec user-2002.slice").stdout)
        time.sleep(10)
        after = int(vm.ssh("systemctl show -P CPUUsageNSec user-2002.slice").stdout)
        print(f"bob used {(after - before) / 10e9:.2f} cores over 10 s (quota: 100% = 1 core)")

        say("bob keeps at it: cgpolicyd's badness rises until he lands in a penalty tier")
        print("(the demo shortens the model's timings: interval 2 s, time_to_max_bad 20 s)")
        show(
            vm,
            "sed -i -e 's/^interval = .*/interval = 2/' "
            "-e 's/^time_to_max_bad = .*/time_to_max_bad = 20/' "
            "-e 's/^timeout = 1800 .*/timeout = 120/' /etc/cgpolicy/cgpolicy.toml "
            "&& cgpolicyctl reload",
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if "event=penalized" in vm.ssh("journalctl -t cgpolicyd -o cat --no-pager").stdout:
                break
            time.sleep(3)
        show(vm, "journalctl -t cgpolicyd -o cat --no-pager | grep user=bob")
        show(vm, "systemctl show user-2002.slice -p CPUQuotaPerSecUSec -p MemoryMax")
        show(vm, "cgpolicyctl history bob")
        show(vm, "busctl call org.cgpolicy1 /org/cgpolicy1 org.cgpolicy1.Manager GetUser s bob")
        vm.ssh("pkill -u bob -f 'while :'", check=False)

        say("bob is told: a mail (with a plot of his last hour) and a line at his next login")
        save_mail(vm, "bob")
        login_with_terminal(vm, "bob")

        say("The admin's view: bob's usage report, and the series the dashboards scrape")
        show(vm, "cgpolicyctl report bob --since 15m")
        show(
            vm,
            "cgpolicyctl metrics | grep 'user=\"bob\"' "
            "| grep -E '^cgpolicy_user_(tier|cpu_badness)'",
        )
        show(
            vm,
            'python3 -c "import urllib.request as u; '
            "print(u.urlopen('http://localhost:9100/metrics').read().decode())\" "
            "| grep '^cgpolicy_user_tier{' | grep bob",
        )

        say("carol runs a counter; an admin freezes her whole session, then thaws it")
        show(
            vm,
            "nohup sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; "
            "done' >/dev/null 2>&1 & echo $! > /tmp/counter.pid",
            user="carol",
        )
        time.sleep(1)
        show(vm, "cgpolicyctl freeze carol")
        show(vm, "cat /tmp/count; sleep 3; cat /tmp/count")
        show(
            vm,
            "grep State: /proc/$(cat /tmp/counter.pid)/status"
            "  # not 'T (stopped)': frozen tasks see nothing",
        )
        show(vm, "cgpolicyctl status carol")
        show(vm, "cgpolicyctl thaw carol")
        show(vm, "cat /tmp/count; sleep 3; cat /tmp/count")

        say("A broken policy file is refused, and logins keep the last good policy")
        show(
            vm, "sed -i 's/CPUQuota = .*/CPUQuota = \"lots\"/' /etc/cgpolicy/groups.d/students.toml"
        )
        show(vm, "cgpolicyctl check")
        show(vm, "echo still logged in fine", user="bob")
        show(vm, "journalctl -o cat --no-pager -t cgpolicy-pam-hook | tail -n 2")
    say("Done; the VM is gone")


if __name__ == "__main__":
    main()
