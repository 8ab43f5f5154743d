"""The PAM session hook, run by ``pam_exec.so`` after ``pam_systemd.so``.

On open_session it classifies PAM_USER and sets the group's limits on the
user's slice. Whatever happens (a broken policy, a dead bus, a hung systemd,
a bug) it exits 0 within ``hook_timeout``: a login is never refused or held
up by cgpolicy. Every decision is one log line.

It runs at every login, so it imports only builtin modules and the project's
small hot-path modules: compiled policy, accounts, classify, setprops.
"""

from __future__ import annotations

# The C half of the signal module: signal.py itself imports enum, which alone
# costs more than the rest of the hook's start.
import _signal
import os
import sys
import time

from . import log
from .accounts import lookup_account
from .compiled import load_in_force, read_penalty
from .constants import compiled_policy_file, config_dir, penalties_file
from .errors import CgpolicyError
from .freezer import hold_frozen_login
from .setprops import apply_limits, kill_pending

DEFAULT_TIMEOUT = 2.0  # until the policy says otherwise

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import FrameType


class _Clock:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.user = "?"

    def elapsed_ms(self) -> int:
        return round((time.monotonic() - self.started) * 1000)

    def remaining(self, timeout: float) -> float:
        return max(timeout - (time.monotonic() - self.started), 0.001)

    def arm(self, timeout: float) -> None:
        """(Re)arm the deadline, counted from the hook's start."""
        _signal.setitimer(_signal.ITIMER_REAL, self.remaining(timeout))

    def expire(self, _signum: int, _frame: FrameType | None) -> None:
        kill_pending()
        log.error(
            f"user={self.user} action=timeout elapsed_ms={self.elapsed_ms()} "
            "login let through without limits"
        )
        os._exit(0)


def _open_session(clock: _Clock, user: str) -> str:
    account = lookup_account(user)
    loaded = load_in_force(config_dir(), compiled_policy_file())
    if loaded.error:
        log.error(
            f"policy error, using the {loaded.source} policy: "
            + "; ".join(str(p) for p in loaded.error.problems)
        )
    policy = loaded.policy
    if policy is None:
        return f'user={user} uid={account.uid} action=skipped reason="no valid policy"'
    timeout = policy["hook_timeout"]
    clock.arm(timeout)
    penalty = read_penalty(penalties_file(), account.uid, time.time())
    line = apply_limits(policy, account, clock.remaining(timeout), penalty).log_line()
    # Last: once held, sshd's session process waits for the thaw (cgroup v1 only).
    if hold_frozen_login(account.uid, time.monotonic() + clock.remaining(timeout) / 2):
        line += " frozen=held"
    return line


def main() -> int:
    if os.environ.get("PAM_TYPE") != "open_session":
        return 0  # close_session and the rest: nothing to undo
    clock = _Clock()
    log.open_log("cgpolicy-pam-hook", echo=True)  # pam_exec discards stderr
    clock.user = user = os.environ.get("PAM_USER", "")
    _signal.signal(_signal.SIGALRM, clock.expire)
    clock.arm(DEFAULT_TIMEOUT)
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
        _signal.setitimer(_signal.ITIMER_REAL, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
