"""[notify] in the policy: SMTP settings, validated with located errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from policyfiles import MAIN, write_policy

from pam_cgpolicy.errors import PolicyError
from pam_cgpolicy.policy import Notify, Policy, load_policy

NOTIFY = """
[notify]
host = "smtp.example.org"
port = 587
starttls = true
user = "cgpolicy"
password_file = "{secret}"
from = "cgpolicy@login1.example.org"
user_address = "{{user}}@example.org"
admins = ["hpc@example.org"]
"""


def secret(tmp_path: Path, mode: int = 0o600) -> Path:
    path = tmp_path / "smtp-password"
    path.write_text("s3cret\n")
    path.chmod(mode)
    return path


def problems(tmp_path: Path, notify: str) -> list[str]:
    write_policy(tmp_path / "etc", MAIN + notify)
    with pytest.raises(PolicyError) as err:
        load_policy(tmp_path / "etc")
    return [str(p) for p in err.value.problems]


def test_a_valid_notify_table_loads_and_survives_the_saved_copy(tmp_path):
    path = secret(tmp_path)
    write_policy(tmp_path / "etc", MAIN + NOTIFY.format(secret=path))
    policy = load_policy(tmp_path / "etc")
    assert policy.notify == Notify(
        host="smtp.example.org",
        port=587,
        starttls=True,
        user="cgpolicy",
        password_file=str(path),
        sender="cgpolicy@login1.example.org",
        user_address="{user}@example.org",
        admins=("hpc@example.org",),
    )
    assert Policy.from_data(policy.to_data()) == policy
    assert "s3cret" not in repr(policy.compile())  # the password stays in its file


def test_no_notify_table_means_no_mail(tmp_path):
    write_policy(tmp_path / "etc", MAIN)
    assert load_policy(tmp_path / "etc").notify is None


def test_each_bad_setting_is_located(tmp_path):
    bad = (
        NOTIFY.format(secret=secret(tmp_path, 0o644))
        .replace("587", "70000")
        .replace('"cgpolicy@login1.example.org"', '"cgpolicy"')
        .replace('"{user}@example.org"', '"hpc@example.org"')
        .replace('["hpc@example.org"]', '["hpc@example.org", "ops"]')
        .replace("starttls = true", "starttls = true\ncolour = 1")
    )
    found = problems(tmp_path, bad)
    main = f"{tmp_path}/etc/cgpolicy.toml"
    line = len(MAIN.splitlines()) + 2  # [notify]'s own line, after a blank one
    assert f"{main}:{line + 2}: notify.port: must be from 1 to 65535, not 70000" in found
    assert any(p.startswith(f"{main}:{line + 4}: notify.colour: unknown key") for p in found)
    assert any(
        p.startswith(f"{main}:{line + 6}: notify.password_file: ") and "mode 0644" in p
        for p in found
    )
    assert any(
        p.startswith(f"{main}:{line + 7}: notify.from: must be a mail address") for p in found
    )
    assert any(
        p.startswith(f"{main}:{line + 8}: notify.user_address: must make an address") for p in found
    )
    assert f"{main}:{line + 9}: notify.admins: 'ops' is not a mail address" in found
    assert len(found) == 6


def test_host_is_needed_and_user_goes_with_a_password_file(tmp_path):
    found = problems(
        tmp_path,
        '\n[notify]\nuser = "x"\nfrom = "a@example.org"\nuser_address = "{user}@example.org"\n',
    )
    assert any("notify.host: must name the SMTP server" in p for p in found)
    assert any("notify.user: user and password_file go together" in p for p in found)
    assert len(found) == 2


def test_a_password_file_must_be_absolute_and_exist(tmp_path):
    base = '\n[notify]\nhost = "h"\nfrom = "a@example.org"\nuser_address = "{user}@example.org"\n'
    found = problems(tmp_path, base + 'user = "u"\npassword_file = "relative"\n')
    assert any("'relative' must be an absolute path" in p for p in found)
    found = problems(tmp_path, base + f'user = "u"\npassword_file = "{tmp_path}/none"\n')
    assert any("cannot stat" in p for p in found)
