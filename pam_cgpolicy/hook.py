"""The PAM session hook, run by ``pam_exec.so`` after ``pam_systemd.so``.

On open_session it classifies PAM_USER and sets the group's limits on the
user's slice. Whatever happens (a broken policy, a dead bus, a hung systemd,
a bug) it exits 0 within ``hook_timeout``: a login is never refused or held
up by cgpolicy. Every decision is one log line.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from types import FrameType

from . import log
from .accounts import lookup_account
from .compiled import load_in_force
from .constants import COMPILED_POLICY, config_dir, state_dir
from .control import decide
from .errors import CgpolicyError
from .limits import BusProperty
from .model import General


class _Clock:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.user = "?"

    def elapsed_ms(self) -> int:
        return round((time.monotonic() - self.started) * 1000)

    def arm(self, timeout: float) -> None:
        """(Re)arm the deadline, counted from the hook's start."""
        remaining = max(timeout - (time.monotonic() - self.started), 0.001)
        signal.setitimer(signal.ITIMER_REAL, remaining)

    def expire(self, _signum: int, _frame: FrameType | None) -> None:
        log.error(
            f"user={self.user} action=timeout elapsed_ms={self.elapsed_ms()} "
            "login let through without limits"
        )
        os._exit(0)


async def _set_properties(uid: int, props: list[BusProperty], timeout: float) -> None:
    from .systemd import Systemd

    systemd = await Systemd.connect(timeout)
    try:
        await systemd.set_slice_properties(uid, props)
    finally:
        systemd.close()


def _open_session(clock: _Clock, user: str) -> str:
    account = lookup_account(user)
    loaded = load_in_force(config_dir(), state_dir() / COMPILED_POLICY)
    if loaded.error:
        log.error(
            f"policy error, using the {loaded.source} policy: "
            + "; ".join(str(p) for p in loaded.error.problems)
        )
    if loaded.policy is None:
        return f'user={user} uid={account.uid} action=skipped reason="no valid policy"'
    policy = loaded.policy
    clock.arm(policy.general.hook_timeout)
    decision = decide(policy, account)
    if decision.action == "applied":
        asyncio.run(_set_properties(account.uid, decision.properties, policy.general.hook_timeout))
    return decision.log_line()


def main() -> int:
    clock = _Clock()
    log.open_log("cgpolicy-pam-hook", echo=True)  # pam_exec discards stderr
    if os.environ.get("PAM_TYPE") != "open_session":
        return 0  # close_session and the rest: nothing to undo
    clock.user = user = os.environ.get("PAM_USER", "")
    signal.signal(signal.SIGALRM, clock.expire)
    clock.arm(General().hook_timeout)  # until the policy says otherwise
    try:
        line = _open_session(clock, user)
        log.info(f"{line} elapsed_ms={clock.elapsed_ms()}")
    except CgpolicyError as err:
        log.error(f'user={user} action=failed elapsed_ms={clock.elapsed_ms()} error="{err}"')
    except Exception as err:  # a bug must not lock anyone out
        log.error(
            f"user={user} action=failed elapsed_ms={clock.elapsed_ms()} "
            f'error="internal: {type(err).__name__}: {err}"'
        )
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
