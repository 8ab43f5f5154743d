import os

import pytest
from policyfiles import DAEMON_SECTIONS, GROUPS, MAIN, write_policy

from pam_cgpolicy.errors import PolicyError
from pam_cgpolicy.policy import DEFAULT_TEXTFILE_DIR, MetricsSettings, Policy, load_policy


def problems(tmp_path, **kwargs):
    root = write_policy(tmp_path, **kwargs)
    with pytest.raises(PolicyError) as caught:
        load_policy(root)
    return [str(p) for p in caught.value.problems]


def test_valid_policy_loads(tmp_path):
    policy = load_policy(write_policy(tmp_path))
    assert policy.order == ("admins", "students", "normal")
    assert policy.general.hook_timeout == 1.5
    students = policy.groups["students"]
    assert students.uids == ((2002, 2002), (3000, 3999))
    assert students.limits == {
        "CPUQuota": "100%",
        "MemoryMax": "2G",
        "MemoryHigh": "1800M",
        "TasksMax": 512,
    }
    assert policy.groups["admins"].exempt
    assert policy.managed_keys() == {"CPUQuota", "MemoryMax", "MemoryHigh", "TasksMax"}


def test_shipped_default_policy_is_valid():
    root = os.path.join(os.path.dirname(__file__), "..", "..", "etc", "cgpolicy")
    policy = load_policy(__import__("pathlib").Path(root))
    assert policy.fallback in policy.order


def test_bad_limit_names_file_line_and_key(tmp_path):
    groups = dict(GROUPS, students=GROUPS["students"].replace('"100%"', '"lots"'))
    (found,) = problems(tmp_path, groups=groups)
    assert found.startswith(f"{tmp_path}/groups.d/students.toml:8: limits.CPUQuota: ")
    assert "invalid CPU quota 'lots'" in found


def test_every_error_is_listed_not_just_the_first(tmp_path):
    groups = dict(GROUPS, normal='colour = "blue"\nexempt = "yes"\n[limits]\nMemoryMax = "2g"\n')
    found = problems(tmp_path, groups=groups)
    assert any(":1: colour: unknown key" in p for p in found)
    assert any(":2: exempt: must be true or false, not str 'yes'" in p for p in found)
    assert any(":4: limits.MemoryMax: invalid size '2g'" in p for p in found)


def test_unknown_key_in_main_file(tmp_path):
    (found,) = problems(tmp_path, main=MAIN.replace("min_uid", "minuid"))
    assert found.startswith(f"{tmp_path}/cgpolicy.toml:2: general.minuid: unknown key")


def test_toml_syntax_error_gives_the_line(tmp_path):
    (found,) = problems(tmp_path, main=MAIN + "oops =\n")
    assert found.startswith(f"{tmp_path}/cgpolicy.toml:8: not valid TOML")


def test_group_in_order_without_a_file(tmp_path):
    groups = {k: v for k, v in GROUPS.items() if k != "students"}
    (found,) = problems(tmp_path, groups=groups)
    assert "cgpolicy.toml:6: status.order: group 'students' has no file" in found


def test_file_not_in_order(tmp_path):
    groups = dict(GROUPS, staff='users = ["x"]\n')
    (found,) = problems(tmp_path, groups=groups)
    assert found.startswith(f"{tmp_path}/groups.d/staff.toml: group 'staff' is not in status.order")


def test_group_that_matches_nobody(tmp_path):
    groups = dict(GROUPS, admins="exempt = true\n")
    (found,) = problems(tmp_path, groups=groups)
    assert "admins.toml: matches nobody" in found


def test_fallback_may_match_nobody_but_needs_a_file(tmp_path):
    load_policy(write_policy(tmp_path))  # normal has no rules: fine, it is the fallback
    found = problems(
        tmp_path / "x", main=MAIN.replace('fallback = "normal"', 'fallback = "guests"')
    )
    assert any("cgpolicy.toml:7: status.fallback: group 'guests' has no file" in p for p in found)
    assert any("normal.toml: matches nobody" in p for p in found)  # no longer the fallback


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('uids = ["4000-3000"]', "neither a uid nor an inclusive range"),
        ("uids = [-1]", "neither a uid nor an inclusive range"),
        ('gids = ["wheel"]', "is not a gid"),
        ('users = "bob"', "must be a list"),
        ('users = [""]', "must be a list of names"),
    ],
)
def test_bad_match_rules(tmp_path, text, message):
    groups = dict(GROUPS, admins=f"{text}\n")
    found = problems(tmp_path, groups=groups)
    assert any(message in p and "admins.toml:1:" in p for p in found), found


def test_memory_high_above_max(tmp_path):
    groups = dict(GROUPS, normal='[limits]\nMemoryMax = "1G"\nMemoryHigh = "2G"\n')
    (found,) = problems(tmp_path, groups=groups)
    assert "normal.toml:3: limits.MemoryHigh: MemoryHigh '2G' is above MemoryMax '1G'" in found


def test_general_ranges(tmp_path):
    found = problems(tmp_path, main=MAIN.replace("1000", "0").replace("1.5", "61"))
    assert any("general.min_uid: must be from 1 to 4294967294" in p for p in found)
    assert any("general.hook_timeout: must be from 0.1 to 60, not 61" in p for p in found)


def test_world_writable_file_is_unsafe(tmp_path):
    root = write_policy(tmp_path)
    (root / "groups.d" / "students.toml").chmod(0o666)
    with pytest.raises(PolicyError, match=r"students.toml: owner/permissions: writable by"):
        load_policy(root)


def test_file_owned_by_another_user_is_unsafe(tmp_path):
    root = write_policy(tmp_path)
    with pytest.raises(PolicyError, match="must be owned by root"):
        load_policy(root, trusted_uids={os.geteuid() + 1})


def test_daemon_sections(tmp_path):
    groups = dict(
        GROUPS, students=GROUPS["students"].replace("[limits]", 'whitelist = ["matlab"]\n[limits]')
    )
    main = (
        MAIN.replace(
            "hook_timeout = 1.5", 'hook_timeout = 1.5\ninterval = 5\nadmin_group = "hpcadmin"'
        )
        + DAEMON_SECTIONS
    )
    policy = load_policy(write_policy(tmp_path, main=main, groups=groups))
    assert policy.general.interval == 5.0 and policy.general.admin_group == "hpcadmin"
    assert policy.badness.time_to_max_bad == 300
    assert policy.whitelist == ("sshd", "scp", "sftp-server", "rsync")
    assert policy.groups["students"].whitelist == ("matlab",)
    assert policy.penalty is not None
    assert policy.penalty.order == ("penalty1", "penalty2")
    assert policy.penalty.tiers[0].message == "new"
    assert policy.penalty.tiers[1].cpu_factor == 0.5


def test_no_penalty_table_means_no_penalties(tmp_path):
    policy = load_policy(write_policy(tmp_path))
    assert policy.penalty is None
    assert policy.badness.cpu_threshold == 0.8  # the published defaults


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ("cpu_threshold = 0.8", "cpu_threshold = 1.5"),
            "badness.cpu_threshold: must be a fraction",
        ),
        (("time_to_max_bad = 300", 'time_to_max_bad = "5m"'), "badness.time_to_max_bad: must be"),
        (
            ('order = ["penalty1", "penalty2"]', 'order = ["penalty1", "penalty3"]'),
            "tier 'penalty3' is in penalty.order but has no [penalty.penalty3] table",
        ),
        (("cpu_factor = 0.5", "cpu_factor = 0"), "penalty.penalty2.cpu_factor: must be a fraction"),
        (('message = "new"', 'mesage = "new"'), "penalty.penalty1.mesage: unknown key"),
        (("interval = 5", "interval = 0"), "general.interval: must be from 1 to 3600"),
    ],
)
def test_daemon_section_errors(tmp_path, edit, message):
    main = MAIN.replace("hook_timeout = 1.5", "hook_timeout = 1.5\ninterval = 5") + DAEMON_SECTIONS
    found = problems(tmp_path, main=main.replace(*edit))
    assert any(message in p for p in found), found
    assert all(":" in p.split(" ")[0] for p in found)  # every problem names file and line


@pytest.mark.parametrize(
    ("file", "text", "where", "message"),
    [
        # Each of these raised OverflowError, ValueError, OSError or KeyError before.
        (
            "normal",
            f'[limits]\nCPUQuota = "{"9" * 400}%"\n',
            "normal.toml:2: limits.CPUQuota",
            "invalid CPU quota",
        ),
        (
            "normal",
            '[limits]\nCPUWeight = "²"\n',
            "normal.toml:2: limits.CPUWeight",
            "invalid weight",
        ),
        (
            "normal",
            f'[limits]\nMemoryMax = "{"9" * 400}"\n',
            "normal.toml:2: limits.MemoryMax",
            "invalid size",
        ),
        (
            "normal",
            f'[limits]\nTasksMax = "{"9" * 5000}"\n',
            "normal.toml:2: limits.TasksMax",
            "invalid task limit",
        ),
        (
            "main",
            'fallback = "normal"',
            "cgpolicy.toml:7: status.fallback",
            "is not a group's name",
        ),
        (
            "main",
            'order = ["admins", "students", "normal"]',
            "cgpolicy.toml:6: status.order",
            "'../cgpolicy' is not a group's name",
        ),
        # Values systemd refuses in SetUnitProperties, which would unlimit the whole group.
        (
            "normal",
            "[limits]\nMemoryMax = 0\n",
            "normal.toml:2: limits.MemoryMax",
            "use from 1 bytes",
        ),
        (
            "normal",
            '[limits]\nMemoryHigh = "0"\n',
            "normal.toml:2: limits.MemoryHigh",
            "use from 1 bytes",
        ),
        ("normal", f"[limits]\nMemoryMax = {2**64}\n", "normal.toml:2: limits.MemoryMax", "to 16E"),
        (
            "normal",
            '[limits]\nMemorySwapMax = "0%"\n',
            "normal.toml:2: limits.MemorySwapMax",
            "more than 0%",
        ),
        (
            "normal",
            '[limits]\nCPUQuota = "0%"\n',
            "normal.toml:2: limits.CPUQuota",
            "invalid CPU quota",
        ),
        (
            "normal",
            '[limits]\nCPUQuota = "21474836.48%"\n',
            "normal.toml:2: limits.CPUQuota",
            "invalid CPU quota",
        ),
        (
            "normal",
            "[limits]\nTasksMax = 0\n",
            "normal.toml:2: limits.TasksMax",
            "invalid task limit",
        ),
        (
            "normal",
            f"[limits]\nTasksMax = {2**64}\n",
            "normal.toml:2: limits.TasksMax",
            "invalid task limit",
        ),
        (
            "normal",
            "[limits]\nIOWeight = 10001\n",
            "normal.toml:2: limits.IOWeight",
            "from 1 to 10000",
        ),
        (
            "normal",
            "[limits]\nCPUWeight = 0\n",
            "normal.toml:2: limits.CPUWeight",
            "from 1 to 10000",
        ),
        (
            "normal",
            '[limits]\nAllowedCPUs = "0-8192"\n',
            "normal.toml:2: limits.AllowedCPUs",
            "invalid CPU range",
        ),
        (
            "normal",
            '[limits]\nAllowedCPUs = "\u0661-\u0663"\n',
            "normal.toml:2: limits.AllowedCPUs",
            "invalid CPU list",
        ),
        ("normal", f"uids = [{2**32}]\n", "normal.toml:1: uids", "neither a uid"),
        ("normal", 'uids = ["1-99999999999"]\n', "normal.toml:1: uids", "neither a uid"),
        (
            "main",
            "hook_timeout = 1.5",
            "cgpolicy.toml:3: general.hook_timeout",
            "must be from 0.1 to 60",
        ),
    ],
)
def test_every_bad_value_is_a_located_policy_error(tmp_path, file, text, where, message):
    groups, main = dict(GROUPS), MAIN
    if file == "main":
        bad = {
            'fallback = "normal"': f'fallback = "{"n" * 300}"',
            'order = ["admins", "students", "normal"]': (
                'order = ["admins", "students", "normal", "../cgpolicy"]'
            ),
            "hook_timeout = 1.5": "hook_timeout = 0.05",
        }
        main = MAIN.replace(text, bad[text])
    else:
        groups[file] = text
    found = problems(tmp_path, main=main, groups=groups)
    assert any(f"{where}: " in p and message in p for p in found), found


def test_metrics_go_to_the_node_exporters_directory_unless_told(tmp_path):
    assert load_policy(write_policy(tmp_path / "a")).metrics.textfile_dir == DEFAULT_TEXTFILE_DIR
    for value in ("", "/srv/metrics"):
        main = MAIN + f'\n[metrics]\ntextfile_dir = "{value}"\n'
        policy = load_policy(write_policy(tmp_path / (value or "none"), main=main))
        assert policy.metrics == MetricsSettings(value)


@pytest.mark.parametrize("value", ["metrics", "/srv/../etc", "/srv/metrics/", "/", "//srv", 5])
def test_metrics_directory_must_be_a_plain_absolute_path(tmp_path, value):
    text = f'"{value}"' if isinstance(value, str) else str(value)
    found = problems(tmp_path, main=MAIN + f"\n[metrics]\ntextfile_dir = {text}\n")
    assert any("cgpolicy.toml:" in p and "metrics.textfile_dir: " in p for p in found), found


def test_a_copy_saved_before_metrics_existed_still_loads(tmp_path):
    data = load_policy(write_policy(tmp_path)).to_data()
    del data["metrics"]
    assert Policy.from_data(data).metrics == MetricsSettings()
