"""Which cgroup mode the node runs: systemd owns the user slices' cgroups and is asked
first for everything; where it cannot freeze (cgroup v1), freezer.py does."""

from __future__ import annotations

from pathlib import Path

from .freezer import CGROUP_DIR

CGROUP_ROOT = Path(CGROUP_DIR)


def cgroup_mode(root: Path = CGROUP_ROOT) -> str:
    """'unified' (v2), 'hybrid' (v1 controllers, v2 for systemd) or 'legacy' (v1)."""
    if (root / "cgroup.controllers").exists():
        return "unified"
    if (root / "unified" / "cgroup.controllers").exists():
        return "hybrid"
    return "legacy"
