"""The hook's PAM line is written once, in the pam-auth-update profile; the rest agree."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from pam_cgpolicy.pamconfig import hook_wiring

ROOT = Path(__file__).resolve().parents[2]
PROFILE = ROOT / "packaging" / "pam-configs" / "cgpolicy"


def pam_line() -> str:
    """The profile's session line, as it lands in a PAM file."""
    body = [line.split() for line in PROFILE.read_text().splitlines() if line[:1] in (" ", "\t")]
    assert len(body) == 1, "the profile holds one session line"
    return " ".join(["session", *body[0]])


def test_the_line_shows_the_message_and_stays_optional() -> None:
    words = pam_line().split()
    assert words[:3] == ["session", "optional", "pam_exec.so"]
    assert "stdout" in words and words[-1] == "/usr/sbin/cgpolicy-pam-hook"


def test_install_sh_reads_it_from_the_profile() -> None:
    script = (ROOT / "packaging" / "install.sh").read_text()
    assignment = next(line for line in script.splitlines() if line.startswith("PAM_LINE="))
    done = subprocess.run(
        ["sh", "-c", f'{assignment}\nprintf %s "$PAM_LINE"'],
        env={"SRC": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout == pam_line()


def test_the_docs_give_the_same_line() -> None:
    readme = (ROOT / "README.md").read_text()
    man = (ROOT / "man" / "cgpolicy-pam-hook.8").read_text().replace("\\-", "-")
    spec = (ROOT / "packaging" / "rpm" / "cgpolicy.spec").read_text()
    for name, text in (("README.md", readme), ("man page", man), ("RPM spec", spec)):
        said = set(re.findall(r"session\s+optional\s+pam_exec\.so[^\n]*cgpolicy-pam-hook", text))
        said = {" ".join(line.replace(".B ", "").split()) for line in said}
        assert said == {pam_line()}, f"{name}: {said}"


def test_doctor_says_when_the_message_is_off(tmp_path: Path) -> None:
    without = pam_line().replace(" stdout", "")
    (tmp_path / "sshd").write_text(f"session optional pam_systemd.so\n{without}\n")
    ok, detail = hook_wiring("sshd", "cgpolicy-pam-hook", tmp_path)
    assert ok and "without stdout: no login message" in detail
    (tmp_path / "sshd").write_text(f"session optional pam_systemd.so\n{pam_line()}\n")
    assert "without stdout" not in hook_wiring("sshd", "cgpolicy-pam-hook", tmp_path)[1]
