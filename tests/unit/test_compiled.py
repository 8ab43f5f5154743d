import pytest
from policyfiles import GROUPS, write_policy

from pam_cgpolicy.compiled import load_in_force


def test_valid_files_are_compiled_then_reused(tmp_path):
    root = write_policy(tmp_path / "etc")
    cache = str(tmp_path / "state" / "policy.compiled")
    first = load_in_force(str(root), cache)
    assert first.source == "files" and first.error is None
    assert first.policy["fallback"] == "normal"
    assert first.policy["groups"]["students"]["properties"][3] == (
        "CPUQuotaPerSecUSec",
        "t",
        1_000_000,
    )
    again = load_in_force(str(root), cache)
    assert again.source == "compiled"
    assert again.policy == first.policy


def test_broken_file_keeps_the_last_good_policy(tmp_path):
    root = write_policy(tmp_path / "etc")
    cache = str(tmp_path / "state" / "policy.compiled")
    good = load_in_force(str(root), cache).policy
    (root / "groups.d" / "students.toml").write_text(GROUPS["students"] + "oops = [\n")
    loaded = load_in_force(str(root), cache)
    assert loaded.source == "last good"
    assert loaded.policy == good
    assert "students.toml" in str(loaded.error)
    # and the cached copy was not replaced by anything from the broken files
    assert load_in_force(str(root), cache).policy == good


def test_an_edit_is_picked_up(tmp_path):
    root = write_policy(tmp_path / "etc")
    cache = str(tmp_path / "state" / "policy.compiled")
    load_in_force(str(root), cache)
    (root / "groups.d" / "normal.toml").write_text('[limits]\nCPUQuota = "300%"\n')
    loaded = load_in_force(str(root), cache)
    assert loaded.source == "files"
    assert loaded.policy["groups"]["normal"]["limits"] == {"CPUQuota": "300%"}


def test_no_policy_at_all(tmp_path):
    loaded = load_in_force(str(tmp_path / "missing"), str(tmp_path / "state"))
    assert loaded.policy is None and loaded.source == "none" and loaded.error


def test_corrupt_cache_is_ignored(tmp_path):
    root = write_policy(tmp_path / "etc")
    cache = tmp_path / "policy.compiled"
    cache.write_bytes(b"\x00garbage")
    assert load_in_force(str(root), str(cache)).source == "files"


def test_penalties_copy_for_the_hook(tmp_path):
    from pam_cgpolicy.compiled import read_penalty, save_penalties

    path = str(tmp_path / "penalties.compiled")
    assert read_penalty(path, 2002, now=100.0) is None  # no daemon yet
    props = (("CPUQuotaPerSecUSec", "t", 250_000),)
    save_penalties(path, {2002: (200.0, props)})
    assert read_penalty(path, 2002, now=100.0) == props
    assert read_penalty(path, 2002, now=200.0) is None  # expired: the group's limits apply
    assert read_penalty(path, 2003, now=100.0) is None
    (tmp_path / "penalties.compiled").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a penalties copy"):
        read_penalty(path, 2002, now=100.0)  # the hook says no penalty is known
