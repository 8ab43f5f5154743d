"""Writing small policy trees into a temporary directory for tests."""

from __future__ import annotations

from pathlib import Path

MAIN = """\
[general]
min_uid = 1000
hook_timeout = 1.5

[status]
order = ["admins", "students", "normal"]
fallback = "normal"
"""

GROUPS = {
    "admins": 'description = "Admins"\nusers = ["root2"]\ngroups = ["wheel"]\nexempt = true\n',
    "students": (
        'description = "Students"\nusers = ["bob"]\nuids = [2002, "3000-3999"]\n'
        'groups = ["students"]\ngids = [3001]\n\n[limits]\nCPUQuota = "100%"\n'
        'MemoryMax = "2G"\nMemoryHigh = "1800M"\nTasksMax = 512\n'
    ),
    "normal": '[limits]\nCPUQuota = "200%"\nMemoryMax = "4G"\n',
}

# cgpolicyd's sections of the main file, after MAIN.
DAEMON_SECTIONS = """
[badness]
cpu_threshold = 0.8
memory_threshold = 0.5
time_to_max_bad = 300
time_to_min_bad = 1800

[processes]
whitelist = ["sshd", "scp", "sftp-server", "rsync"]

[penalty]
order = ["penalty1", "penalty2"]
occurrence_timeout = 10800

[penalty.penalty1]
timeout = 1800
cpu_factor = 0.8
memory_factor = 0.8
message = "new"

[penalty.penalty2]
timeout = 3600
cpu_factor = 0.5
memory_factor = 0.5
"""


def write_policy(root: Path, main: str = MAIN, groups: dict[str, str] | None = None) -> Path:
    (root / "groups.d").mkdir(parents=True, exist_ok=True)
    (root / "cgpolicy.toml").write_text(main)
    for name, text in (GROUPS if groups is None else groups).items():
        (root / "groups.d" / f"{name}.toml").write_text(text)
    return root
