from pam_cgpolicy.pamconfig import hook_wiring, session_stack

HOOK = "session optional pam_exec.so quiet /usr/sbin/cgpolicy-pam-hook\n"


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
