"""The policy's data: status groups and their limits, and where the files live.

Kept apart from the parser in policy.py so that the login hook can use a
compiled policy without importing the TOML parser and validator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MAIN_FILE = "cgpolicy.toml"
GROUPS_DIR = "groups.d"


@dataclass(frozen=True)
class General:
    min_uid: int = 1000
    hook_timeout: float = 2.0


@dataclass(frozen=True)
class StatusGroup:
    name: str
    description: str = ""
    users: tuple[str, ...] = ()
    uids: tuple[tuple[int, int], ...] = ()  # inclusive ranges; a single uid is (n, n)
    groups: tuple[str, ...] = ()
    gids: tuple[int, ...] = ()
    exempt: bool = False
    limits: dict[str, int | str] = field(default_factory=dict)

    def matches_nobody(self) -> bool:
        return not (self.users or self.uids or self.groups or self.gids)


@dataclass(frozen=True)
class Policy:
    general: General
    order: tuple[str, ...]
    fallback: str
    groups: dict[str, StatusGroup]

    def managed_keys(self) -> set[str]:
        """The limits some group sets: the ones cgpolicy owns on every user slice."""
        return {key for group in self.groups.values() for key in group.limits}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Policy:
        groups = {
            name: StatusGroup(
                **{
                    **g,
                    "users": tuple(g["users"]),
                    "uids": tuple((lo, hi) for lo, hi in g["uids"]),
                    "groups": tuple(g["groups"]),
                    "gids": tuple(g["gids"]),
                }
            )
            for name, g in data["groups"].items()
        }
        return cls(General(**data["general"]), tuple(data["order"]), data["fallback"], groups)


def policy_paths(config_dir: Path) -> list[Path]:
    """The main file, the groups directory and every group file, in a stable order."""
    groups_dir = config_dir / GROUPS_DIR
    group_files = sorted(groups_dir.glob("*.toml")) if groups_dir.is_dir() else []
    return [config_dir / MAIN_FILE, groups_dir, *group_files]
