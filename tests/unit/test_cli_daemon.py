"""cgpolicyctl as a process on a private system bus: through cgpolicyd, or straight to systemd.

The CLI finds the bus in DBUS_SYSTEM_BUS_ADDRESS. A fake cgpolicyd (and, where a
test needs one, a fake systemd) answer on this test's event loop meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fakeservices import METRICS, FakeCore, cgpolicyd, denying_cgpolicyd, fake_systemd
from policyfiles import DAEMON_SECTIONS, MAIN, write_policy
from privatebus import private_bus

from pam_cgpolicy import cli
from pam_cgpolicy.badness import Change, UserScore
from pam_cgpolicy.cgroups import cgroup_mode
from pam_cgpolicy.compiled import save_penalties
from pam_cgpolicy.constants import PENALTIES
from pam_cgpolicy.state import StateStore

T = TypeVar("T")
NOBODY = 65534
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    with private_bus() as bus_address:
        yield bus_address


@dataclass(frozen=True)
class Done:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def env(tmp_path: Path, address: str) -> dict[str, str]:
    write_policy(tmp_path / "etc")
    (tmp_path / "state").mkdir()
    return dict(
        os.environ,
        DBUS_SYSTEM_BUS_ADDRESS=address,
        CGPOLICY_CONFIG_DIR=str(tmp_path / "etc"),
        CGPOLICY_STATE_DIR=str(tmp_path / "state"),
    )


async def cgpolicyctl(env: dict[str, str], *args: str) -> Done:
    """Asynchronous, so the fake services on this loop can answer it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pam_cgpolicy.cli",
        *args,
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return Done(process.returncode, stdout.decode(), stderr.decode())


def run(scenario: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(scenario, 40))


async def with_daemon(env: dict[str, str], core: FakeCore, *args: str) -> Done:
    async with cgpolicyd(env["DBUS_SYSTEM_BUS_ADDRESS"], core):
        return await cgpolicyctl(env, *args)


# penalize, release, reload: cgpolicyd only


def test_penalize_and_release_go_to_cgpolicyd(env: dict[str, str]) -> None:
    core = FakeCore()
    penalized = run(with_daemon(env, core, "penalize", "nobody", "penalty1"))
    released = run(with_daemon(env, core, "release", "nobody"))
    assert (penalized.returncode, penalized.stdout) == (0, "nobody: penalized (penalty1)\n")
    assert (released.returncode, released.stdout) == (0, "nobody: released\n")
    assert core.calls == [("penalize", "nobody", "penalty1"), ("release", "nobody")]


def test_a_daemon_error_is_exit_1_with_its_message(env: dict[str, str]) -> None:
    done = run(with_daemon(env, FakeCore(), "penalize", "nobody", "penalty9"))
    assert done.returncode == 1
    assert done.stderr == (
        "error: no tier 'penalty9'; the tiers are: penalty1 (org.cgpolicy1.Error.NoSuchTier)\n"
    )


def test_access_denied_is_said_plainly(env: dict[str, str]) -> None:
    async def scenario() -> Done:
        async with denying_cgpolicyd(env["DBUS_SYSTEM_BUS_ADDRESS"], "Release is for admins"):
            return await cgpolicyctl(env, "release", "nobody")

    done = run(scenario())
    assert done.returncode == 1
    assert done.stderr.startswith("error: access denied: Release is for admins")


def test_metrics_prints_cgpolicyds_exposition_as_it_is(env: dict[str, str]) -> None:
    core = FakeCore()
    done = run(with_daemon(env, core, "metrics"))
    assert (done.returncode, done.stdout, done.stderr) == (0, METRICS, "")
    assert core.calls == [("metrics",)]


@pytest.mark.parametrize(
    "args", [["penalize", "nobody", "penalty1"], ["release", "x"], ["reload"], ["metrics"]]
)
def test_without_cgpolicyd_they_say_it_is_not_running(env: dict[str, str], args: list[str]) -> None:
    done = run(cgpolicyctl(env, *args))
    assert done.returncode == 1
    assert "cgpolicyd is not running" in done.stderr
    assert "Traceback" not in done.stderr


def test_reload_prints_each_problem_and_fails(env: dict[str, str]) -> None:
    problems = (
        "/etc/cgpolicy/cgpolicy.toml:3: general.min_uid: must be a number",
        "/etc/cgpolicy/groups.d/a.toml:7: limits.CPUQuota: invalid CPU quota 'lots'",
    )
    done = run(with_daemon(env, FakeCore(problems=problems), "reload"))
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert lines[:2] == [f"error: {problem}" for problem in problems]
    assert done.stdout == ""


def test_reload_with_a_good_policy(env: dict[str, str]) -> None:
    core = FakeCore()
    done = run(with_daemon(env, core, "reload"))
    assert (done.returncode, done.stdout) == (0, "policy reloaded\n")
    assert core.calls == [("reload",)]


# freeze, thaw, status: through cgpolicyd when it runs


def test_freeze_and_thaw_go_through_cgpolicyd_and_say_how(env: dict[str, str]) -> None:
    core = FakeCore()
    frozen = run(with_daemon(env, core, "freeze", "nobody"))
    thawed = run(with_daemon(env, core, "thaw", "nobody"))
    how = "systemd" if cgroup_mode() == "unified" else "v1 freezer"
    assert (frozen.returncode, frozen.stdout) == (0, f"nobody: frozen ({how})\n")
    # No v1 freezer group of ours for nobody here, so thawing is systemd's.
    assert (thawed.returncode, thawed.stdout) == (0, "nobody: thawed (systemd)\n")
    assert core.calls == [("freeze", "nobody"), ("thaw", "nobody")]


def test_status_adds_cgpolicyds_tier_and_badness(env: dict[str, str]) -> None:
    async def scenario() -> tuple[Done, Done]:
        async with fake_systemd(env["DBUS_SYSTEM_BUS_ADDRESS"]):
            one = await with_daemon(env, FakeCore(), "status", "--json", "nobody")
            table = await with_daemon(env, FakeCore(), "status")
            return one, table

    one, table = run(scenario())
    assert one.returncode == 0, one.stderr
    data = json.loads(one.stdout)
    assert data["limits"] == {"CPUQuota": "50%", "MemoryMax": "512M"}
    assert data["freezer"] == "running"
    assert {key: data[key] for key in ("tier", "tier_expiry", "occurrences")} == {
        "tier": "penalty1",
        "tier_expiry": 1_800_000_000.5,
        "occurrences": 2,
    }
    assert (data["cpu_badness"], data["memory_badness"]) == (80.25, 23.0)
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split() == [
        "USER",
        "UID",
        "GROUP",
        "CPUQuota",
        "MemoryMax",
        "MemoryHigh",
        "TasksMax",
        "CPU-TIME",
        "MEMORY",
        "TASKS",
        "FREEZER",
        "TIER",
        "BADNESS",
    ]
    assert re.match(r"^nobody\s+65534\s+normal\s+50%\s+512M\s", row)
    assert row.split()[-3:] == ["running", "penalty1", "80.2/23.0"]


def test_status_without_cgpolicyd_is_as_before(env: dict[str, str]) -> None:
    async def scenario() -> tuple[Done, Done]:
        async with fake_systemd(env["DBUS_SYSTEM_BUS_ADDRESS"]):
            return (
                await cgpolicyctl(env, "status", "--json", "nobody"),
                await cgpolicyctl(env, "status"),
            )

    one, table = run(scenario())
    assert one.returncode == 0, one.stderr
    assert set(json.loads(one.stdout)) == {
        "user",
        "uid",
        "slice",
        "active",
        "limits",
        "usage",
        "freezer",
        "group",
        "rule",
        "exempt",
    }
    assert "TIER" not in table.stdout and "BADNESS" not in table.stdout
    assert re.search(r"^nobody\s+65534\s+normal\s+50%\s+512M", table.stdout, re.M)


def test_status_when_cgpolicyd_refuses_shows_systemds_view(env: dict[str, str]) -> None:
    async def scenario() -> Done:
        bus = env["DBUS_SYSTEM_BUS_ADDRESS"]
        async with fake_systemd(bus), denying_cgpolicyd(bus, "ListUsers is for admins"):
            return await cgpolicyctl(env, "status")

    done = run(scenario())
    assert done.returncode == 0
    assert "warning: access denied: ListUsers is for admins" in done.stderr
    assert "TIER" not in done.stdout


def test_freeze_without_cgpolicyd_goes_straight_to_systemd(env: dict[str, str]) -> None:
    async def scenario() -> tuple[Done, list[tuple[str, ...]]]:
        async with fake_systemd(env["DBUS_SYSTEM_BUS_ADDRESS"]) as calls:
            return await cgpolicyctl(env, "freeze", "nobody"), calls

    done, calls = run(scenario())
    assert (done.returncode, done.stdout) == (0, "nobody: frozen (systemd)\n")
    assert ("FreezeUnit", "user-65534.slice") in calls


@pytest.mark.parametrize("args", [["status", "nobody"], ["freeze", "nobody"], ["thaw", "nobody"]])
def test_without_cgpolicyd_or_systemd_the_systemd_error_shows(
    env: dict[str, str], args: list[str]
) -> None:
    done = run(cgpolicyctl(env, *args))
    assert done.returncode == 1
    assert "org.freedesktop.systemd1" in done.stderr
    assert "org.freedesktop.DBus.Error.ServiceUnknown" in done.stderr
    assert "Traceback" not in done.stderr


# apply: through cgpolicyd, else from the hook's copy of the penalties


def test_apply_goes_through_cgpolicyd_when_it_runs(env: dict[str, str]) -> None:
    core = FakeCore()
    done = run(with_daemon(env, core, "apply", "nobody"))
    assert done.returncode == 0 and "tier=penalty1" in done.stdout
    assert core.calls == [("apply", "nobody")]


def test_apply_without_cgpolicyd_keeps_the_penalty_in_force(
    env: dict[str, str], tmp_path: Path
) -> None:
    write_policy(tmp_path / "etc", main=MAIN + DAEMON_SECTIONS)
    save_penalties(str(tmp_path / "state" / PENALTIES), {NOBODY: (4e9, "penalty2", None)})

    async def scenario() -> tuple[Done, list[tuple[str, ...]]]:
        async with fake_systemd(env["DBUS_SYSTEM_BUS_ADDRESS"]) as calls:
            return await cgpolicyctl(env, "apply", "nobody"), calls

    done, calls = run(scenario())
    assert done.returncode == 0, done.stderr
    (call,) = [c for c in calls if c[0] == "SetUnitProperties"]
    assert call[1] == "user-65534.slice"
    assert "CPUQuotaPerSecUSec=1000000" in call  # penalty2 halves the group's 200%
    assert "tier=penalty2" in done.stdout and "CPUQuota=100%" in done.stdout


# history: the state database, read-only


def record_history(state_dir: Path) -> None:
    with StateStore.open(state_dir / "state.db") as store:
        store.record(
            65534,
            "nobody",
            UserScore(tier="penalty1", tier_expiry=2000.0, occurrences=1),
            Change("penalized", None, "penalty1", 0, 1, "badness 103.2 >= 100"),
            now=1000.0,
        )
        store.record(
            1,
            "daemon",
            UserScore(tier="penalty1", tier_expiry=2500.0, occurrences=1),
            Change("penalized", None, "penalty1", 0, 1, "by hand"),
            actor="uid 0 (root)",
            now=1500.0,
        )
        store.record(
            65534,
            "nobody",
            UserScore(occurrences=1),
            Change("released", "penalty1", None, 1, 1, "penalty1 ended"),
            now=2000.0,
        )


def local(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def test_history_newest_first(env: dict[str, str]) -> None:
    record_history(Path(env["CGPOLICY_STATE_DIR"]))
    done = run(cgpolicyctl(env, "history"))
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split() == ["TIME", "USER", "TIER", "OCCURRENCES", "REASON", "BY"]
    assert [row.split()[:2] for row in rows] == [
        [local(2000.0), "nobody"],
        [local(1500.0), "daemon"],
        [local(1000.0), "nobody"],
    ]
    assert re.search(r"penalty1 -> -\s+1 -> 1\s+penalty1 ended\s+cgpolicyd$", rows[0])
    assert re.search(r"- -> penalty1\s+0 -> 1\s+by hand\s+uid 0 \(root\)$", rows[1])


def test_history_of_one_user_limited_as_json(env: dict[str, str]) -> None:
    record_history(Path(env["CGPOLICY_STATE_DIR"]))
    done = run(cgpolicyctl(env, "history", "nobody", "--limit", "1", "--json"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [
        {
            "time": local(2000.0),
            "timestamp": 2000.0,
            "user": "nobody",
            "uid": 65534,
            "kind": "released",
            "old_tier": "penalty1",
            "new_tier": None,
            "old_occurrences": 1,
            "new_occurrences": 1,
            "reason": "penalty1 ended",
            "actor": "cgpolicyd",
            "watched": False,
        }
    ]


def test_history_leaves_the_database_as_it_was(env: dict[str, str]) -> None:
    database = Path(env["CGPOLICY_STATE_DIR"]) / "state.db"
    record_history(database.parent)
    before = database.read_bytes()
    assert run(cgpolicyctl(env, "history")).returncode == 0
    # SQLite's reader may add its -shm and -wal files beside it; the database is unchanged.
    assert database.read_bytes() == before


def test_history_without_a_database(env: dict[str, str]) -> None:
    done = run(cgpolicyctl(env, "history"))
    assert (done.returncode, done.stdout) == (0, "no history yet\n")
    assert not (Path(env["CGPOLICY_STATE_DIR"]) / "state.db").exists()
    assert run(cgpolicyctl(env, "history", "--json")).stdout == "[]\n"


@pytest.mark.parametrize("limit", ["0", "-1", "many"])
def test_history_limit_must_be_a_positive_number(env: dict[str, str], limit: str) -> None:
    assert run(cgpolicyctl(env, "history", "--limit", limit)).returncode == 2


# What a user who is not an admin may see of others


def cli_as(
    uid: int, env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: Any, *args: str
) -> Done:
    """cgpolicyctl in this process, with the uid the kernel would report for ``uid``."""
    for name in ("DBUS_SYSTEM_BUS_ADDRESS", "CGPOLICY_CONFIG_DIR", "CGPOLICY_STATE_DIR"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.setattr(os, "getuid", lambda: uid)
    code = cli.main(list(args))
    out = capsys.readouterr()
    return Done(code, out.out, out.err)


@pytest.mark.parametrize(
    "args", [["classify", "daemon"], ["status", "daemon"], ["history", "daemon"], ["history", "1"]]
)
def test_another_users_standing_is_refused_to_a_user_who_is_not_an_admin(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: Any, args: list[str]
) -> None:
    record_history(Path(env["CGPOLICY_STATE_DIR"]))
    done = cli_as(NOBODY, env, monkeypatch, capsys, *args)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        f"error: {args[0]} of another user is for root and the policy's admin group; "
        f"uid {NOBODY} is in neither\n"
    )


def test_a_user_who_is_not_an_admin_sees_their_own_standing(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    record_history(Path(env["CGPOLICY_STATE_DIR"]))
    classified = cli_as(NOBODY, env, monkeypatch, capsys, "classify", "nobody")
    assert classified.returncode == 0 and classified.stdout.startswith("nobody (uid 65534): group")
    for args in (["history"], ["history", "nobody"]):
        done = cli_as(NOBODY, env, monkeypatch, capsys, *args, "--json")
        assert done.returncode == 0, done.stderr
        assert [event["user"] for event in json.loads(done.stdout)] == ["nobody", "nobody"]


def test_the_admin_group_sees_everyone(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    config = Path(env["CGPOLICY_CONFIG_DIR"])
    main = (config / "cgpolicy.toml").read_text()
    (config / "cgpolicy.toml").write_text(
        main.replace("[general]", '[general]\nadmin_group = "nogroup"')
    )
    record_history(Path(env["CGPOLICY_STATE_DIR"]))
    assert cli_as(NOBODY, env, monkeypatch, capsys, "classify", "daemon").returncode == 0
    done = cli_as(NOBODY, env, monkeypatch, capsys, "history", "--json")
    assert [event["user"] for event in json.loads(done.stdout)] == ["nobody", "daemon", "nobody"]


# doctor: cgpolicyd's own state


def doctor_lines(done: Done, what: str) -> list[str]:
    return [line for line in done.stdout.splitlines() if f"] {what}:" in line]


def test_doctor_says_cgpolicyd_runs_degraded_on_the_last_good_policy(env: dict[str, str]) -> None:
    status = {
        "policy": "last good",
        "problems": ["/etc/cgpolicy/groups.d/a.toml:2: limits.CPUQuota: invalid CPU quota"],
        "started": 1_800_000_000.0,
        "pending": ["nobody"],
        "users": 2,
    }
    done = run(with_daemon(env, FakeCore(status=status), "doctor"))
    since = datetime.fromtimestamp(1_800_000_000.0).isoformat(" ", "seconds")
    assert doctor_lines(done, "cgpolicyd") == [
        f"[warn] cgpolicyd: degraded since {since}: on the last good policy; the files are "
        "refused (/etc/cgpolicy/groups.d/a.toml:2: limits.CPUQuota: invalid CPU quota)"
    ]
    assert doctor_lines(done, "cgpolicyd sends") == [
        "[warn] cgpolicyd sends: limits systemd has not taken yet, retried every cycle: nobody"
    ]


def test_doctor_fails_when_cgpolicyd_has_no_policy_and_says_when_it_is_fine(
    env: dict[str, str],
) -> None:
    status = {"policy": "none", "problems": ["x.toml: broken"], "started": 1_800_000_000.0}
    done = run(with_daemon(env, FakeCore(status=status), "doctor"))
    (line,) = doctor_lines(done, "cgpolicyd")
    assert line.startswith("[FAIL] cgpolicyd: degraded since") and "nobody is limited" in line
    assert done.returncode == 1
    done = run(with_daemon(env, FakeCore(), "doctor"))
    (line,) = doctor_lines(done, "cgpolicyd")
    assert line.startswith("[  ok] cgpolicyd: running since") and "policy files" in line
    done = run(cgpolicyctl(env, "doctor"))
    assert doctor_lines(done, "cgpolicyd") == [
        "[warn] cgpolicyd: not running: nobody's usage is judged"
    ]
