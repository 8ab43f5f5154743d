"""The lines a penalized user, or one with an evicted job, sees at login: their text,
and the hook writing only them."""

from __future__ import annotations

import time
from pathlib import Path

from policyfiles import DAEMON_SECTIONS, MAIN, write_policy
from test_hook_fails_open import run_hook
from test_hook_trust import NOBODY

from pam_cgpolicy.accounts import Account
from pam_cgpolicy.compiled import save_penalties
from pam_cgpolicy.constants import CHECKPOINT_INVENTORY, CHECKPOINT_META, CHECKPOINTS, PENALTIES
from pam_cgpolicy.loginmessage import (
    FROZEN_LINE,
    evicted_line,
    penalty_line,
    printable,
    until_text,
    waiting_checkpoints,
)
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


def checkpoint(checkpoints: Path, cid: str, *names: str) -> None:
    (checkpoints / cid).mkdir(parents=True)
    for name in names:
        (checkpoints / cid / name).write_text("x")


def test_a_checkpoint_waits_while_it_holds_its_record_and_inventory(tmp_path: Path) -> None:
    both = (CHECKPOINT_META, CHECKPOINT_INVENTORY)
    checkpoint(tmp_path, "5600-20270115T090000Z-bbbbbb", *both)
    checkpoint(tmp_path, "5600-20270115T080000Z-aaaaaa", *both)
    checkpoint(tmp_path, "5600-20270115T100000Z-cccccc", CHECKPOINT_INVENTORY)  # being dumped
    checkpoint(tmp_path, "5600-20270115T110000Z-dddddd", CHECKPOINT_META)  # failed, or restored
    checkpoint(tmp_path, "56001-20270115T080000Z-eeeeee", *both)  # another uid's
    assert waiting_checkpoints(str(tmp_path), 5600) == [
        "5600-20270115T080000Z-aaaaaa",
        "5600-20270115T090000Z-bbbbbb",
    ]
    assert waiting_checkpoints(str(tmp_path), 560) == []
    assert waiting_checkpoints(str(tmp_path / "none"), 5600) == []


def test_the_eviction_line_names_each_checkpoint_and_who_can_restore() -> None:
    assert evicted_line([]) is None
    one = evicted_line(["5600-20270115T080000Z-aaaaaa"])
    assert one == (
        "cgpolicy: an administrator evicted a job of yours to disk (checkpoint "
        "5600-20270115T080000Z-aaaaaa); it is not running, and an administrator can restore "
        "it on this node"
    )
    two = evicted_line(["5600-a", "5600-b"])
    assert two is not None and "(checkpoints 5600-a, 5600-b); they are" in two
    odd = evicted_line(["5600-\x1b[2J\n"])  # a name no dump makes: still nothing raw
    assert odd is not None and odd.isprintable()


def test_the_hook_writes_the_eviction_line_after_the_penalty_line(tmp_path: Path) -> None:
    write_policy(tmp_path / "etc", main=MAIN + DAEMON_SECTIONS)
    save_penalties(str(tmp_path / "state" / PENALTIES), {NOBODY: (EXPIRY, "penalty1", None, "x")})
    cid = f"{NOBODY}-20270115T080000Z-aaaaaa"
    checkpoint(tmp_path / "state" / CHECKPOINTS, cid, CHECKPOINT_META, CHECKPOINT_INVENTORY)
    done, _ = run_hook(tmp_path, f"unix:path={tmp_path}/no-such-bus", merged=True)
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert len(lines) == 2, done.stdout
    assert lines[0].startswith("cgpolicy: your limits are lowered to penalty tier penalty1")
    assert lines[1] == evicted_line([cid])
    save_penalties(str(tmp_path / "state" / PENALTIES), {})
    done, _ = run_hook(tmp_path, f"unix:path={tmp_path}/no-such-bus", merged=True)
    assert done.stdout.splitlines() == [evicted_line([cid])]
