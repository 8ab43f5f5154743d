"""The small TOML writer: what it writes reads back as the same data."""

from __future__ import annotations

import tomllib

from hypothesis import given
from hypothesis import strategies as st

from pam_cgpolicy import tomlwrite
from pam_cgpolicy.tomlwrite import Table

SCALARS = st.one_of(
    st.text(), st.integers(-(2**63), 2**63 - 1), st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
)  # fmt: skip


@given(
    st.dictionaries(st.text(min_size=1), st.one_of(SCALARS, st.lists(SCALARS, max_size=30))),
    st.text(),
)
def test_what_it_writes_reads_back(data, note) -> None:
    top, table = Table(), Table("a table", "b.c")
    top.add("top", 1, note)
    for key, value in data.items():
        table.add(key, value, note)
    read = tomllib.loads(tomlwrite.text([top, table]))
    assert read == {"top": 1, "a table": {"b.c": data}}


def test_long_lists_go_over_lines_without_splitting_an_item() -> None:
    items = [f"program number {n}" for n in range(12)]
    table = Table("processes")
    table.add("whitelist", items, "from\nthere")
    written = tomlwrite.text([table])
    assert written.startswith('[processes]\n# from there\nwhitelist = [\n    "program number 0",')
    assert all(len(line) <= tomlwrite.WIDTH for line in written.splitlines())
    assert tomllib.loads(written) == {"processes": {"whitelist": items}}
