"""Only root changes what root reads, and every valid policy is one systemd takes.

A user an ACL lets write groups.d/ swaps normal.toml for a symlink to the
exempt admins.toml: the swap is refused and, at that user's next real SSH
login, the hook applies the last good policy. Then the limits of a few hundred
generated valid groups go to a real user slice through the project's own
SetUnitProperties path, and systemd refuses none of them.
"""

from __future__ import annotations

import json
import random
import re
import shlex
from pathlib import Path

import pytest
from test_login_node import POLICY, keep_logged_in, login, root, slice_props, write_policy
from unit.policygen import limits as random_limits
from vmharness.install import installed_python

from pam_cgpolicy.errors import LimitError
from pam_cgpolicy.limits import LIMIT_KEYS, properties_for

# v2 only: nothing here differs on cgroup v1 (see conftest.py)
pytestmark = [pytest.mark.vm, pytest.mark.v2_only]

REPO = Path(__file__).resolve().parents[2]
USER, UID = "trudy", 2601
GROUPS_D = "/etc/cgpolicy/groups.d"
GENERATED_GROUPS = 300

APPLY = f"""
import json, sys
from pam_cgpolicy.errors import SystemdError
from pam_cgpolicy.setprops import set_slice_properties

refused = []
for number, props in enumerate(json.load(sys.stdin)):
    props = [(n, s, bytes(v) if s == "ay" else v) for n, s, v in props]
    try:
        set_slice_properties({UID}, props, 30)
    except SystemdError as err:
        refused.append([number, str(err)])
print(json.dumps(refused))
"""


@pytest.fixture(scope="module")
def trust_node(vm):
    from vmharness.install import install_cgpolicy

    install_cgpolicy(vm, REPO)
    root(vm, "systemctl stop cgpolicyd")  # the hook alone acts on this node's logins
    vm.add_user(USER, UID)
    root(vm, f"setfacl -b {GROUPS_D}; rm -f {GROUPS_D}/*.toml /var/lib/cgpolicy/policy.compiled")
    write_policy(vm, POLICY)
    root(vm, "cgpolicyctl check")
    keep_logged_in(vm, USER)
    return vm


def quota(vm) -> str:
    return slice_props(vm, UID, "CPUQuotaPerSecUSec")["CPUQuotaPerSecUSec"]


def test_symlink_swap_through_an_acl_is_refused_and_the_last_good_policy_stays(trust_node):
    vm = trust_node
    login(vm, USER)  # the good policy is compiled and saved
    assert quota(vm) == "1s"  # normal: CPUQuota 100%
    root(vm, f"setfacl -m u:{USER}:rwx {GROUPS_D}")
    try:
        login(vm, USER, f"ln -sfn admins.toml {GROUPS_D}/normal.toml")
        assert root(vm, f"readlink {GROUPS_D}/normal.toml").stdout.strip() == "admins.toml"

        check = root(vm, "cgpolicyctl check", check=False)
        assert check.returncode == 1
        assert f"{GROUPS_D}: owner/permissions: an ACL lets user {UID} write it" in check.stderr
        assert f"{GROUPS_D}/normal.toml: owner/permissions: is a symlink" in check.stderr

        # Lift the quota, so that only the next login can bring it back.
        root(vm, f"systemctl set-property --runtime user-{UID}.slice CPUQuota=")
        assert quota(vm) == "infinity"
        login(vm, USER)
        assert quota(vm) == "1s"  # the last good policy: trudy is still in normal
        journal = root(vm, "journalctl -o cat --no-pager -t cgpolicy-pam-hook -n 20").stdout
        refused = [line for line in journal.splitlines() if "using the last good policy" in line]
        assert refused and "owner/permissions: is a symlink" in refused[-1]
        applied = [line for line in journal.splitlines() if f"uid={UID}" in line][-1]
        assert re.search(r'group="?normal"?', applied) and "action=applied" in applied
    finally:
        root(vm, f"setfacl -b {GROUPS_D}; rm -f {GROUPS_D}/normal.toml")
        write_policy(vm, {"groups.d/normal.toml": POLICY["groups.d/normal.toml"]})
    root(vm, "cgpolicyctl check")


def bytes_as_list(value: object) -> object:
    return list(value) if isinstance(value, bytes) else value


# The edges of what the policy accepts: systemd must take each of them too.
EDGES = [
    {"CPUWeight": "idle", "IOWeight": 1, "CPUQuota": "0.01%", "TasksMax": 1},
    {"CPUWeight": 10000, "IOWeight": 10000, "CPUQuota": "21474836.47%", "AllowedCPUs": "8191"},
    {"MemoryMax": 1, "MemoryHigh": 1, "MemorySwapMax": 0, "TasksMax": 2**64 - 1},
    {"MemoryMax": "0.01%", "MemoryHigh": "0.01%", "MemorySwapMax": "0.01%", "TasksMax": "0.01%"},
    {"MemoryMax": "100%", "MemoryHigh": "16383P", "MemorySwapMax": 2**64 - 1, "TasksMax": "99.99%"},
]


def generated_groups(count: int) -> list[list[tuple[str, str, object]]]:
    """The properties of the edges and ``count`` random valid groups, as compiled."""
    rng = random.Random(6)
    groups: list[list[tuple[str, str, object]]] = []
    for limits in EDGES:
        groups.append(
            [
                (p.name, p.signature, bytes_as_list(p.value))
                for p in properties_for(limits, set(LIMIT_KEYS))
            ]
        )
    while len(groups) < count:
        try:
            props = properties_for(random_limits(rng), set(LIMIT_KEYS))
        except LimitError:
            continue
        groups.append([(p.name, p.signature, bytes_as_list(p.value)) for p in props])
    return groups


def test_systemd_takes_the_properties_of_every_valid_generated_group(trust_node):
    groups = generated_groups(GENERATED_GROUPS)
    assert {"CPUWeight", "MemoryMaxScale", "TasksMaxScale", "AllowedCPUs"} <= {
        name for props in groups for name, _, _ in props
    }
    # A control: one property systemd refuses, to show a refusal would be seen.
    groups.append([("MemoryMax", "t", 0)])
    result = trust_node.ssh(
        f"{installed_python(trust_node)} -I -c {shlex.quote(APPLY)}",
        input=json.dumps(groups),
        timeout=600,
    )
    refused = json.loads(result.stdout)
    assert [number for number, _ in refused] == [GENERATED_GROUPS], refused
    login(trust_node, USER)  # the node's own limits back on the slice
