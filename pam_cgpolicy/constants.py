"""Paths, environment variables and bus names, in one place."""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_DIR_ENV = "CGPOLICY_CONFIG_DIR"
STATE_DIR_ENV = "CGPOLICY_STATE_DIR"
DEFAULT_CONFIG_DIR = Path("/etc/cgpolicy")
DEFAULT_STATE_DIR = Path("/var/lib/cgpolicy")
COMPILED_POLICY = "policy.compiled.json"

SYSTEMD_BUS_NAME = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
SYSTEMD_MANAGER = "org.freedesktop.systemd1.Manager"
SYSTEMD_UNIT = "org.freedesktop.systemd1.Unit"
SYSTEMD_SLICE = "org.freedesktop.systemd1.Slice"
PROPERTIES = "org.freedesktop.DBus.Properties"

CGROUP_ROOT = Path("/sys/fs/cgroup")
V1_FREEZER_GROUP = "cgpolicy"  # our directory under the v1 freezer hierarchy

HOOK_PATH = "/usr/sbin/cgpolicy-pam-hook"


def config_dir(override: str | None = None) -> Path:
    return Path(override or os.environ.get(CONFIG_DIR_ENV) or DEFAULT_CONFIG_DIR)


def state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


def slice_name(uid: int) -> str:
    """The only units cgpolicy ever changes: a non-root user's slice."""
    if isinstance(uid, bool) or not isinstance(uid, int) or uid <= 0:
        raise ValueError(f"not a user uid: {uid!r}")
    return f"user-{uid}.slice"
