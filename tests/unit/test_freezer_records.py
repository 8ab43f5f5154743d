"""The v1 freezer's bookkeeping on a fake tree; the freezing itself is proven in the VM
(tests/integration/test_freezer.py): only the kernel moves and freezes tasks."""

from __future__ import annotations

import os
from pathlib import Path

from pam_cgpolicy.freezer import V1Freezer, start_time


def freezer(tmp_path: Path) -> V1Freezer:
    return V1Freezer(tmp_path / "cgroup", records=str(tmp_path / "records"))


def group(tmp_path: Path, name: str, state: str) -> None:
    directory = tmp_path / "cgroup" / "freezer" / "cgpolicy" / name
    directory.mkdir(parents=True)
    (directory / "freezer.state").write_text(f"{state}\n")


def test_only_frozen_and_freezing_users_are_swept(tmp_path: Path) -> None:
    group(tmp_path, "user-1001.slice", "FROZEN")
    group(tmp_path, "user-1002.slice", "THAWED")
    group(tmp_path, "user-1003.slice", "FREEZING")
    group(tmp_path, "user-x.slice", "FROZEN")
    group(tmp_path, "elsewhere", "FROZEN")
    assert freezer(tmp_path).frozen_uids() == [1001, 1003]


def test_a_user_who_is_not_frozen_is_not_swept(tmp_path: Path) -> None:
    """The login hook's case on every login of a user nobody froze: nothing to do."""
    (tmp_path / "cgroup" / "freezer").mkdir(parents=True)
    assert freezer(tmp_path).state(1001) == "running"
    assert freezer(tmp_path).sweep(1001) == 0


def test_a_recorded_group_is_kept_for_the_same_task_only(tmp_path: Path) -> None:
    """At thaw a task goes back where it was; a later task with its pid does not."""
    freezer_ = freezer(tmp_path)
    me = os.getpid()
    start = start_time(me)
    assert start is not None
    freezer_._record(1001, me, "/elsewhere")
    assert freezer_._origins(1001) == {me: "/elsewhere"}
    records = tmp_path / "records" / "user-1001.slice"
    assert records.stat().st_mode & 0o077 == 0 and (records / str(me)).stat().st_mode & 0o077 == 0
    (records / str(me)).write_text(f"{int(start) + 1} /elsewhere")  # the pid, reused
    assert freezer_._origins(1001) == {}
    freezer_._forget(1001)
    assert not records.exists()
