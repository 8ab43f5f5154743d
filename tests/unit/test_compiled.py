import os
from unittest import mock

import pytest
from policyfiles import GROUPS, write_policy

from pam_cgpolicy import cli
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
    from pam_cgpolicy.slicelimits import Standing

    path = str(tmp_path / "penalties.compiled")
    assert read_penalty(path, 2002, now=100.0) is None  # no daemon yet
    save_penalties(path, {2002: (200.0, "penalty1", 3 * 1024**3)})
    assert read_penalty(path, 2002, now=100.0) == Standing("penalty1", 3 * 1024**3)
    assert read_penalty(path, 2002, now=200.0) is None  # expired: the group's limits apply
    assert read_penalty(path, 2003, now=100.0) is None
    (tmp_path / "penalties.compiled").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a penalties copy"):
        read_penalty(path, 2002, now=100.0)  # the hook says no penalty is known


def test_same_size_edit_with_the_old_mtime_is_noticed(tmp_path):
    root = write_policy(tmp_path / "etc")
    cache = str(tmp_path / "state" / "policy.compiled")
    load_in_force(str(root), cache)
    normal = root / "groups.d" / "normal.toml"
    before = normal.stat()
    normal.write_text(normal.read_text().replace('"200%"', '"300%"'))  # same size
    os.utime(normal, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert normal.stat().st_size == before.st_size
    assert normal.stat().st_mtime_ns == before.st_mtime_ns
    loaded = load_in_force(str(root), cache)
    assert loaded.source == "files"
    assert loaded.policy["groups"]["normal"]["limits"]["CPUQuota"] == "300%"


def test_a_draft_directory_never_replaces_the_nodes_last_good_copy(tmp_path, capsys):
    """cgpolicyctl --config-dir DRAFT reads the draft, but saves nothing of it."""
    node = write_policy(tmp_path / "etc")
    draft = write_policy(tmp_path / "draft", groups=dict(GROUPS, normal="exempt = true\n"))
    cache = tmp_path / "state" / "policy.compiled"
    good = load_in_force(str(node), str(cache)).policy
    saved = cache.read_bytes()
    with (
        mock.patch.object(cli, "DEFAULT_CONFIG_DIR", str(node)),
        mock.patch.object(cli, "compiled_policy_file", lambda: str(cache)),
    ):
        assert cli.main(["--config-dir", str(draft), "apply", "root"]) == 0
        assert cache.read_bytes() == saved
        (node / "groups.d" / "normal.toml").write_text("oops = [\n")
        # the node's own directory, broken: its own last good copy
        assert cli.main(["--config-dir", str(node), "apply", "root"]) == 0
    assert "using the last good policy" in capsys.readouterr().err
    assert load_in_force(str(node), str(cache)).policy == good


def test_any_exception_while_loading_is_an_invalid_policy(tmp_path):
    root = write_policy(tmp_path / "etc")
    cache = str(tmp_path / "state" / "policy.compiled")
    good = load_in_force(str(root), cache).policy
    (root / "groups.d" / "normal.toml").write_text('[limits]\nCPUQuota = "100%"\n')
    with mock.patch("pam_cgpolicy.policy.Policy.compile", side_effect=RuntimeError("a bug")):
        loaded = load_in_force(str(root), cache)
    assert loaded.source == "last good" and loaded.policy == good
    assert loaded.error is not None
    assert [str(p) for p in loaded.error.problems] == [
        f"{root}/cgpolicy.toml: cannot be loaded: RuntimeError: a bug"
    ]
