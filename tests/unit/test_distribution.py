"""What the packages are made of: the man page and completion from the parser, one version each."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

from policyfiles import DAEMON_SECTIONS, MAIN, write_policy

from pam_cgpolicy import cli

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTED = [
    "check", "classify", "apply", "freeze", "thaw", "status", "penalize",
    "release", "reload", "notify-test", "history", "report", "replay", "metrics", "evict",
    "restore",
    "doctor", "selftest",
    "import-arbiter2",
]  # fmt: skip


def cliref() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cliref", ROOT / "packaging" / "cliref.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiers_prints_the_policys_tier_names(tmp_path, capsys) -> None:
    policy = write_policy(tmp_path / "etc", MAIN + DAEMON_SECTIONS)
    assert cli.main(["--config-dir", str(policy), "tiers"]) == 0
    assert capsys.readouterr().out.split() == ["penalty1", "penalty2"]
    assert cli.main(["--config-dir", str(write_policy(tmp_path / "none")), "tiers"]) == 0
    assert capsys.readouterr().out == ""
    (policy / "cgpolicy.toml").write_text("oops = [\n")
    assert cli.main(["--config-dir", str(policy), "tiers"]) == 1
    assert capsys.readouterr().out == ""


def test_the_man_page_documents_every_command_but_the_hidden_one() -> None:
    page = cliref().man_page(cli.build_parser())
    found = re.findall(r"^\.TP\n\\fB([a-z][a-z0-9\\-]*)\\fR", page, re.M)
    documented = [name.replace("\\-", "-") for name in found]  # roff's "\-" is a hyphen
    assert documented == DOCUMENTED
    assert "\\fBtiers" not in page
    assert "\\fB\\-\\-limit\\fR" in page and "\\fB\\-\\-config\\-dir\\fR" in page


def complete(tmp_path: Path, *words: str) -> list[str]:
    """What bash offers after ``words`` (the last one is being typed)."""
    module = cliref()
    script = tmp_path / "cgpolicyctl.bash"
    script.write_text(module.completion(cli.build_parser()))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    ctl = bin_dir / "cgpolicyctl"
    ctl.write_text(f'#!/bin/sh\nexec {sys.executable} -m pam_cgpolicy.cli "$@"\n')
    ctl.chmod(0o755)
    array = " ".join(f"'{w}'" for w in ("cgpolicyctl", *words))
    program = (
        f"source {script}; COMP_WORDS=({array}); COMP_CWORD={len(words)}; "
        'PATH="$BIN:$PATH"; _cgpolicyctl; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    done = subprocess.run(
        ["bash", "--norc", "-c", program],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={"BIN": str(bin_dir), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    return done.stdout.split()


def test_completion_offers_commands_options_users_and_tiers(tmp_path) -> None:
    assert complete(tmp_path, "") == [*DOCUMENTED, "--config-dir", "--help"]
    assert complete(tmp_path, "re") == ["release", "reload", "report", "replay", "restore"]
    assert complete(tmp_path, "replay", "--policy", "packag") == ["packaging"]
    assert complete(tmp_path, "replay", "--history", "pyproject.t") == ["pyproject.toml"]
    assert complete(tmp_path, "history", "--") == ["--limit", "--json", "--help"]
    assert complete(tmp_path, "freeze", "roo") == ["root"]
    assert complete(tmp_path, "freeze", "root", "") == []
    assert complete(tmp_path, "import-arbiter2", "--") == ["--out", "--threads-per-core", "--help"]
    assert complete(tmp_path, "import-arbiter2", "pyproject.t") == ["pyproject.toml"]
    assert complete(tmp_path, "import-arbiter2", "--out", "packag") == ["packaging"]
    policy = write_policy(tmp_path / "etc", MAIN + DAEMON_SECTIONS)
    assert complete(tmp_path, "--config-dir", str(policy), "penalize", "root", "pen") == [
        "penalty1",
        "penalty2",
    ]


def test_each_library_version_is_stated_once_and_agrees() -> None:
    """pyproject's lower bounds are the .deb's; the RPM bundles the pinned PyPI versions."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lower = dict(re.fullmatch(r"([\w-]+)>=([\d.]+)", d).groups() for d in project["dependencies"])
    control = (ROOT / "debian" / "control").read_text()
    assert f"python3-dbus-fast (>= {lower['dbus-fast']})" in control
    assert f"python3-pampy (>= {lower['python-pam']})" in control
    pins = dict(
        line.split("==")
        for line in (ROOT / "packaging" / "pypi-pins.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    spec = (ROOT / "packaging" / "rpm" / "cgpolicy.spec").read_text()
    assert f"%global dbus_fast_version {pins['dbus-fast']}\n" in spec
    assert f"%global python_pam_version {pins['python-pam']}\n" in spec
    changelog = (ROOT / "debian" / "changelog").read_text().split("\n", 1)[0]
    assert f"({project['version']})" in changelog
    assert re.search(rf"^Version: +{re.escape(project['version'])}$", spec, re.M)


def test_the_pam_line_goes_before_anything_else_on_removal() -> None:
    prerm = (ROOT / "debian" / "cgpolicy.prerm").read_text()
    assert prerm.index("pam-auth-update --package --remove cgpolicy") < prerm.index("#DEBHELPER#")
    postinst = (ROOT / "debian" / "cgpolicy.postinst").read_text()
    assert "install -d -o root -g root -m 0700 /var/lib/cgpolicy" in postinst


def test_the_hook_launcher_keeps_isolated_mode_without_site() -> None:
    shebang = (ROOT / "packaging" / "launcher.in").read_text().splitlines()[0]
    assert shebang == "#!@PYTHON@ -IS"
