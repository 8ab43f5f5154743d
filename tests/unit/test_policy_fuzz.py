"""Validation is total: random and mutated policy trees end in PolicyError or a valid policy.

benchmarks/fuzz_policy.py runs the same cases by the hundred thousand; the VM
test in tests/integration/test_policy_trust.py sends valid groups' properties
to a real systemd.
"""

import random
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from policygen import outcome, write_tree

from pam_cgpolicy import limits
from pam_cgpolicy.errors import LimitError
from pam_cgpolicy.slicelimits import UINT32_MAX, UINT64_MAX


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.randoms(use_true_random=False))
def test_every_policy_tree_is_valid_or_a_located_policy_error(rng: random.Random) -> None:
    root = Path(tempfile.mkdtemp())
    try:
        write_tree(rng, root)
        assert outcome(root) in ("valid", "refused")
    finally:
        shutil.rmtree(root)


@settings(max_examples=2000, deadline=None)
@given(st.sampled_from(limits.LIMIT_KEYS), st.text(max_size=30) | st.integers() | st.floats())
def test_every_limit_value_converts_or_is_a_limit_error(key: str, value: object) -> None:
    try:
        props = limits.convert(key, value)
    except LimitError:
        return
    for prop in props:  # what systemd takes: a uint64 or uint32 it does not refuse
        if prop.signature == "t":
            assert isinstance(prop.value, int) and 0 <= prop.value <= UINT64_MAX
        elif prop.signature == "u":
            assert isinstance(prop.value, int) and 0 < prop.value <= UINT32_MAX
