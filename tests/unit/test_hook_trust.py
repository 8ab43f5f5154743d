"""The hook run as pam_exec runs it, with an environment a hostile user filled."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest
from policyfiles import DAEMON_SECTIONS, GROUPS, MAIN, write_policy
from test_hook_fails_open import run_hook

from pam_cgpolicy.compiled import save, save_penalties
from pam_cgpolicy.constants import COMPILED_POLICY, PENALTIES

NOBODY = 65534  # pam_exec's PAM_USER below; in the fallback group "normal"
EXEMPT_ALL = 'description = "everyone"\nuids = ["1-4000000000"]\nexempt = true\n'


@pytest.fixture
def listener(tmp_path: Path):
    """A socket a user controls, posing as the system bus; counts who connects."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "fake-bus"))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


def connections(server: socket.socket) -> int:
    count = 0
    while True:
        try:
            server.accept()[0].close()
        except BlockingIOError:
            return count
        count += 1


def user_tree(tmp_path: Path) -> tuple[Path, Path]:
    """A user's own policy (everyone exempt) and state dir with a compiled copy of it."""
    etc = write_policy(tmp_path / "user-etc", groups=dict(GROUPS, normal=EXEMPT_ALL))
    state = tmp_path / "user-state"
    state.mkdir()
    os.chown(state, NOBODY, NOBODY)
    return etc, state


def test_hostile_variables_change_nothing(tmp_path: Path, listener: socket.socket) -> None:
    write_policy(tmp_path / "etc")
    etc, state = user_tree(tmp_path)
    before = sorted(os.listdir(state))
    done, _ = run_hook(
        tmp_path,
        f"unix:path={tmp_path}/no-such-bus",
        pam_environment=[
            f"CGPOLICY_CONFIG_DIR={etc}",
            f"CGPOLICY_STATE_DIR={state}",
            f"DBUS_SYSTEM_BUS_ADDRESS=unix:path={tmp_path}/fake-bus",
            "SYSTEMD_LOG_LEVEL=debug",
        ],
    )
    assert done.returncode == 0, done.stderr
    assert "group=normal" in done.stderr and "exempt" not in done.stderr
    assert "action=failed" in done.stderr  # at the PAM line's bus, which is dead
    assert connections(listener) == 0
    assert sorted(os.listdir(state)) == before
    assert (tmp_path / "state" / COMPILED_POLICY).exists()


def test_pam_user_and_pam_type_are_pam_execs_own(tmp_path: Path) -> None:
    """A ~/.pam_environment's PAM_USER and PAM_TYPE come first; pam_exec's come last."""
    write_policy(tmp_path / "etc")
    done, _ = run_hook(
        tmp_path,
        f"unix:path={tmp_path}/no-such-bus",
        pam_environment=["PAM_USER=root", "PAM_TYPE=close_session"],
    )
    assert done.returncode == 0
    assert "user=nobody uid=65534 group=normal" in done.stderr
    assert "root is never limited" not in done.stderr


def test_a_symlinked_state_dir_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    write_policy(tmp_path / "etc")
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir(mode=0o700)
    victim = victim_dir / COMPILED_POLICY
    victim.write_text("root's own file\n")
    os.utime(victim, ns=(1_000_000_000, 1_000_000_000))
    (tmp_path / "state").symlink_to(victim_dir)
    done, _ = run_hook(tmp_path, f"unix:path={tmp_path}/no-such-bus")
    assert done.returncode == 0
    assert "state: not a directory (a symbolic link?)" in done.stderr
    assert "group=normal" in done.stderr  # the policy files, read straight
    assert victim.read_text() == "root's own file\n"
    assert victim.stat().st_mtime_ns == 1_000_000_000
    assert os.listdir(victim_dir) == [COMPILED_POLICY]


def test_a_user_owned_compiled_policy_is_refused(tmp_path: Path) -> None:
    """Even one whose fingerprint matches the files: the files are read instead."""
    from pam_cgpolicy.compiled import fingerprint, load_in_force

    root = write_policy(tmp_path / "etc")
    state = tmp_path / "state"
    good = load_in_force(str(root), str(state / COMPILED_POLICY)).policy
    assert good is not None
    forged = dict(good, groups={**good["groups"], "normal": dict(good["groups"]["normal"])})
    forged["groups"]["normal"]["exempt"] = True
    save(str(state / COMPILED_POLICY), forged, fingerprint(str(root)))
    os.chown(state / COMPILED_POLICY, NOBODY, NOBODY)
    done, _ = run_hook(tmp_path, f"unix:path={tmp_path}/no-such-bus")
    assert "policy.compiled: owned by uid 65534 (owner uid 65534" in done.stderr
    assert "group=normal" in done.stderr and "action=failed" in done.stderr


@pytest.mark.parametrize("how", ["user-owned", "group-writable", "symlink", "garbage"])
def test_an_untrusted_penalties_copy_means_no_penalty_known(tmp_path: Path, how: str) -> None:
    write_policy(tmp_path / "etc", main=MAIN + DAEMON_SECTIONS)
    state = tmp_path / "state"
    path = state / PENALTIES
    save_penalties(str(path), {NOBODY: (4e9, "penalty1", None)})
    if how == "user-owned":
        os.chown(path, NOBODY, NOBODY)
    elif how == "group-writable":
        path.chmod(0o620)
    elif how == "symlink":
        path.rename(state / "elsewhere")
        path.symlink_to(state / "elsewhere")
    else:
        path.write_bytes(b"garbage")
    done, _ = run_hook(tmp_path, f"unix:path={tmp_path}/no-such-bus")
    assert done.returncode == 0
    assert "no cgpolicyd penalty is known for nobody" in done.stderr
    assert "tier=" not in done.stderr
    assert "group=normal" in done.stderr


def test_a_trusted_penalties_copy_is_used(tmp_path: Path) -> None:
    """The refusals above are not the hook ignoring every copy."""
    write_policy(tmp_path / "etc", main=MAIN + DAEMON_SECTIONS)
    save_penalties(str(tmp_path / "state" / PENALTIES), {NOBODY: (4e9, "penalty1", None)})
    done, _ = run_hook(tmp_path, f"unix:path={tmp_path}/no-such-bus")
    assert 'tier=penalty1 limits="CPUQuota=160%' in done.stderr


def test_state_files_are_0600_in_a_0700_directory(tmp_path: Path) -> None:
    write_policy(tmp_path / "etc")
    run_hook(tmp_path, f"unix:path={tmp_path}/no-such-bus")
    state = tmp_path / "state"
    save_penalties(str(state / PENALTIES), {})
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / COMPILED_POLICY).stat().st_mode) == 0o600
    assert stat.S_IMODE((state / PENALTIES).stat().st_mode) == 0o600
    assert sorted(os.listdir(state)) == sorted([COMPILED_POLICY, PENALTIES])  # no temporary


def test_writes_never_go_through_a_planted_link(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    (state / PENALTIES).symlink_to(victim)
    (state / f"{PENALTIES}.{os.getpid()}.tmp").symlink_to(victim)  # a guessable name
    save_penalties(str(state / PENALTIES), {})
    assert victim.read_text() == "keep\n"
    assert not (state / PENALTIES).is_symlink()


def test_writes_refuse_a_directory_others_may_write(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    with pytest.raises(
        OSError, match=r"writable by its group or by everyone .*: only root may write"
    ):
        save_penalties(str(state / PENALTIES), {})
    assert os.listdir(state) == []


def test_pam_line_options() -> None:
    from pam_cgpolicy.hook import parse_options

    options, problems = parse_options(["--config-dir=/srv/policy", "--state-dir", "rel", "-x"])
    assert options["--config-dir"] == "/srv/policy"
    assert options["--state-dir"] == "/var/lib/cgpolicy"
    assert problems == [
        "--state-dir needs an absolute path; 'rel' ignored",
        "unknown option '-x' ignored",
    ]


def test_a_bad_pam_line_still_applies_the_policy(tmp_path: Path) -> None:
    write_policy(tmp_path / "etc")
    args = [f"--config-dir={tmp_path / 'etc'}", f"--state-dir={tmp_path / 'state'}", "--bogus"]
    args.append(f"--bus-address=unix:path={tmp_path}/no-such-bus")
    done, _ = run_hook(tmp_path, "", args=args)
    assert done.returncode == 0
    assert "PAM line: unknown option '--bogus' ignored" in done.stderr
    assert "group=normal" in done.stderr
