"""Keeps at most one VM alive per pytest process: a guest's boot takes both host cores.

(scripts/test runs two such processes at once: see tests/integration/conftest.py.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

from vmharness.machine import VM
from vmharness.progress import say


class VMRegistry:
    def __init__(
        self,
        output: Callable[[], AbstractContextManager[object]] | None = None,
        memory_mb: int = 2048,
        cpus: int = 2,
    ) -> None:
        # output: context in which progress may reach the terminal (pytest captures it otherwise)
        self._output = output or contextlib.nullcontext
        self._memory_mb = memory_mb
        self._cpus = cpus
        self._vms: dict[str, VM] = {}

    def get(self, cgroup: str) -> VM:
        """The VM for this cgroup mode, booted; any other running VM is shut down first."""
        vm = self._vms.setdefault(cgroup, VM(cgroup, self._memory_mb, self._cpus))
        if vm.running:
            return vm
        with self._output():
            for other in self._vms.values():
                if other is not vm and other.running:
                    say(f"shutting down the cgroup {other.cgroup} VM first")
                    other.stop()
            if vm.died:
                say(f"the cgroup {cgroup} VM died; booting a fresh one\n{vm.exit_report()}")
            vm.start()
            say(
                f"cgroup {cgroup} VM up after {vm.last_boot_seconds:.1f}s; "
                f"systemd reports {vm.system_state()!r}"
            )
        return vm

    def close(self) -> None:
        with self._output():
            for vm in self._vms.values():
                vm.stop()
