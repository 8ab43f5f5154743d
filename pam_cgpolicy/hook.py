"""The PAM session hook, run by ``pam_exec.so`` after ``pam_systemd.so``.

On open_session it classifies PAM_USER and sets the group's limits on the
user's slice, or those of the penalty tier cgpolicyd has the user in.
Whatever happens (a broken policy, a dead bus, a hung systemd, a bug) it
exits 0 within ``hook_timeout``: a login is never refused or held up by
cgpolicy. Every decision is one log line, with the limits it sent.

It runs at every login, so it imports only builtin modules and the project's
small hot-path modules: compiled policy, accounts, classify, slicelimits, setprops.

A user in a penalty, or frozen, gets one line on stdout (loginmessage.py),
and one more while a job an admin evicted waits for its restore; pam_exec's
``stdout`` option hands them to sshd as PAM text messages. The
same option points stderr at that pipe, so the hook writes nothing else there.

It runs as root with an environment that is partly the user's: pam_exec
hands its child the PAM environment (which pam_env fills from the user's
~/.pam_environment when user_readenv=1, and sshd from AcceptEnv) followed
by pam_exec's own PAM_SERVICE, PAM_USER, PAM_TTY, PAM_RHOST, PAM_RUSER and,
last, PAM_TYPE. Nothing stops the PAM environment from holding its own
PAM_USER or PAM_TYPE, and getenv (so os.environ) returns the first of two
entries: the user's. So the hook reads no variable but those two and
PAM_SERVICE (which only decides whether the login line is shown), each from
the environment block's last entry of that name, pam_exec's. Its paths
are fixed here or given on the root-owned PAM line.
"""

from __future__ import annotations

# The C half of the signal module: signal.py itself imports enum, which alone
# costs more than the rest of the hook's start.
import _signal
import os
import stat
import sys
import time

from . import log
from .accounts import lookup_account
from .compiled import Penalty, load_in_force, read_penalty_entry
from .constants import (
    CHECKPOINTS,
    COMPILED_POLICY,
    DEFAULT_CONFIG_DIR,
    DEFAULT_STATE_DIR,
    PENALTIES,
    SELFTEST_SERVICE,
)
from .errors import CgpolicyError
from .freezer import hold_frozen_login
from .loginmessage import FROZEN_LINE, evicted_line, penalty_line, show, waiting_checkpoints
from .setprops import apply_limits, kill_pending

DEFAULT_TIMEOUT = 2.0  # until the policy says otherwise
# The hook's options, all on the PAM line; --bus-address is for tests.
OPTIONS = {
    "--config-dir": DEFAULT_CONFIG_DIR,
    "--state-dir": DEFAULT_STATE_DIR,
    "--bus-address": "",
}

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
            "timeout",
            log.fields(
                user=self.user,
                action="timeout",
                elapsed_ms=self.elapsed_ms(),
                result="login let through without limits",
            ),
            user=self.user,
        )
        os._exit(0)


def pam_items(environ_file: str = "/proc/self/environ") -> dict[str, str]:
    """PAM_TYPE, PAM_USER and PAM_SERVICE as pam_exec set them: the last entry of each."""
    with open(environ_file, "rb") as source:
        block = source.read()
    items: dict[str, str] = {}
    for entry in block.split(b"\0"):
        name, equals, value = entry.partition(b"=")
        if equals and name in (b"PAM_TYPE", b"PAM_USER", b"PAM_SERVICE"):
            items[name.decode()] = value.decode(errors="replace")
    return items


def parse_options(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """The PAM line's options over the defaults, and what was wrong with the line."""
    options, problems = dict(OPTIONS), []
    words = iter(argv)
    for word in words:
        name, equals, value = word.partition("=")
        if name not in OPTIONS:
            problems.append(f"unknown option {word!r} ignored")
            continue
        if not equals:
            value = next(words, "")
        if name.endswith("-dir") and not value.startswith("/"):
            problems.append(f"{name} needs an absolute path; {value!r} ignored")
            continue
        options[name] = value
    return options, problems


class _Outcome:
    """What the hook did, for its log entry: the event kind, the text, and about whom."""

    __slots__ = ("event", "text", "tier", "uid", "user")

    def __init__(self, event: str, text: str, user: str, uid: int, tier: str | None = None):
        self.event, self.text, self.user, self.uid, self.tier = event, text, user, uid, tier


def _penalty(state_dir: str, user: str, uid: int) -> Penalty | None:
    try:
        return read_penalty_entry(os.path.join(state_dir, PENALTIES), uid, time.time())
    except (OSError, ValueError) as err:
        log.error(
            "state-file-error",
            f"{err}; no cgpolicyd penalty is known for {log.quote(user)}",
            user=user,
            uid=uid,
        )
        return None


def _open_session(clock: _Clock, user: str, options: dict[str, str], service: str = "") -> _Outcome:
    account = lookup_account(user)
    state_dir = options["--state-dir"]
    # Changed files are parsed under the last good policy's hook_timeout, not the default.
    loaded = load_in_force(
        options["--config-dir"],
        os.path.join(state_dir, COMPILED_POLICY),
        lambda last_good: clock.arm(last_good["hook_timeout"]),
    )
    if loaded.refused:
        log.error("policy-error", f"{loaded.refused}; the last good policy is not used")
    if loaded.error:
        log.error(
            "policy-error",
            f"policy error, using the {loaded.source} policy: "
            + "; ".join(str(p) for p in loaded.error.problems),
        )
    policy = loaded.policy
    if policy is None:
        text = log.fields(user=user, uid=account.uid, action="skipped", reason="no valid policy")
        return _Outcome("skipped", text, user, account.uid)
    timeout = policy["hook_timeout"]
    clock.arm(timeout)
    penalty = _penalty(state_dir, user, account.uid)
    bus = options["--bus-address"] or None
    standing = penalty.standing if penalty else None
    limits = apply_limits(policy, account, clock.remaining(timeout), standing, bus)
    outcome = _Outcome(limits.action, limits.log_line(), user, account.uid, limits.tier)
    message = penalty_line(limits, penalty.expiry, penalty.why) if penalty else None
    # Last: once held, sshd's session process waits for the thaw (cgroup v1 only).
    if hold_frozen_login(account.uid, time.monotonic() + clock.remaining(timeout) / 2):
        outcome.text += " frozen=held"
        message = FROZEN_LINE
    evicted = evicted_line(waiting_checkpoints(os.path.join(state_dir, CHECKPOINTS), account.uid))
    # Not to selftest: its PAM library crashes on a message during open_session, and
    # nobody reads it there. (A user who fakes the service hides only their own line.)
    if service != SELFTEST_SERVICE:
        for line in (message, evicted):
            if line:
                show(line)
    return outcome


def _stderr_is_the_users() -> bool:
    """Whether stderr is stdout's pipe, as pam_exec's ``stdout`` option makes it.

    Then whatever the hook writes there reaches the user's terminal.
    """
    try:
        out, err = os.fstat(1), os.fstat(2)
    except OSError:
        return False
    return stat.S_ISFIFO(err.st_mode) and (out.st_dev, out.st_ino) == (err.st_dev, err.st_ino)


def main(argv: list[str] | None = None) -> int:
    try:
        items = pam_items()
    except OSError:
        items = {}  # no /proc: nothing to go by, so nothing to do
    if items.get("PAM_TYPE") != "open_session":
        return 0  # close_session and the rest: nothing to undo
    clock = _Clock()
    # Echoed for a hook run by hand; pam_exec discards stderr, or gives it to the user.
    log.open_log("cgpolicy-pam-hook", echo=not _stderr_is_the_users())
    clock.user = user = items.get("PAM_USER", "")
    _signal.signal(_signal.SIGALRM, clock.expire)
    clock.arm(DEFAULT_TIMEOUT)
    try:
        options, problems = parse_options(sys.argv[1:] if argv is None else argv)
        for problem in problems:
            log.error("pam-line", f"PAM line: {problem}", user=user)
        done = _open_session(clock, user, options, items.get("PAM_SERVICE", ""))
        log.info(
            done.event,
            f"{done.text} {log.fields(elapsed_ms=clock.elapsed_ms())}",
            user=done.user,
            uid=done.uid,
            tier=done.tier,
        )
    except CgpolicyError as err:
        text = log.fields(user=user, action="failed", elapsed_ms=clock.elapsed_ms(), error=err)
        log.error("failed", text, user=user)
    except Exception as err:  # a bug must not lock anyone out
        text = log.fields(
            user=user,
            action="failed",
            elapsed_ms=clock.elapsed_ms(),
            error=f"internal: {type(err).__name__}: {err}",
        )
        log.error("failed", text, user=user)
    finally:
        _signal.setitimer(_signal.ITIMER_REAL, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
