"""``cgpolicyctl selftest USER``: a real PAM session through this node's session stack.

It opens a session for USER the way a login does (pam_systemd, then the
cgpolicy hook, and everything else in the stack) and checks that USER's slice
ends up with the properties the policy wants. The session is opened by a child
in a transient system service, so that pam_systemd creates a real logind
session for USER instead of finding the admin's own session.

The PAM service is ``cgpolicy-selftest`` (installed by packaging/install.sh):
only root passes its auth stack (pam_rootok), and its session stack includes
the node's common session stack.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

from .accounts import lookup_account
from .constants import SELFTEST_SERVICE, SYSTEMD_SLICE, slice_name
from .errors import CgpolicyError
from .limits import cpus_from_mask
from .slicelimits import INFINITY, NO_PENALTY, Standing, slice_limits
from .systemd import Systemd

SERVICE = SELFTEST_SERVICE
BUS_TIMEOUT = 10.0


def child(user: str) -> int:
    """In the transient service: open the session, say so, wait for the parent, close it."""
    import pam  # python-pam: the one place cgpolicy holds a PAM conversation

    handle = pam.pam()
    if not handle.authenticate(user, "", service=SERVICE, call_end=False):
        print(f"error: PAM auth for {user} via {SERVICE} failed: {handle.reason}", flush=True)
        return 1
    code = handle.open_session()
    print(f"opened {code} {handle.reason}", flush=True)
    sys.stdin.readline()  # the parent reads the slice while the session is open
    handle.close_session()
    handle.end()
    return 0 if code == 0 else 1


def _matches(name: str, wanted: Any, got: dict[str, Any]) -> tuple[bool, str]:
    if name.endswith("Scale"):  # a share of RAM or tasks: systemd reports the absolute value
        base = got.get(name.removesuffix("Scale"))
        return isinstance(base, int) and base < INFINITY, f"{name.removesuffix('Scale')}={base}"
    if name not in got:
        return False, f"{name} not reported by systemd"
    value = got[name]
    if isinstance(wanted, bytes):
        return cpus_from_mask(wanted) == cpus_from_mask(bytes(value)), f"{name}={value!r}"
    return value == wanted, f"{name}={value}"


async def _slice_properties(uid: int) -> dict[str, Any]:
    systemd = await Systemd.connect(BUS_TIMEOUT)
    try:
        path = await systemd.unit_path(slice_name(uid))
        if path is None:
            raise CgpolicyError(f"{slice_name(uid)} is not loaded: no session was created")
        return await systemd.properties(path, SYSTEMD_SLICE)
    finally:
        systemd.close()


def run(policy: dict[str, Any], user: str, standing: Standing | None = None) -> bool:
    """Open a session for ``user``, compare the slice with the policy, report; True if all match.

    ``standing``: the penalty cgpolicyd has the user in, whose limits the hook
    keeps; what is expected is what slice_limits gives, as for every writer.
    """
    account = lookup_account(user)
    expected = slice_limits(policy, account, standing or NO_PENALTY)
    print(f"selftest: {expected.log_line()}")
    argv = [
        "systemd-run",
        "--quiet",
        "--wait",
        "--pipe",
        "--collect",
        "--unit",
        f"cgpolicy-selftest-{account.uid}",
        sys.executable,
        "-I",
        "-m",
        "pam_cgpolicy.selftest",
        user,
    ]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        said = proc.stdout.readline().strip()
        try:
            if not said.startswith("opened 0"):
                print(f"selftest: the session did not open: {said or 'no answer'}")
                return False
            print(f"selftest: opened a PAM session for {user} through /etc/pam.d/{SERVICE}")
            got = asyncio.run(_slice_properties(account.uid))
        finally:
            proc.stdin.write("\n")
            proc.stdin.close()
    ok = True
    for name, _signature, wanted in expected.properties:
        matched, shown = _matches(name, wanted, got)
        ok &= matched
        print(f"selftest:   [{'ok' if matched else 'FAIL'}] {shown} (policy: {wanted})")
    if expected.action != "applied":
        print(f"selftest: {user} is {expected.action}: nothing to compare")
    print("selftest: ok" if ok else "selftest: the slice does not have the policy's limits")
    return ok


if __name__ == "__main__":
    sys.exit(child(sys.argv[1]))
