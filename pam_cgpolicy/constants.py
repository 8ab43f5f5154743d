"""Paths, environment variables and bus names, in one place.

Imported by the login hook, so it uses plain strings (no pathlib) and only
modules the interpreter has loaded already. The functions that read the
environment are for the CLI and cgpolicyd: the hook's environment is partly
the user's (see hook.py), so it never calls them.
"""

from __future__ import annotations

import os

CONFIG_DIR_ENV = "CGPOLICY_CONFIG_DIR"
STATE_DIR_ENV = "CGPOLICY_STATE_DIR"
BUS_ADDRESS_ENV = "DBUS_SYSTEM_BUS_ADDRESS"  # where the D-Bus library finds the system bus
DEFAULT_CONFIG_DIR = "/etc/cgpolicy"
DEFAULT_STATE_DIR = "/var/lib/cgpolicy"
COMPILED_POLICY = "policy.compiled"
PENALTIES = "penalties.compiled"  # cgpolicyd's penalties in force, for the hook
STATE_DB = "state.db"
USAGE_DB = "usage.db"  # cgpolicyd's usage history (usagehistory.py)
CHECKPOINTS = "checkpoints"
# In a checkpoint's directory: its record, written once the dump is verified, and
# the image CRIU writes for every dump; evict.py keeps both present exactly while
# the job waits for its restore (the login hook reads that from the directory).
CHECKPOINT_META = "checkpoint.json"
CHECKPOINT_INVENTORY = "inventory.img"
MAIN_FILE = "cgpolicy.toml"
GROUPS_DIR = "groups.d"

SYSTEMD_BUS_NAME = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
SYSTEMD_MANAGER = "org.freedesktop.systemd1.Manager"
SYSTEMD_UNIT = "org.freedesktop.systemd1.Unit"
SYSTEMD_SLICE = "org.freedesktop.systemd1.Slice"
SYSTEMD_SERVICE = "org.freedesktop.systemd1.Service"
PROPERTIES = "org.freedesktop.DBus.Properties"

CGPOLICY_BUS_NAME = "org.cgpolicy1"  # the daemon's own API: dbus/org.cgpolicy1.Manager.xml
CGPOLICY_PATH = "/org/cgpolicy1"
CGPOLICY_INTERFACE = "org.cgpolicy1.Manager"

HOOK_PATH = "/usr/sbin/cgpolicy-pam-hook"
DAEMON_UNIT = "cgpolicyd.service"
# The drop-in that lets cgpolicyd open TCP sockets (network.py): every package ships
# it at NETWORK_DROPIN, inactive; an admin copies it to NETWORK_DROPIN_ACTIVE.
NETWORK_DROPIN = "/usr/share/cgpolicy/network.conf"
NETWORK_DROPIN_ACTIVE = "/etc/systemd/system/cgpolicyd.service.d/network.conf"


def config_dir(override: str | None = None) -> str:
    return override or os.environ.get(CONFIG_DIR_ENV) or DEFAULT_CONFIG_DIR


def state_dir() -> str:
    return os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR


def system_bus_address() -> str | None:
    """The CLI's and cgpolicyd's system bus, the one their D-Bus library uses too."""
    return os.environ.get(BUS_ADDRESS_ENV) or None


def compiled_policy_file() -> str:
    return os.path.join(state_dir(), COMPILED_POLICY)


def penalties_file() -> str:
    return os.path.join(state_dir(), PENALTIES)


def state_db_file() -> str:
    return os.path.join(state_dir(), STATE_DB)


def usage_db_file() -> str:
    return os.path.join(state_dir(), USAGE_DB)
def checkpoints_dir() -> str:
    """Root's alone (0700): evicted jobs' images, one directory per checkpoint id."""
    return os.path.join(state_dir(), CHECKPOINTS)


def policy_files(config_dir: str) -> list[str]:
    """The main file, the groups directory and every group file, in a stable order."""
    groups_dir = os.path.join(config_dir, GROUPS_DIR)
    try:
        names = sorted(n for n in os.listdir(groups_dir) if n.endswith(".toml"))
    except OSError:
        names = []
    return [
        os.path.join(config_dir, MAIN_FILE),
        groups_dir,
        *(os.path.join(groups_dir, n) for n in names),
    ]


def slice_name(uid: int) -> str:
    """The only units cgpolicy ever changes: a non-root user's slice."""
    if isinstance(uid, bool) or not isinstance(uid, int) or uid <= 0:
        raise ValueError(f"not a user uid: {uid!r}")
    return f"user-{uid}.slice"

SELFTEST_SERVICE = "cgpolicy-selftest"  # selftest's PAM service: /etc/pam.d/cgpolicy-selftest
