"""cgpolicyctl import-arbiter2: Arbiter2's example and two hand-written sites.

Data in arbiter2/: etc/config.toml and etc/whitelist.txt are Arbiter2's own example
(GPL-2.0-only, as this project); site-a.toml and site-b.toml (with its per-node
override site-b-node1.toml) are written for these tests and use every section.
The expected badness comes from Arbiter2's formulas, written out below.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pam_cgpolicy import arbiter2, cli
from pam_cgpolicy.badness import UserScore, evaluate
from pam_cgpolicy.errors import SiteImportError
from pam_cgpolicy.policy import Policy, load_policy
from pam_cgpolicy.slicelimits import group_quotas, tier_limits

DATA = Path(__file__).parent / "arbiter2" / "etc"
EXAMPLE = [DATA / "config.toml"]
SITE_A = [DATA / "site-a.toml"]
SITE_B = [DATA / "site-b.toml", DATA / "site-b-node1.toml"]
GIB = 1024**3


@pytest.fixture(autouse=True)
def sync_password(tmp_path, monkeypatch) -> Path:
    """The password file an imported [sync] names, made root's-alone-like (0600) here:
    the admin's to create on a node, the test's to create for the real loader."""
    path = tmp_path / "sync-password"
    path.write_text("secret\n")
    path.chmod(0o600)
    monkeypatch.setattr(arbiter2, "SYNC_PASSWORD_FILE", str(path))
    return path


def sync_settings(policy: Policy) -> dict:
    """The policy's [sync] but what the import leaves to cgpolicy's defaults."""
    assert policy.sync is not None
    settings = dataclasses.asdict(policy.sync)
    return {k: v for k, v in settings.items() if k not in ("node", "timeout")}


def run_import(tmp_path: Path, configs: list[Path], tpc: int, capsys) -> tuple[Policy, str]:
    out = tmp_path / "out"
    argv = ["import-arbiter2", *map(str, configs), "--out", str(out), "--threads-per-core"]
    assert cli.main([*argv, str(tpc)]) == 0
    return load_policy(out), capsys.readouterr().out


def imported(configs: list[Path], tpc: int) -> arbiter2.Imported:
    config = arbiter2.read_configs(configs)
    return arbiter2.import_site(config, DATA.parent / "arbiter", tpc, list(map(str, configs)))


def leaves(table: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in table.items():
        if isinstance(value, dict):
            keys += leaves(value, f"{prefix}{key}.")
        else:
            keys.append(prefix + key)
    return keys


@pytest.mark.parametrize("configs", [EXAMPLE, SITE_A, SITE_B], ids=["example", "site-a", "site-b"])
def test_every_setting_is_carried_over_or_reported(configs) -> None:
    """Each key of the configuration is a written value's source, has a note, or is
    listed as what cgpolicy does anyway."""
    result = imported(configs, 2)
    text = "\n".join(result.files.values())
    noted = {note.key for note in result.notes}
    noted |= {same.partition(" = ")[0] for same in result.same}
    for key in leaves(arbiter2.read_configs(configs)):
        table, _, name = key.rpartition(".")
        written = f"# {key}" in text or f"# {table}.whitelist, {name}" in text
        assert written or key in noted or table in noted, key


def test_arbiters_example_becomes_a_valid_policy(tmp_path, capsys) -> None:
    policy, out = run_import(tmp_path, EXAMPLE, 2, capsys)
    assert policy.order == ("admin", "normal")  # invincible matches nobody
    assert policy.fallback == "normal"
    normal, admin = policy.groups["normal"], policy.groups["admin"]
    assert normal.limits == {"CPUQuota": "400%", "MemoryMax": "4G"}  # 800 / 2 threads
    assert admin.limits == {"CPUQuota": "800%", "MemoryMax": "6G"}
    assert admin.uids == ((1000, 1000),)
    assert admin.whitelist == ("bash", "python", "python3")
    assert policy.whitelist[:3] == ("gcc", "clang", "bzip2")  # then whitelist.txt's lines
    assert len(policy.whitelist) == 38
    assert policy.general.interval == 30 and policy.general.min_uid == 1000
    b = policy.badness
    assert (b.cpu_threshold, b.memory_threshold) == (0.45, 0.5)
    assert (b.time_to_max_bad, b.time_to_min_bad) == (600, 1800)
    assert policy.penalty is not None
    assert policy.penalty.occurrence_timeout == 10800
    tiers = [(t.name, t.timeout, t.cpu_factor, t.memory_factor, t.message)
             for t in policy.penalty.tiers]  # fmt: skip
    assert tiers == [
        ("penalty1", 1800, 0.8, 0.8, "new"),
        ("penalty2", 3600, 0.5, 0.5, "repeated"),
        ("penalty3", 7200, 0.3, 0.3, "severe"),
    ]
    assert "status.invincible: has no uids or gids" in out
    assert policy.penalty.mode == "enforce"  # debug_mode = false
    assert policy.notify is not None
    notify = policy.notify
    assert (notify.host, notify.port, notify.starttls, notify.user) == ("0.0.0.0", 25, False, "")
    assert notify.sender == "noreply+arbiter@organization.edu"
    assert notify.user_address == "{user}@organization.edu"
    assert notify.admins == ("john.doe@organization.edu",)
    assert policy.sync is None  # [database] empty: a local SQLite file, nothing shared
    assert policy.history.retention == 7 * 86400  # 180 samples of 10 s: the default covers it
    for text in (
        "badness.max_history_kept: Arbiter2 kept the last 180 samples (1800 s)",
        "email.keep_plots, email.plot_location: cgpolicy keeps no image files",
        "email: the mail's text is cgpolicy's own",
    ):
        assert text in out
    assert f"{tmp_path / 'out'}: valid; 2 groups" in out
    assert cli.main(["--config-dir", str(tmp_path / "out"), "check"]) == 0


def test_site_a_absolute_penalties_and_what_is_left_out(tmp_path, capsys, sync_password) -> None:
    policy, out = run_import(tmp_path, SITE_A, 2, capsys)
    assert policy.order == ("staff", "students") and policy.fallback == "general"
    assert sorted(policy.groups) == ["general", "staff", "students"]  # not retired, guests
    assert policy.groups["general"].limits == {"CPUQuota": "150%", "MemoryMax": "1536M"}
    assert policy.groups["students"].limits == {"CPUQuota": "100%", "MemoryMax": "768M"}
    assert policy.groups["students"].gids == (5000,)  # -1 is no gid
    assert policy.groups["staff"].gids == (4000,)
    assert policy.groups["staff"].whitelist == ("matlab",)
    # Relative paths start from Arbiter2's program directory; bin/mover is no program.
    assert policy.whitelist == ("rsync", "/usr/libexec/openssh/sftp-server", "tar", "zstd")
    assert policy.general.interval == 20 and policy.general.min_uid == 500
    assert policy.penalty is not None
    factors = [(t.cpu_factor, t.memory_factor) for t in policy.penalty.tiers]
    assert factors == [(0.5, 0.8), (1.0, 0.5)]  # of the fallback's 150 and 1.5 GB
    for text in (
        "general.debug_mode: true",
        "badness.cap_badness_incr: false",
        "status.retired: not in status.order",
        "status.guests: has no uids or gids",
        "status.penalty.relative_quotas: false",
        "status.penalty.slower.cpu_quota: 2 raises the limit",
        "status.penalty.slower.whitelist: Arbiter2 does not use it in a penalty either",
        "'bin/mover' names no program",
        "database.log_location: cgpolicyd keeps its state",
        "database.log_rotate_period: cgpolicy rotates no files",
        "email.reply_to: cgpolicy's mail sets no Reply-To",
        "email.table_process_cap: the mail's process table always lists the user's top 5",
        "badness.max_history_kept: Arbiter2 kept the last 90 samples (900 s)",
        f"database.statusdb_url: its password is not written into the policy: create "
        f"{sync_password}, root's alone (mode 0600)",
        "colour.shade: not a setting of Arbiter2",
        "processes.proc_owner_whitelist: cgpolicy charges every process",
    ):
        assert text in out
    assert "processes.whitelist_other_processes:" not in out  # false: as cgpolicy does
    assert "processes.whitelist_other_processes = false" in out
    main = (tmp_path / "out" / "cgpolicy.toml").read_text()
    assert main.startswith("# Imported from an Arbiter2 configuration")
    assert "#   general.debug_mode: true" in main
    # debug_mode: judged, recorded and mailed to admins alone, no limit lowered.
    assert policy.penalty.mode == "watch"
    assert all(policy.watched(group) for group in policy.groups)
    assert policy.notify is not None
    notify = policy.notify
    assert (notify.host, notify.port, notify.sender) == (
        "mail.example.edu",
        25,
        "noreply@example.edu",
    )
    assert notify.user_address == "{user}@example.edu"
    assert notify.admins == ("hpc-admins@example.edu",)
    assert sync_settings(policy) == {
        **{"host": "db.example.edu", "port": 5432, "database": "arbiter", "user": "arbiter"},
        **{"group": "cluster-a", "password_file": str(sync_password), "tls": ()},
    }
    assert "secret" not in out  # the URL's password is in no file the import writes
    for path in (tmp_path / "out").rglob("*.toml"):
        assert "secret" not in path.read_text()
    assert cli.main(["--config-dir", str(tmp_path / "out"), "check"]) == 0


def test_a_password_file_yet_to_create_is_the_one_problem_left(
    tmp_path, capsys, sync_password
) -> None:
    sync_password.unlink()
    out = tmp_path / "out"
    assert cli.main(["import-arbiter2", str(SITE_A[0]), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert f"{out}: valid but for {sync_password}, yet to be created" in printed.out
    assert printed.err == ""
    # check itself refuses the policy until the file exists, naming it alone.
    assert cli.main(["--config-dir", str(out), "check"]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and f"sync.password_file: {sync_password}: cannot stat" in errors[0]
    sync_password.write_text("secret\n")
    sync_password.chmod(0o600)
    assert cli.main(["--config-dir", str(out), "check"]) == 0


def test_site_b_cascades_and_divides_by_threads_per_core(tmp_path, capsys) -> None:
    policy, out = run_import(tmp_path, SITE_B, 4, capsys)
    assert policy.general.interval == 10  # the node's file overrides
    assert policy.general.min_uid == 1  # root is never limited
    assert policy.groups["normal"].limits == {"CPUQuota": "25%", "MemoryMax": "8G"}
    assert policy.groups["power"].limits == {"CPUQuota": "250%", "MemoryMax": "64G"}
    assert policy.groups["power"].uids == ((2000, 2000), (2001, 2001))
    assert policy.whitelist == ()
    assert policy.penalty is not None
    factors = [(t.cpu_factor, t.memory_factor) for t in policy.penalty.tiers]
    assert factors == [(0.5, 0.9), (0.25, 1.0)]
    for text in (
        "divided by 4 threads per core",
        "processes.whitelist_file: '/etc/arbiter/%H-whitelist.txt' uses %H",
        "status.power.whitelist_file: cannot read",
        "status.penalty.penalty2.mem_quota: 1.5 raises the limit",
        "processes.memsw: true",
        "processes.whitelist_other_processes: true",
        "general.min_uid: 0 is outside",
        "email.admin_emails: left out what is not a plain mail address",
        "database.statusdb_sync_group: empty: every Arbiter2 on the database shared",
        "database.statusdb_url: its application_name not carried over",
    ):
        assert text in out
    assert policy.penalty.mode == "enforce"
    assert policy.notify is not None
    assert (policy.notify.host, policy.notify.port) == ("localhost", 2525)
    assert policy.notify.admins == ("hpc@example.org",)
    tls = (("sslmode", "verify-full"), ("sslrootcert", "/etc/arbiter/db-ca.pem"))
    assert sync_settings(policy) == {
        **{"host": "db.example.org", "port": 6432, "database": "arbiter", "user": "arbiter"},
        **{"group": "default", "password_file": "", "tls": tls},  # no password in the URL
    }
    # 259200 samples, 3 per 10 s refresh: 10 days of plots, longer than the default 7.
    assert policy.history.retention == 864000
    assert cli.main(["--config-dir", str(tmp_path / "out"), "check"]) == 0


@pytest.mark.parametrize(
    ("url", "group", "sync", "note"),
    [
        ("sqlite:////var/log/arbiter/statuses.db", "", None, "a local SQLite file"),
        ("", "login", None, "local SQLite file, so the group shared nothing"),
        ("mysql+pymysql://arb:pw@db/arbiter", "a", None, "a mysql database: cgpolicy's nodes"),
        ("postgresql://arb:pw@db/arbiter", "%H", None, "one group per host"),
        ("postgresql://arb@${DB_HOST}/arbiter", "a", None, "uses %H or ${...}"),
        ("postgresql://db/arbiter", "a", None, "gives no user: no [sync] written"),
        ("postgresql://arb@db:notaport/arbiter", "a", None, "not a database URL"),
        # A password from the environment is still a password: a file, not the URL's text.
        (
            "postgres://arb:${DB_PW}@[fd00::5]:5433/arb%2Ddb?host=/run/postgresql&sslpassword=k",
            "g",
            {"host": "/run/postgresql", "port": 5433, "database": "arb-db", "user": "arb"},
            "its sslpassword is not written into the policy",
        ),
    ],
)
def test_a_status_database_becomes_sync_only_where_it_was_shared_postgresql(
    tmp_path, url, group, sync, note
) -> None:
    config = arbiter2.read_configs(EXAMPLE)
    config["database"] = {"statusdb_url": url, "statusdb_sync_group": group}
    result = arbiter2.import_site(config, DATA.parent / "arbiter", 2, ["db"])
    assert any(note in str(n) for n in result.notes), [str(n) for n in result.notes]
    arbiter2.write_policy(result, tmp_path / "out")
    loaded = load_policy(tmp_path / "out").sync
    if sync is None:
        assert loaded is None
        return
    assert loaded is not None
    assert {k: getattr(loaded, k) for k in sync} == sync
    assert loaded.password_file == arbiter2.SYNC_PASSWORD_FILE and loaded.tls == ()
    assert "${DB_PW}" not in "".join(result.files.values())


def test_mail_is_left_out_with_a_reason_when_arbiters_cannot_be_carried_over() -> None:
    config = arbiter2.read_configs(EXAMPLE)
    for key, value, reason in (
        ("mail_server", "mail:smtp", "'mail:smtp' names no SMTP server"),
        (
            "from_email",
            "arbiter at example.org",
            "'arbiter at example.org' is not a plain mail address",
        ),
        ("email_domain", "", "'' makes no address of a user's name"),
    ):
        changed = {**config, "email": {**config["email"], key: value}}
        result = arbiter2.import_site(changed, DATA.parent / "arbiter", 2, ["mail"])
        assert "\n[notify]\n" not in result.files["cgpolicy.toml"]
        assert f"email.{key}: {reason}" in [str(n).split(": no [notify]")[0] for n in result.notes]
    changed = {**config, "email": {**config["email"], "from_email": "Arbiter <a@b.org>"}}
    result = arbiter2.import_site(changed, DATA.parent / "arbiter", 2, ["mail"])
    assert 'from = "a@b.org"' in result.files["cgpolicy.toml"]
    assert "email.from_email: 'Arbiter' left out: From is a@b.org" in map(str, result.notes)


def test_the_output_is_the_same_each_time_and_valid_toml() -> None:
    first, second = imported(SITE_A, 2), imported(SITE_A, 2)
    assert first.files == second.files
    for text in first.files.values():
        tomllib.loads(text)


def test_it_writes_only_into_a_new_or_empty_directory(tmp_path) -> None:
    result = imported(EXAMPLE, 2)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(SiteImportError, match="not an empty directory"):
        arbiter2.write_policy(result, tmp_path / "full")
    old = os.umask(0o002)  # a group-writable file would fail the policy's own check
    try:
        arbiter2.write_policy(result, tmp_path / "new")
    finally:
        os.umask(old)
    load_policy(tmp_path / "new")


def test_a_configuration_it_cannot_use_is_an_error(tmp_path, capsys) -> None:
    broken = tmp_path / "config.toml"
    broken.write_text('[status]\norder = ["a"]\nfallback_status = "missing"\n')
    assert cli.main(["import-arbiter2", str(broken), "--out", str(tmp_path / "o")]) == 1
    assert "names no [status.NAME] table" in capsys.readouterr().err
    broken.write_text("[status\n")
    assert cli.main(["import-arbiter2", str(broken), "--out", str(tmp_path / "o")]) == 1
    assert not (tmp_path / "o").exists()


def test_units() -> None:
    assert arbiter2.cpu_quota(800, 2) == ("400%", None)
    assert arbiter2.cpu_quota(100, 3) == ("33.33%", "33.3333% rounded to 33.33%")
    assert arbiter2.cpu_quota(1e5, 1) == ("100000%", None)
    assert arbiter2.cpu_quota(1e12, 1)[0] == "infinity"
    assert arbiter2.memory_size(4) == "4G"
    assert arbiter2.memory_size(1.5) == "1536M"
    assert arbiter2.memory_size(2048) == "2T"
    assert arbiter2.memory_size(1e-9) == 1  # 1.07 bytes: no unit divides it
    assert arbiter2.memory_size(1e-12) is None  # no limit is below a byte
    assert arbiter2.memory_size(1e300) == "infinity"


# --- the badness model ----------------------------------------------------------------
#
# Arbiter2's arithmetic (arbiter/badness.py, calc_delta_badness; CONFIG.md), in its own
# units: CPU in percent of one thread, memory in percent of the machine's RAM. Every
# arbiter_refresh seconds, for each resource with quota q, threshold t and usage u:
#
#     max_incr_per_interval = 100 / (time_to_max_bad * t) * arbiter_refresh
#     max_decr_per_interval = 100 / time_to_min_bad * arbiter_refresh
#     u = min(u, q)                          (cap_badness_incr, its default)
#     rel = u / q
#     change = rel * max_incr_per_interval   if rel >= t
#            = (1 - rel) * -max_decr_per_interval   otherwise
#     badness = min(100, max(0, badness + change))
#
# A sum of 100 or more is a violation; the penalty's quotas are then its fractions of
# the default status group's (relative_quotas).

MACHINE_GB = 64  # memory percentages need a machine; the ratio does not depend on it


def arbiter_step(badness: float, usage: float, quota: float, threshold: float, cfg) -> float:
    refresh = cfg["general"]["arbiter_refresh"]
    max_incr_per_interval = 100.0 / (cfg["badness"]["time_to_max_bad"] * threshold) * refresh
    max_decr_per_interval = 100.0 / cfg["badness"]["time_to_min_bad"] * refresh
    rel = min(usage, quota) / quota
    above = rel >= threshold
    change = rel * max_incr_per_interval if above else (1 - rel) * -max_decr_per_interval
    return min(100.0, max(0.0, badness + change))


def test_arbiters_formula_as_written_here() -> None:
    """The formula above, against numbers worked by hand for the example configuration."""
    cfg = tomllib.loads((DATA / "config.toml").read_text())
    # At the full quota: 1 * 100 / (600 * 0.45) * 30 = 100/9 a step.
    assert arbiter_step(0, 400, 400, 0.45, cfg) == pytest.approx(100 / 9)
    # At a quarter of it, below the threshold: 0.75 * 100 / 1800 * 30 = 1.25 down.
    assert arbiter_step(50, 100, 400, 0.45, cfg) == pytest.approx(48.75)
    assert arbiter_step(1, 0, 400, 0.45, cfg) == 0.0


# (CPU in percent of a thread, memory in GB) every 30 s: a user warming up, easing
# off, then running flat out until the violation.
SERIES = [(0, 0.5), (200, 1.0), (380, 2.5), (800, 3.0), (100, 1.0), (0, 0.2), (50, 2.2)]
SERIES += [(700, 4.5)] * 12


@pytest.mark.parametrize(
    ("configs", "tpc", "user_group", "violation_at"),
    [
        (EXAMPLE, 2, "normal", 9),
        (EXAMPLE, 2, "admin", 12),
        # Site B's 10 s steps towards a time_to_max_bad of 1200 s: bad, not yet 100.
        (SITE_B, 4, "normal", None),  # a quarter of a core: at its quota throughout
        (SITE_B, 4, "power", None),
    ],
    ids=["example-normal", "example-admin", "site-b-normal", "site-b-power"],
)
def test_the_imported_policy_scores_usage_as_arbiter_does(
    tmp_path, capsys, configs, tpc, user_group, violation_at
) -> None:
    cfg = arbiter2.read_configs(configs)
    policy, _ = run_import(tmp_path, configs, tpc, capsys)
    assert cfg["status"]["div_cpu_quotas_by_threads_per_core"]
    status = cfg["status"][user_group]
    cpu_quota = status["cpu_quota"] / tpc  # Arbiter2's statuses.quotas()
    mem_quota = status["mem_quota"] / MACHINE_GB * 100
    cpu_t, mem_t = cfg["badness"]["cpu_badness_threshold"], cfg["badness"]["mem_badness_threshold"]

    memory_total = MACHINE_GB * GIB
    quotas = group_quotas(policy.compile()["groups"][user_group], memory_total)
    assert policy.penalty is not None
    state, cpu_bad, mem_bad, now = UserScore(), 0.0, 0.0, 1_000_000.0
    violated_at = None
    for step, (cpu, gb) in enumerate(SERIES):
        cpu_bad = arbiter_step(cpu_bad, cpu, cpu_quota, cpu_t, cfg)
        mem_bad = arbiter_step(mem_bad, gb / MACHINE_GB * 100, mem_quota, mem_t, cfg)
        now += policy.general.interval
        state, change = evaluate(
            state, cpu / 100, quotas.cores, gb * GIB, quotas.memory_max, now,
            policy.general.interval, policy.badness, policy.penalty,
        )  # fmt: skip
        if cpu_bad + mem_bad >= 100:
            violated_at = step
            assert change is not None and change.kind == "penalized", step
            break
        assert change is None, step
        assert state.cpu_badness == pytest.approx(cpu_bad, abs=1e-9), step
        assert state.memory_badness == pytest.approx(mem_bad, abs=1e-9), step
    assert violated_at == violation_at
    if violated_at is None:
        assert 0 < state.score < 100
        return

    # The first penalty: Arbiter2's quotas are the tier's fractions of the status group's.
    assert state.tier == policy.penalty.tiers[0].name
    tier = policy.penalty.tiers[0]
    lowered = tier_limits(quotas, tier.cpu_factor, tier.memory_factor)
    penalty = cfg["status"]["penalty"][tier.name]
    assert lowered["CPUQuotaPerSecUSec"] == round(penalty["cpu_quota"] * cpu_quota * 10_000)
    assert lowered["MemoryMax"] == int(penalty["mem_quota"] * status["mem_quota"] * GIB)


LEAVES = [
    *leaves(arbiter2.read_configs(EXAMPLE)),
    *("status.admin.gids", "status.extra.uids", "status.penalty", "status.normal", "badness"),
]
ODD_VALUES = st.one_of(
    st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8),
    st.lists(st.one_of(st.integers(-5, 2**33), st.text(max_size=5), st.floats()), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(LEAVES), ODD_VALUES), min_size=1, max_size=4))
def test_any_configuration_gives_a_valid_policy_or_a_clear_error(changes) -> None:
    """Wrong types, inf and nan, odd names: never a crash, never an invalid policy."""
    config = arbiter2.read_configs(EXAMPLE)
    for key, value in changes:
        table = config
        *path, name = key.split(".")
        for part in path:
            table = table.setdefault(part, {}) if isinstance(table, dict) else {}
        if isinstance(table, dict):
            table[name] = value
    try:
        result = arbiter2.import_site(config, DATA.parent / "arbiter", 2, ["fuzzed"])
    except SiteImportError:
        return
    with tempfile.TemporaryDirectory() as directory:
        arbiter2.write_policy(result, Path(directory) / "out")
        load_policy(Path(directory) / "out")


def test_a_whitelist_file_name_with_a_nul_byte_is_a_note_not_a_crash() -> None:
    config = arbiter2.read_configs(EXAMPLE)
    config.setdefault("processes", {})["whitelist_file"] = "white\x00list.txt"
    result = arbiter2.import_site(config, DATA.parent / "arbiter", 2, ["nul"])
    with tempfile.TemporaryDirectory() as directory:
        arbiter2.write_policy(result, Path(directory) / "out")
        load_policy(Path(directory) / "out")


def test_without_threads_per_core_it_takes_this_machines_and_says_so(
    tmp_path, capsys, monkeypatch
) -> None:
    monkeypatch.setattr(arbiter2, "threads_per_core", lambda: 4)
    out = tmp_path / "out"
    assert cli.main(["import-arbiter2", str(EXAMPLE[0]), "--out", str(out)]) == 0
    assert load_policy(out).groups["normal"].limits["CPUQuota"] == "200%"  # 800 / 4
    assert "divided by 4 threads per core (this machine's; if the login nodes" in (
        capsys.readouterr().out
    )
