"""Installs the working tree of cgpolicy into a test VM the way an admin would.

On the cgroup v2 node: the .deb built from the tree, on Debian's own
python3-dbus-fast and python3-pampy (in the image). On the v1 node:
packaging/install.sh, the way for other distributions, with a venv.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from pam_cgpolicy.constants import NETWORK_DROPIN_ACTIVE
from pam_cgpolicy.network import ENABLE
from vmharness.machine import VM
from vmharness.progress import step

REMOTE_SRC = "/root/cgpolicy-src"
REMOTE_DEBS = "/root/cgpolicy-debs"
INSTALL_TIMEOUT = 900
DEB_MODE = "v2"
DEB_PYTHON = "/usr/bin/python3"
VENV_PYTHON = "/opt/cgpolicy/bin/python3"  # install.sh's PREFIX
INSTALLED_TREE = "/root/cgpolicy-src.installed"  # the digest of the tree install.sh installed
# pip byte-compiles every file it installs, and the [plot] libraries (numpy, matplotlib,
# fontTools) are most of install.sh's cost under emulation: about a minute of 3. The
# tests have pip skip it, then run as root what cgpolicy loads, a plot included, so
# that the files it imports get compiled as a first run would compile them. cgpolicyd
# cannot write them itself (ProtectSystem=strict); anything missed here it compiles
# in memory, slower but the same.
NO_COMPILE = "PIP_COMPILE=false"
WARM_UP = """
import psycopg2
import pam_cgpolicy.cli, pam_cgpolicy.daemon, pam_cgpolicy.hook
from pam_cgpolicy.plot import usage_png
from pam_cgpolicy.report import UsagePoint, UsageReport
usage_png(UsageReport("warm-up", 0, None, 0.0, 60.0, (UsagePoint(0, 30.0, 0.5, 2**20),)))
"""

_wheel_dirs: dict[Path, Path] = {}
_debs: dict[tuple[Path, str | None], Path] = {}
_digests: dict[Path, str] = {}


def installed_python(vm: VM) -> str:
    """The interpreter the installed cgpolicy runs on in this VM (its modules import there)."""
    return DEB_PYTHON if vm.cgroup_mode() == DEB_MODE else VENV_PYTHON


def build_deb(repo_root: Path, version: str | None = None) -> Path:
    """The tree's .deb (with ``version`` instead of the changelog's), built once per process."""
    key = (repo_root.resolve(), version)
    if key not in _debs:
        out = Path(tempfile.mkdtemp(prefix="cgpolicy-deb-"))
        atexit.register(shutil.rmtree, out, ignore_errors=True)
        argv = [str(key[0] / "packaging" / "build-deb"), str(out), *([version] if version else [])]
        with step(f"building the cgpolicy .deb{f' {version}' if version else ''} on the host"):
            result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"packaging/build-deb failed:\n{result.stdout}{result.stderr}")
        (_debs[key],) = out.glob("cgpolicy_*.deb")
    return _debs[key]


def install_deb(vm: VM, deb: Path) -> subprocess.CompletedProcess[str]:
    """apt installs ``deb`` (over another version too); the image has its dependencies.

    The same version installed already is left as it is, as apt leaves it. No
    --reinstall nor --no-download: with either, apt refuses a file path here
    ("Pathname to install is not absolute"); it downloads nothing all the same,
    as every dependency is in the image.
    """
    vm.ssh(f"rm -rf {REMOTE_DEBS} && mkdir -p {REMOTE_DEBS}")
    vm.put(deb, f"{REMOTE_DEBS}/{deb.name}")
    with step(f"apt installing {deb.name} in the VM"):
        # confold: a policy a test changed stays, as an admin's would.
        return vm.ssh(
            "DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
            "--allow-downgrades -o Dpkg::Options::=--force-confold "
            f"{REMOTE_DEBS}/{deb.name}",
            timeout=INSTALL_TIMEOUT,
        )


def build_wheels(repo_root: Path) -> Path:
    """The project's wheel plus its dependencies, built once per process and repo."""
    repo_root = repo_root.resolve()
    if repo_root not in _wheel_dirs:
        tmp = Path(tempfile.mkdtemp(prefix="cgpolicy-wheels-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        # Build from an exported copy: an in-tree build leaves build/ behind in the
        # developer's tree, and stale files there would leak into later wheels.
        export = tmp / "src"
        for name in source_files(repo_root):
            (export / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo_root / name, export / name, follow_symlinks=False)
        wheels = tmp / "wheels"
        with step("building cgpolicy wheels on the host"):
            # Host and guest are both CPython 3.11 on glibc 2.36, so binary wheels fit the guest.
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "wheel",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--constraint",
                    str(repo_root / "packaging" / "pypi-pins.txt"),
                    "--wheel-dir",
                    str(wheels),
                    f"{export}[plot,sync]",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
        if result.returncode != 0:
            raise RuntimeError(f"pip wheel failed:\n{result.stdout}{result.stderr}")
        _wheel_dirs[repo_root] = wheels
    return _wheel_dirs[repo_root]


def source_files(repo_root: Path) -> list[str]:
    """Tracked plus untracked-but-not-ignored files: what a developer is testing."""
    out = subprocess.run(
        ["git", "-C", str(repo_root), "ls-files", "-z", "-co", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted({name for name in out.split("\0") if name and (repo_root / name).exists()})


def make_tarball(repo_root: Path, wheels: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        for name in source_files(repo_root):
            tar.add(repo_root / name, arcname=name, recursive=False)
        tar.add(wheels, arcname="wheels")
    return dest


def tree_digest(repo_root: Path) -> str:
    """What install.sh would install from this tree (its files' names and bytes), as a hash."""
    repo_root = repo_root.resolve()
    if repo_root not in _digests:
        digest = hashlib.sha256()
        for name in source_files(repo_root):
            path = repo_root / name
            digest.update(name.encode() + b"\0")
            digest.update(os.readlink(path).encode() if path.is_symlink() else path.read_bytes())
        _digests[repo_root] = digest.hexdigest()
    return _digests[repo_root]


def install_cgpolicy(vm: VM, repo_root: str | Path) -> subprocess.CompletedProcess[str]:
    """The .deb on the v2 node; elsewhere the tree and wheels, and packaging/install.sh.

    As apt leaves the same version installed as it is, install.sh is not run
    again for the tree it installed last on this disk (about half a minute a
    module under emulation): the digest of that tree is kept in the guest.
    """
    repo_root = Path(repo_root).resolve()
    if vm.cgroup_mode() == DEB_MODE:
        return install_deb(vm, build_deb(repo_root))
    digest = tree_digest(repo_root)
    done = vm.ssh(
        f"test -x {VENV_PYTHON} && test -x /usr/sbin/cgpolicy-pam-hook && cat {INSTALLED_TREE}",
        check=False,
    )
    if done.returncode == 0 and done.stdout.strip() == digest:
        return done
    wheels = build_wheels(repo_root)
    with tempfile.TemporaryDirectory(prefix="cgpolicy-src-") as tmp:
        tarball = make_tarball(repo_root, wheels, Path(tmp) / "cgpolicy-src.tar.gz")
        vm.put(tarball, "/root/cgpolicy-src.tar.gz")
    vm.ssh(
        f"rm -rf {REMOTE_SRC} && mkdir -p {REMOTE_SRC} && "
        f"tar -xzf /root/cgpolicy-src.tar.gz -C {REMOTE_SRC} && rm /root/cgpolicy-src.tar.gz"
    )
    vm.ssh(f"rm -f {INSTALLED_TREE}")
    with step("running packaging/install.sh in the VM"):
        done = vm.ssh(
            f"{NO_COMPILE} sh {REMOTE_SRC}/packaging/install.sh --wheels {REMOTE_SRC}/wheels",
            timeout=INSTALL_TIMEOUT,
        )
    with step("compiling what cgpolicy loads, in the VM"):
        vm.ssh(f"{VENV_PYTHON} -I -c {shlex.quote(WARM_UP)}", timeout=INSTALL_TIMEOUT)
    vm.put_bytes(f"{digest}\n".encode(), INSTALLED_TREE)
    return done


def allow_network(vm: VM) -> None:
    """cgpolicyd allowed TCP, as the README tells an admin whose [notify] or [sync] needs
    it: the installed drop-in copied into place, and cgpolicyd (re)started under it."""
    vm.ssh(" && ".join(ENABLE))


def forbid_network(vm: VM) -> None:
    """The unit as shipped again: the drop-in removed. It takes effect at cgpolicyd's
    next start, which every module's teardown makes."""
    drop_ins = os.path.dirname(NETWORK_DROPIN_ACTIVE)
    vm.ssh(
        f"if [ -e {NETWORK_DROPIN_ACTIVE} ]; then rm {NETWORK_DROPIN_ACTIVE} && "
        f"rmdir --ignore-fail-on-non-empty {drop_ins} && systemctl daemon-reload; fi"
    )
