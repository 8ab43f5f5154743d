"""The line a penalized user sees at login: its text, and the hook writing only it."""

from __future__ import annotations

import time
from pathlib import Path

from policyfiles import DAEMON_SECTIONS, MAIN, write_policy
from test_hook_fails_open import run_hook
from test_hook_trust import NOBODY

from pam_cgpolicy.accounts import Account
from pam_cgpolicy.compiled import save_penalties
from pam_cgpolicy.constants import PENALTIES
from pam_cgpolicy.loginmessage import FROZEN_LINE, penalty_line, printable, until_text
from pam_cgpolicy.policy import load_policy
from pam_cgpolicy.slicelimits import Standing, slice_limits

EXPIRY = 4e9
GIB = 1024**3


def limits_for(tmp_path: Path, tier: str | None):
    etc = write_policy(tmp_path / "etc", main=MAIN + DAEMON_SECTIONS)
    policy = load_policy(etc).compile()
    account = Account("bob", NOBODY, frozenset({NOBODY}), frozenset())
    return slice_limits(policy, account, Standing(tier), memory_total=64 * GIB)


def test_a_penalized_user_reads_tier_limits_until_and_why(tmp_path: Path) -> None:
    limits = limits_for(tmp_path, "penalty1")
    line = penalty_line(limits, EXPIRY, "too much CPU (badness 101.0 >= 100)")
    assert line is not None and "\n" not in line
    assert line.startswith("cgpolicy: your limits are lowered to penalty tier penalty1 (")
    assert limits.limits_text() in line  # what slicelimits decided, not decided again
    assert f" until {until_text(EXPIRY)}: too much CPU (badness 101.0 >= 100)" in line


def test_no_tier_no_line(tmp_path: Path) -> None:
    assert penalty_line(limits_for(tmp_path, None), EXPIRY, "whatever") is None


def test_nothing_in_the_line_reaches_a_terminal_raw(tmp_path: Path) -> None:
    line = penalty_line(limits_for(tmp_path, "penalty1"), EXPIRY, "a\nb\x1b[2Jc\r\x07")
    assert line is not None and line.isprintable()
    assert printable("x\ny\x1b") == "x y "


def test_the_hook_writes_the_line_and_nothing_else_to_the_user(tmp_path: Path) -> None:
    """With stderr on stdout's pipe, as pam_exec's stdout option has it: one line, no log."""
    write_policy(tmp_path / "etc", main=MAIN + DAEMON_SECTIONS)
    penalties = {NOBODY: (EXPIRY, "penalty1", None, "slow down")}
    save_penalties(str(tmp_path / "state" / PENALTIES), penalties)
    done, _ = run_hook(tmp_path, f"unix:path={tmp_path}/no-such-bus", merged=True)
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    assert lines[0].startswith("cgpolicy: your limits are lowered to penalty tier penalty1 (")
    assert lines[0].endswith(f"until {until_text(EXPIRY)}: slow down")


def test_a_user_not_penalized_gets_nothing(tmp_path: Path) -> None:
    write_policy(tmp_path / "etc", main=MAIN + DAEMON_SECTIONS)
    save_penalties(str(tmp_path / "state" / PENALTIES), {})
    done, _ = run_hook(tmp_path, f"unix:path={tmp_path}/no-such-bus", merged=True)
    assert done.returncode == 0 and done.stdout == ""


def test_an_expired_penalty_gets_nothing(tmp_path: Path) -> None:
    write_policy(tmp_path / "etc", main=MAIN + DAEMON_SECTIONS)
    penalties = {NOBODY: (time.time() - 1, "penalty1", None, "slow down")}
    save_penalties(str(tmp_path / "state" / PENALTIES), penalties)
    done, _ = run_hook(tmp_path, f"unix:path={tmp_path}/no-such-bus", merged=True)
    assert done.stdout == ""


def test_a_copy_from_before_the_message_still_gives_the_line(tmp_path: Path) -> None:
    """An older cgpolicyd's copy has no why: the line comes without it."""
    write_policy(tmp_path / "etc", main=MAIN + DAEMON_SECTIONS)
    old_copy = {NOBODY: (EXPIRY, "penalty1", None)}
    save_penalties(str(tmp_path / "state" / PENALTIES), old_copy)  # type: ignore[arg-type]
    done, _ = run_hook(tmp_path, f"unix:path={tmp_path}/no-such-bus")
    assert done.stdout.strip().endswith(f"until {until_text(EXPIRY)}")


def test_the_frozen_line_is_one_printable_line() -> None:
    assert FROZEN_LINE.isprintable() and FROZEN_LINE.startswith("cgpolicy: ")


def test_selftest_sessions_get_no_line(tmp_path: Path) -> None:
    """selftest's PAM library crashes on a message during open_session: none is sent there."""
    write_policy(tmp_path / "etc", main=MAIN + DAEMON_SECTIONS)
    penalties = {NOBODY: (EXPIRY, "penalty1", None, "slow down")}
    save_penalties(str(tmp_path / "state" / PENALTIES), penalties)
    bus = f"unix:path={tmp_path}/no-such-bus"
    sshd, _ = run_hook(tmp_path, bus, merged=True, pam_environment=["PAM_SERVICE=sshd"])
    assert sshd.stdout.startswith("cgpolicy: your limits are lowered"), sshd.stdout
    selftest, _ = run_hook(
        tmp_path, bus, merged=True, pam_environment=["PAM_SERVICE=cgpolicy-selftest"]
    )
    assert selftest.returncode == 0 and selftest.stdout == ""
