"""Builds and caches the Debian 12 test VM image (raw ext4 root, kernel, initrd, ssh key)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from vmharness.progress import say, step

RECIPE = Path(__file__).with_name("recipe.sh")
DEFAULT_CACHE = "/var/cache/cgpolicy-vm"

IMAGE_SIZE_MIB = 3072
FS_LABEL = "root"
SSH_KEY_TYPE = "ed25519"
# Everything besides recipe.sh that shapes the image; changing it forces a rebuild.
BUILD_PARAMS = {
    "image_size_mib": IMAGE_SIZE_MIB,
    "fs_label": FS_LABEL,
    "ssh_key_type": SSH_KEY_TYPE,
    "layout": 1,
}

IMAGE_NAME = "root.raw"
KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initrd.img"
KEY_NAME = "id_ed25519"


@dataclass(frozen=True)
class ImagePaths:
    image: Path
    kernel: Path
    initrd: Path
    ssh_key: Path

    @property
    def ssh_public_key(self) -> Path:
        return self.ssh_key.with_name(self.ssh_key.name + ".pub")

    @classmethod
    def in_dir(cls, directory: Path) -> ImagePaths:
        return cls(
            image=directory / IMAGE_NAME,
            kernel=directory / KERNEL_NAME,
            initrd=directory / INITRD_NAME,
            ssh_key=directory / KEY_NAME,
        )


def cache_root() -> Path:
    return Path(os.environ.get("CGPOLICY_VM_CACHE") or DEFAULT_CACHE)


def cache_key() -> str:
    digest = hashlib.sha256(RECIPE.read_bytes())
    digest.update(json.dumps(BUILD_PARAMS, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def ensure_image() -> ImagePaths:
    """Return the cached image for the current recipe, building it first if needed."""
    root = cache_root()
    final = root / f"image-{cache_key()}"
    if final.is_dir():  # only ever appears by an atomic rename of a finished build
        return ImagePaths.in_dir(final)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        if not _try_lock(lock):
            say(f"waiting for another process building the VM image in {root}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not final.is_dir():
            _remove_stale(root)
            _build(root, final)
        _remove_other_images(root, keep=final)
    return ImagePaths.in_dir(final)


def _try_lock(lock_file: IO[str]) -> bool:
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _build(root: Path, final: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        with step(f"building VM image {final.name} (cold cache)"):
            rootfs = work / "rootfs"
            _run_recipe(rootfs, work / "recipe.log")
            paths = ImagePaths.in_dir(work)
            with step("ssh key and kernel"):
                _make_ssh_key(paths.ssh_key)
                _authorize_root_key(rootfs, paths.ssh_public_key)
                _copy_boot_files(rootfs, paths)
            with step("mkfs.ext4 root image"):
                with open(paths.image, "wb") as raw:  # sparse; mkfs takes the size from it
                    raw.truncate(IMAGE_SIZE_MIB * 1024 * 1024)
                subprocess.run(
                    ["mkfs.ext4", "-q", "-F", "-d", str(rootfs), "-L", FS_LABEL, str(paths.image)],
                    check=True,
                )
            _remove_tree(rootfs)
            work.rename(final)
    finally:
        if work.exists():
            _remove_tree(work)


def _run_recipe(rootfs: Path, log_path: Path) -> None:
    """Run recipe.sh, keeping its full output in a log and echoing its step lines."""
    with (
        step("recipe.sh (debootstrap + configuration)"),
        open(log_path, "w") as log,
        subprocess.Popen(
            ["sh", str(RECIPE), str(rootfs)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if line.startswith(("recipe:", "E:", "W:")):
                say("  " + line.rstrip())
        if proc.wait() != 0:
            log.flush()
            tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
            raise RuntimeError(f"recipe.sh failed with exit code {proc.returncode}:\n{tail}")


def _make_ssh_key(private_key: Path) -> None:
    subprocess.run(
        [
            "ssh-keygen",
            "-q",
            "-t",
            SSH_KEY_TYPE,
            "-N",
            "",
            "-C",
            "vmharness",
            "-f",
            str(private_key),
        ],
        check=True,
    )


def _authorize_root_key(rootfs: Path, public_key: Path) -> None:
    ssh_dir = rootfs / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    authorized = ssh_dir / "authorized_keys"
    shutil.copyfile(public_key, authorized)
    authorized.chmod(0o600)


def _copy_boot_files(rootfs: Path, paths: ImagePaths) -> None:
    for pattern, target in (("vmlinuz-*", paths.kernel), ("initrd.img-*", paths.initrd)):
        found = sorted((rootfs / "boot").glob(pattern))
        if len(found) != 1:
            raise RuntimeError(f"expected one /boot/{pattern} in the image, found {found}")
        shutil.copyfile(found[0], target)


def _remove_other_images(root: Path, keep: Path) -> None:
    for old in root.glob("image-*"):
        if old != keep:
            say(f"removing outdated VM image {old.name}")
            _remove_tree(old)


def _remove_stale(root: Path) -> None:
    """Leftovers of a build that crashed; safe to delete since we hold the lock."""
    for stale in root.glob(".build-*"):
        _remove_tree(stale)


def _remove_tree(path: Path) -> None:
    # A crashed debootstrap can leave /proc or /sys mounted inside the rootfs;
    # deleting through such a mount would hit the host.
    _unmount_below(path)
    shutil.rmtree(path, ignore_errors=True)


def _unmount_below(path: Path) -> None:
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts]
    for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", point], check=False)
