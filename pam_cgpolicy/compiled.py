"""The compiled copy of the last good policy.

Each successful load is saved as JSON with a fingerprint of the files it came
from (stat data only). The hook then loads the JSON while the files are
unchanged, which is cheaper than parsing TOML, and keeps using it when an admin
breaks a file: a broken policy never lets a login through unlimited by mistake.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import PolicyError
from .model import Policy, policy_paths

FORMAT = 1


def fingerprint(config_dir: Path) -> list[list[Any]]:
    """What changes when any policy file is edited, replaced, chowned or chmodded."""
    marks: list[list[Any]] = []
    for path in [config_dir, *policy_paths(config_dir)]:
        try:
            info = path.stat()
        except OSError:
            marks.append([str(path), None])
            continue
        marks.append(
            [
                str(path),
                info.st_mtime_ns,
                info.st_size,
                info.st_ino,
                info.st_uid,
                info.st_gid,
                info.st_mode,
            ]
        )
    return marks


def _read(cache_file: Path) -> tuple[list[Any], Policy] | None:
    try:
        data = json.loads(cache_file.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            return None
        return data["fingerprint"], Policy.from_json(data["policy"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save(cache_file: Path, policy: Policy, marks: list[list[Any]]) -> None:
    """Write atomically: a reader sees the old copy or the new one, never half."""
    cache_file.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    payload = json.dumps({"format": FORMAT, "fingerprint": marks, "policy": policy.to_json()})
    tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(payload)
        os.replace(tmp, cache_file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Loaded:
    """The policy in force, where it came from, and why the files were not used."""

    policy: Policy | None
    source: str  # "compiled", "files", "last good" or "none"
    error: PolicyError | None = None


def load_in_force(config_dir: Path, cache_file: Path) -> Loaded:
    """The policy to act on: the files when valid, else the last good compiled copy."""
    marks = fingerprint(config_dir)
    cached = _read(cache_file)
    if cached is not None and cached[0] == marks:
        return Loaded(cached[1], "compiled")
    from .policy import load_policy  # the parser only when the files changed

    try:
        policy = load_policy(config_dir)
    except PolicyError as err:
        return Loaded(cached[1] if cached else None, "last good" if cached else "none", err)
    with contextlib.suppress(OSError):  # a cache we cannot write must not stop a valid policy
        save(cache_file, policy, marks)
    return Loaded(policy, "files")
