"""cgpolicyd's unit and install.sh, read as text: what the daemon needs from them."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pam_cgpolicy import network
from pam_cgpolicy.constants import (
    CGPOLICY_BUS_NAME,
    DAEMON_UNIT,
    NETWORK_DROPIN,
    NETWORK_DROPIN_ACTIVE,
)
from pam_cgpolicy.policy import DEFAULT_TEXTFILE_DIR

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "packaging" / "systemd" / "cgpolicyd.service"
DROPIN = ROOT / "packaging" / "systemd" / "cgpolicyd.service.d" / "network.conf"
INSTALL = ROOT / "packaging" / "install.sh"
SPEC = ROOT / "packaging" / "rpm" / "cgpolicy.spec"


def unit(path: Path = UNIT) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


def test_the_unit_is_a_restarting_dbus_service_of_our_name() -> None:
    service = unit()["Service"]
    assert service["Type"] == "dbus"
    assert service["BusName"] == CGPOLICY_BUS_NAME
    assert service["ExecStart"] == "/usr/sbin/cgpolicyd"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert (service["Restart"], service["RestartSec"]) == ("always", "1s")
    assert service["StateDirectory"] == "cgpolicy"
    install = unit()["Install"]
    assert install["WantedBy"] == "multi-user.target"
    assert install["Alias"] == f"dbus-{CGPOLICY_BUS_NAME}.service"


def test_the_state_directory_is_roots_alone() -> None:
    assert unit()["Service"]["StateDirectoryMode"] == "0700"
    assert "install -d -o root -g root -m 0700 /var/lib/cgpolicy\n" in INSTALL.read_text()


def test_the_hardening_leaves_what_the_daemon_needs() -> None:
    service = unit()["Service"]
    # It writes the cgroup v1 freezer hierarchy and moves other users' tasks into it.
    for setting in ("ProtectControlGroups", "ProtectKernelTunables", "CapabilityBoundingSet"):
        assert setting not in service
    assert service["ProtectSystem"] == "strict"
    # The system bus and the journal; TCP only through the network drop-in.
    assert service["RestrictAddressFamilies"] == "AF_UNIX"
    assert service["MemoryDenyWriteExecute"] == "yes"


def test_the_network_dropin_adds_tcp_and_nothing_else() -> None:
    dropin = unit(DROPIN)
    assert dropin.sections() == ["Service"]
    assert dict(dropin["Service"]) == {"RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6"}
    # where an admin puts it: a drop-in directory of the unit, under the same name
    active = Path(NETWORK_DROPIN_ACTIVE)
    assert active.parent == Path("/etc/systemd/system") / f"{DAEMON_UNIT}.d"
    assert active.name == Path(NETWORK_DROPIN).name == DROPIN.name
    assert NETWORK_DROPIN_ACTIVE in network.ENABLE[0] and NETWORK_DROPIN in network.ENABLE[0]


def test_every_package_ships_the_network_dropin_inactive() -> None:
    source = DROPIN.relative_to(ROOT).as_posix()
    shipped = Path(NETWORK_DROPIN)
    deb = (ROOT / "debian" / "cgpolicy.install").read_text().splitlines()
    assert f"{source} {shipped.parent.relative_to('/')}/" in deb
    spec = SPEC.read_text()
    assert f"{source} \\\n    %{{buildroot}}%{{_datadir}}/cgpolicy/{shipped.name}\n" in spec
    assert "\n%{_datadir}/cgpolicy\n" in spec  # in %files
    assert shipped.parent == Path("/usr/share/cgpolicy")  # what %{_datadir} stands for
    script = INSTALL.read_text()
    assert f"NETWORK_DROPIN={NETWORK_DROPIN}\n" in script
    assert f'"$SRC/{source}" \\\n    "$NETWORK_DROPIN"\n' in script
    uninstall = script[script.index('if [ "$ACTION" = uninstall ]') :]
    assert '"$NETWORK_DROPIN"' in uninstall[: uninstall.index("exit 0")]
    # inactive: nothing installs it where systemd reads drop-ins
    for text in (*deb, spec, script):
        assert ".service.d" not in text.replace(source, "")


def test_the_readme_gives_the_commands_that_enable_the_dropin_for_notify_and_sync() -> None:
    readme = (ROOT / "README.md").read_text()
    block = "```sh\n" + "\n".join(network.ENABLE) + "\n```"
    notify = readme.index("### Mail on penalty and release: `[notify]`")
    sync = readme.index("### Several login nodes, one standing: `[sync]`")
    after = readme.index("\n### ", sync + 1)
    assert block in readme[notify:sync] and block in readme[sync:after]


def test_the_default_metrics_directory_is_writable_under_the_hardening() -> None:
    assert unit()["Service"]["ReadWritePaths"] == f"-{DEFAULT_TEXTFILE_DIR}"


def test_install_sh_installs_every_file_of_the_daemon() -> None:
    script = INSTALL.read_text()
    for source, target in [
        ("dbus/org.cgpolicy1.conf", "/usr/share/dbus-1/system.d/org.cgpolicy1.conf"),
        ("dbus/org.cgpolicy1.service", "/usr/share/dbus-1/system-services/org.cgpolicy1.service"),
        (
            "pam_cgpolicy/org.cgpolicy1.Manager.xml",
            "/usr/share/dbus-1/interfaces/org.cgpolicy1.Manager.xml",
        ),
        ("packaging/systemd/cgpolicyd.service", "/etc/systemd/system/cgpolicyd.service"),
    ]:
        assert (ROOT / source).is_file()
        assert f'"$SRC/{source}"' in script
        assert target in script
    assert 'ln -sf "$PREFIX/bin/cgpolicyd" /usr/sbin/cgpolicyd' in script


def test_install_sh_starts_the_daemon_only_when_it_imports() -> None:
    script = INSTALL.read_text()
    guard = script.index("import pam_cgpolicy.daemon")
    assert guard < script.index("systemctl enable cgpolicyd") < script.index("systemctl restart")
    uninstall = script[script.index('if [ "$ACTION" = uninstall ]') :]
    # The PAM line still goes first.
    assert uninstall.index("pam-auth-update") < uninstall.index("disable --now cgpolicyd")
    assert re.search(r"rm -f [^\n]*/usr/sbin/cgpolicyd ", uninstall)


@pytest.mark.skipif(shutil.which("dash") is None, reason="no dash to check POSIX syntax with")
def test_install_sh_is_posix_sh() -> None:
    assert subprocess.run(["dash", "-n", str(INSTALL)], check=False).returncode == 0


def test_the_dbus_contract_ships_in_the_package() -> None:
    """cgpolicyd reads the interface it serves from it: a wheel without it would not start."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    shipped = project["tool"]["setuptools"]["package-data"]["pam_cgpolicy"]
    assert "org.cgpolicy1.Manager.xml" in shipped
    assert (ROOT / "pam_cgpolicy" / "org.cgpolicy1.Manager.xml").is_file()
