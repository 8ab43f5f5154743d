"""Installs the working tree of cgpolicy into a test VM the way an admin would."""

from __future__ import annotations

import atexit
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from vmharness.machine import VM
from vmharness.progress import step

REMOTE_SRC = "/root/cgpolicy-src"
INSTALL_TIMEOUT = 900

_wheel_dirs: dict[Path, Path] = {}


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
                    "--wheel-dir",
                    str(wheels),
                    str(export),
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


def install_cgpolicy(vm: VM, repo_root: str | Path) -> subprocess.CompletedProcess[str]:
    """Copy the tree and wheels to the guest and run packaging/install.sh there."""
    repo_root = Path(repo_root).resolve()
    wheels = build_wheels(repo_root)
    with tempfile.TemporaryDirectory(prefix="cgpolicy-src-") as tmp:
        tarball = make_tarball(repo_root, wheels, Path(tmp) / "cgpolicy-src.tar.gz")
        vm.put(tarball, "/root/cgpolicy-src.tar.gz")
    vm.ssh(
        f"rm -rf {REMOTE_SRC} && mkdir -p {REMOTE_SRC} && "
        f"tar -xzf /root/cgpolicy-src.tar.gz -C {REMOTE_SRC} && rm /root/cgpolicy-src.tar.gz"
    )
    with step("running packaging/install.sh in the VM"):
        return vm.ssh(
            f"sh {REMOTE_SRC}/packaging/install.sh --wheels {REMOTE_SRC}/wheels",
            timeout=INSTALL_TIMEOUT,
        )
