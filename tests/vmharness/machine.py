"""Boots the test image under QEMU (TCG) and talks to it over ssh."""

from __future__ import annotations

import contextlib
import ctypes
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from vmharness.image import ImagePaths, ensure_image
from vmharness.progress import step

CGROUP_MODES = ("v2", "v1")
# A one-vCPU guest booting while the other VM stream runs (scripts/test) took 110 s.
BOOT_TIMEOUT = 300.0
# ssh's ConnectTimeout also bounds the protocol's first exchange, which sshd starts
# once it has forked and loaded its keys: in the one-vCPU emulated guest, with twenty
# logins arriving at once, more than 10 s. A user's ssh would have waited.
CONNECT_TIMEOUT = 60
SHUTDOWN_TIMEOUT = 60.0
BASE_CMDLINE = "root=/dev/vda rw console=ttyS0 panic=-1 systemd.show_status=auto"
# Bookworm boots the unified hierarchy unless told otherwise.
CGROUP_CMDLINE = {"v2": "", "v1": "systemd.unified_cgroup_hierarchy=0"}
# The guest's disk, larger than the image's file system: a test that needs room grows
# it into the rest (grow_root_fs); the overlay stores only what is written.
DISK_SIZE = "6G"


class VMError(RuntimeError):
    pass


class SSHCommandError(VMError):
    def __init__(self, command: str, user: str, result: subprocess.CompletedProcess[str]) -> None:
        self.command = command
        self.returncode = result.returncode
        self.stdout = result.stdout
        self.stderr = result.stderr
        super().__init__(
            f"command as {user} exited {result.returncode}"
            + (" (ssh itself failed)" if result.returncode == 255 else "")
            + f": {command}\n--- stdout ---\n{result.stdout}--- stderr ---\n{result.stderr}"
        )


class VM:
    """One QEMU guest on a throw-away qcow2 overlay of the cached image."""

    def __init__(
        self,
        cgroup: str = "v2",
        memory_mb: int = 2048,
        cpus: int = 2,
        image: ImagePaths | None = None,
    ) -> None:
        if cgroup not in CGROUP_MODES:
            raise ValueError(f"cgroup must be one of {CGROUP_MODES}, not {cgroup!r}")
        self.cgroup = cgroup
        self.memory_mb = memory_mb
        self.cpus = cpus
        self._image = image
        self._workdir: Path | None = None
        self._qemu: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.last_boot_seconds = 0.0

    # -- lifecycle -------------------------------------------------------

    def __enter__(self) -> VM:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._qemu is not None and self._qemu.poll() is None

    @property
    def died(self) -> bool:
        """QEMU exited without stop(): guest crash, panic, or a test powering it off."""
        return self._workdir is not None and not self.running

    @property
    def image(self) -> ImagePaths:
        if self._image is None:
            self._image = ensure_image()
        return self._image

    def start(self) -> None:
        if self.running:
            return
        if self.died:
            self.stop()  # drop the dead guest's overlay before making a new one
        image = self.image
        self._workdir = Path(tempfile.mkdtemp(prefix=f"cgpolicy-vm-{self.cgroup}-"))
        try:
            subprocess.run(
                [
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-b",
                    str(image.image.resolve()),
                    "-F",
                    "raw",
                    str(self._overlay),
                    DISK_SIZE,
                ],
                check=True,
                capture_output=True,
            )
            self._boot()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Power off cleanly if possible, then make sure QEMU is gone."""
        if self.running:
            with contextlib.suppress(VMError, subprocess.SubprocessError):
                self._ssh_raw("systemctl poweroff", "root", timeout=15)
            self._wait_for_qemu_exit(SHUTDOWN_TIMEOUT)
        self._kill_qemu()
        self._close_master()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def reboot(self) -> None:
        """Reboot the guest keeping its disk; -no-reboot makes QEMU exit, so relaunch it."""
        with contextlib.suppress(VMError, subprocess.SubprocessError):
            self._ssh_raw("systemctl reboot", "root", timeout=15)
        if not self._wait_for_qemu_exit(SHUTDOWN_TIMEOUT):
            raise VMError("guest did not shut down for reboot\n" + self.console_tail())
        self._kill_qemu()
        self._close_master()
        self._boot()

    # -- talking to the guest --------------------------------------------

    def ssh(
        self,
        cmd: str,
        user: str = "root",
        check: bool = True,
        timeout: float = 120,
        input: str | None = None,
        new_login: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run cmd through the user's login shell.

        Non-root users get a fresh login (sshd, PAM) on every call; root reuses one
        multiplexed connection unless new_login is set.
        """
        try:
            result = self._ssh_raw(cmd, user, timeout=timeout, input=input, multiplex=not new_login)
        except subprocess.TimeoutExpired as exc:
            raise VMError(
                f"command as {user} timed out after {timeout}s: {cmd}\n"
                f"--- stdout ---\n{_text(exc.stdout)}--- stderr ---\n"
                f"{_text(exc.stderr)}"
            ) from None
        if result.returncode == 255 and self._qemu_gone_after_disconnect():
            raise self._gone_error(f"while running as {user}: {cmd}")
        if check and result.returncode != 0:
            raise SSHCommandError(cmd, user, result)
        return result

    def put(self, local_path: str | Path, remote_path: str) -> None:
        self._ensure_master()
        subprocess.run(
            [
                "scp",
                "-q",
                "-r",
                "-P",
                str(self.port),
                *self._ssh_options("root"),
                str(local_path),
                f"root@127.0.0.1:{remote_path}",
            ],
            check=True,
            capture_output=True,
            timeout=600,
        )

    def put_bytes(self, data: bytes, remote_path: str, mode: int = 0o644) -> None:
        path = shlex.quote(remote_path)
        cmd = f'mkdir -p "$(dirname {path})" && cat > {path} && chmod {mode:o} {path}'
        self._ensure_master()
        result = subprocess.run(
            self._ssh_argv("root", cmd),
            input=data,
            capture_output=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise VMError(f"writing {remote_path} failed: {result.stderr.decode(errors='replace')}")

    def add_user(
        self,
        name: str,
        uid: int,
        groups: tuple[str, ...] | list[str] = (),
        primary_group: str | None = None,
    ) -> None:
        """Create a login user that the harness key can ssh in as."""
        q = shlex.quote
        wanted_groups = [*groups, *([primary_group] if primary_group else [])]
        lines = ["set -e", *(f"groupadd -f {q(g)}" for g in wanted_groups)]
        useradd = f"useradd -m -u {uid} -s /bin/bash"
        if primary_group:
            useradd += f" -g {q(primary_group)}"
        # Test modules share a VM: a name taken with another uid is a clash between
        # modules, said loudly rather than tested against the wrong uid.
        lines.append(
            f"if id -u {q(name)} >/dev/null 2>&1; then "
            f'[ "$(id -u {q(name)})" = {uid} ] || '
            f"{{ echo 'user {name} exists with another uid than {uid}' >&2; exit 1; }}; "
            f"else {useradd} {q(name)}; fi"
        )
        if groups:
            lines.append(f"usermod -aG {q(','.join(groups))} {q(name)}")
        lines += [
            f"home=$(getent passwd {q(name)} | cut -d: -f6)",
            'install -d -m 700 "$home/.ssh"',
            'install -m 600 /root/.ssh/authorized_keys "$home/.ssh/authorized_keys"',
            f'chown -R {q(name)}: "$home/.ssh"',
        ]
        self.ssh("\n".join(lines))

    def grow_root_fs(self) -> None:
        """Grow the root file system (the image's few free GB) to the whole disk, online."""
        self.ssh("resize2fs /dev/vda")

    def cgroup_mode(self) -> str:
        fs_type = self.ssh("stat -fc %T /sys/fs/cgroup").stdout.strip()
        return {"cgroup2fs": "v2", "tmpfs": "v1"}.get(fs_type, fs_type)

    def system_state(self, timeout: float = 180) -> str:
        """Wait for boot to settle; returns e.g. 'running' or 'degraded'."""
        return self.ssh(
            "systemctl is-system-running --wait", check=False, timeout=timeout
        ).stdout.strip()

    @property
    def console_log(self) -> Path:
        assert self._workdir is not None, "VM not started"
        return self._workdir / "console.log"

    def console_tail(self, lines: int = 60) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except (OSError, AssertionError):
            return "(no console log)"
        return "--- console (tail) ---\n" + "\n".join(text.splitlines()[-lines:])

    # -- internals --------------------------------------------------------

    @property
    def _overlay(self) -> Path:
        assert self._workdir is not None
        return self._workdir / "overlay.qcow2"

    @property
    def _control_path(self) -> Path:
        assert self._workdir is not None
        return self._workdir / "ssh-master"

    def _boot(self) -> None:
        assert self._workdir is not None
        with step(f"booting VM (cgroup {self.cgroup}, TCG)"):
            started = time.monotonic()
            self._launch_qemu()
            self._wait_for_ssh(started + BOOT_TIMEOUT)
            self.last_boot_seconds = time.monotonic() - started
            self._ensure_master()

    def _launch_qemu(self) -> None:
        assert self._workdir is not None
        self.port = _free_port()
        image = self.image
        cmdline = f"{BASE_CMDLINE} {CGROUP_CMDLINE[self.cgroup]}".strip()
        argv = [
            "qemu-system-x86_64",
            "-name",
            f"cgpolicy-{self.cgroup}",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-smp",
            str(self.cpus),
            "-m",
            str(self.memory_mb),
            "-nodefaults",
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
            "-kernel",
            str(image.kernel),
            "-initrd",
            str(image.initrd),
            "-append",
            cmdline,
            "-drive",
            f"file={self._overlay},if=virtio,format=qcow2",
            "-netdev",
            f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.port}-:22",
            "-device",
            "virtio-net-pci,netdev=n0",
            "-device",
            "virtio-rng-pci",
            # append=on keeps the console of earlier boots across reboot().
            "-chardev",
            f"file,id=con0,path={self.console_log},append=on",
            "-serial",
            "chardev:con0",
        ]
        with open(self._workdir / "qemu.log", "ab") as log:
            self._qemu = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )

    def _wait_for_ssh(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if not self.running:
                raise VMError(f"QEMU exited during boot\n{self._qemu_log()}{self.console_tail()}")
            try:
                if (
                    self._ssh_raw(
                        "true", "root", timeout=20, connect_timeout=5, multiplex=False
                    ).returncode
                    == 0
                ):
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(1)
        self._kill_qemu()
        raise VMError(
            f"no ssh on port {self.port} within {BOOT_TIMEOUT:.0f}s\n{self.console_tail()}"
        )

    def _wait_for_qemu_exit(self, timeout: float) -> bool:
        if self._qemu is None:
            return True
        try:
            self._qemu.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def _kill_qemu(self) -> None:
        if self._qemu is not None:
            if self._qemu.poll() is None:
                self._qemu.kill()
            self._qemu.wait()
            self._qemu = None

    def _qemu_gone_after_disconnect(self) -> bool:
        # A dying guest drops ssh a moment before QEMU exits.
        return self._qemu is not None and self._wait_for_qemu_exit(5)

    def _gone_error(self, context: str) -> VMError:
        return VMError(f"the VM is gone {context}\n{self.exit_report()}")

    def exit_report(self) -> str:
        """How QEMU ended (a signal shows who sent it) and the guest's last console lines."""
        code = self._qemu.returncode if self._qemu is not None else None
        return f"QEMU exit status {code}\n{self._qemu_log()}{self.console_tail(100)}"

    def _qemu_log(self) -> str:
        assert self._workdir is not None
        try:
            return "--- qemu ---\n" + (self._workdir / "qemu.log").read_text(errors="replace")
        except OSError:
            return ""

    def _ssh_options(
        self, user: str, connect_timeout: int = CONNECT_TIMEOUT, multiplex: bool = True
    ) -> list[str]:
        options = [
            "-F",
            "/dev/null",
            "-i",
            str(self.image.ssh_key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "BatchMode=yes",
            "-o",
            f"ConnectTimeout={connect_timeout}",
            "-o",
            "ControlMaster=no",
        ]
        if user == "root" and multiplex:
            return [*options, "-o", f"ControlPath={self._control_path}"]
        # Every non-root call must be a real login through PAM.
        return [*options, "-o", "ControlPath=none"]

    def _ssh_argv(
        self, user: str, cmd: str, connect_timeout: int = CONNECT_TIMEOUT, multiplex: bool = True
    ) -> list[str]:
        return [
            "ssh",
            "-p",
            str(self.port),
            *self._ssh_options(user, connect_timeout, multiplex),
            f"{user}@127.0.0.1",
            "--",
            cmd,
        ]

    def _ssh_raw(
        self,
        cmd: str,
        user: str,
        timeout: float,
        input: str | None = None,
        connect_timeout: int = CONNECT_TIMEOUT,
        multiplex: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        if user == "root" and multiplex:
            self._ensure_master()
        return subprocess.run(
            self._ssh_argv(user, cmd, connect_timeout, multiplex),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL if input is None else None,
        )

    def _ensure_master(self) -> None:
        """(Re)start the root ControlMaster; it dies with the guest's sshd on reboot."""
        if self._control_path.exists():
            return
        assert self._workdir is not None
        # Later options do not override earlier ones in ssh, so these come first.
        argv = [
            "ssh",
            "-p",
            str(self.port),
            "-o",
            "ControlMaster=yes",
            "-o",
            f"ControlPath={self._control_path}",
            "-o",
            "ControlPersist=yes",
            *self._ssh_options("root"),
            "-N",
            "-f",
            "root@127.0.0.1",
        ]
        # -f leaves a background process holding stdio: give it a file, not a pipe.
        log_path = self._workdir / "ssh-master.log"
        with open(log_path, "ab") as log:
            done = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, timeout=60
            )
        if done.returncode != 0:
            if self._qemu_gone_after_disconnect():
                raise self._gone_error("(opening the root ssh connection)")
            raise VMError(f"cannot open the root ssh connection:\n{log_path.read_text()}")

    def _close_master(self) -> None:
        if self._workdir is None or not self._control_path.exists():
            return
        subprocess.run(
            ["ssh", "-o", f"ControlPath={self._control_path}", "-O", "exit", "root@127.0.0.1"],
            capture_output=True,
            timeout=15,
            check=False,
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    # A killed test run must not leave a QEMU eating both cores.
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data
