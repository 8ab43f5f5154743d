from test_pam_line import pam_line

from pam_cgpolicy.pamconfig import hook_wiring, session_stack, user_env_before_hook

HOOK = pam_line() + "\n"


def write(pam_dir, **files):
    pam_dir.mkdir(exist_ok=True)
    for name, text in files.items():
        (pam_dir / name.replace("_", "-")).write_text(text)


def test_includes_are_followed_in_order(tmp_path):
    write(
        tmp_path,
        sshd="@include common-session\nsession required pam_env.so\n",
        common_session="session optional pam_systemd.so\n" + HOOK,
    )
    modules = [line.module for line in session_stack("sshd", tmp_path)]
    assert modules == ["pam_systemd.so", "pam_exec.so", "pam_env.so"]


def test_hook_after_pam_systemd_is_wired(tmp_path):
    write(
        tmp_path,
        sshd="@include common-session\n",
        common_session="# comment\nsession optional pam_systemd.so\n" + HOOK,
    )
    ok, detail = hook_wiring("sshd", "cgpolicy-pam-hook", tmp_path)
    assert ok and "common-session:3" in detail


def test_hook_before_pam_systemd_is_reported(tmp_path):
    write(
        tmp_path,
        sshd=HOOK + "session include common-session\n",
        common_session="session optional pam_systemd.so\n",
    )
    ok, detail = hook_wiring("sshd", "cgpolicy-pam-hook", tmp_path)
    assert not ok and "before pam_systemd.so" in detail


def test_required_hook_is_reported(tmp_path):
    write(tmp_path, sshd="session optional pam_systemd.so\n" + HOOK.replace("optional", "required"))
    ok, detail = hook_wiring("sshd", "cgpolicy-pam-hook", tmp_path)
    assert not ok and "make it 'optional'" in detail


def test_missing_hook_and_include_loops(tmp_path):
    write(tmp_path, sshd="@include sshd\nsession optional pam_systemd.so\n")
    ok, detail = hook_wiring("sshd", "cgpolicy-pam-hook", tmp_path)
    assert not ok and "no 'session" in detail


# Debian 12's own /etc/pam.d/sshd, session part: its user_readenv comes after the hook.
DEBIAN_SSHD = """\
@include common-auth
session [success=ok ignore=ignore module_unknown=ignore default=bad] pam_selinux.so close
session    required     pam_loginuid.so
@include common-session
session    required     pam_env.so # [1]
session    required     pam_env.so user_readenv=1 envfile=/etc/default/locale
"""
COMMON_SESSION = "session optional pam_systemd.so\n" + HOOK


def test_debian_sshd_does_not_warn(tmp_path):
    write(tmp_path, sshd=DEBIAN_SSHD, common_session=COMMON_SESSION, common_auth="")
    assert user_env_before_hook("sshd", "cgpolicy-pam-hook", tmp_path) == []


def test_user_readenv_before_the_hook_is_found(tmp_path):
    early = "session required pam_env.so user_readenv=1\n"
    write(tmp_path, sshd=early + DEBIAN_SSHD, common_session=COMMON_SESSION, common_auth="")
    found = user_env_before_hook("sshd", "cgpolicy-pam-hook", tmp_path)
    assert [(line.line, line.args) for line in found] == [(1, ("user_readenv=1",))]


def test_user_readenv_in_the_auth_stack_runs_before_every_session(tmp_path):
    auth = "auth required pam_env.so user_envfile=.env user_readenv=1\nauth required pam_unix.so\n"
    write(tmp_path, sshd=DEBIAN_SSHD, common_session=COMMON_SESSION, common_auth=auth)
    found = user_env_before_hook("sshd", "cgpolicy-pam-hook", tmp_path)
    assert [line.file.rsplit("/", 1)[1] for line in found] == ["common-auth"]


def test_user_readenv_0_is_not_a_user_environment(tmp_path):
    early = "session required pam_env.so user_readenv=0 readenv=1\n"
    write(tmp_path, sshd=early + DEBIAN_SSHD, common_session=COMMON_SESSION, common_auth="")
    assert user_env_before_hook("sshd", "cgpolicy-pam-hook", tmp_path) == []
