"""ListUsers' typed rows: the contract's signature, and GetUser's keys there and back."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from fakeservices import USERS

from pam_cgpolicy import userrows

CONTRACT = Path(userrows.__file__).with_name("org.cgpolicy1.Manager.xml")

# GetUser's every key: one in penalty1 whose MemoryMax still steps down, frozen.
PENALIZED: dict[str, Any] = {
    **USERS["nobody"],
    "memory_max_in_force": 1_500_000_000,
    "memory_max_target": 512 * 1024**2,
    "frozen": True,
}


def test_the_fixture_has_a_value_for_every_field():
    assert PENALIZED.keys() == userrows.KEYS


def test_the_contract_types_list_users_with_the_rows_fields():
    methods = ET.parse(CONTRACT).getroot().iter("method")
    (method,) = [m for m in methods if m.get("name") == "ListUsers"]
    (arg,) = method.iter("arg")
    assert arg.get("type") == "a" + userrows.SIGNATURE


@pytest.mark.parametrize(
    "info",
    [
        PENALIZED,
        {**PENALIZED, "frozen": False},
        {"user": "bob", "uid": 1001, "group": "normal"},  # no standing stored, no slice loaded
        {"user": "carol", "uid": 1002, "occurrences": 0, "cpu_badness": 0.0, "memory_badness": 0.0},
    ],
)
def test_a_row_reads_back_as_the_dictionary_it_was_made_from(info):
    assert userrows.info(userrows.row(info)) == info


def test_keys_without_a_value_travel_as_empty_fields():
    assert userrows.row({"user": "bob", "uid": 1001, "group": None}) == [
        "bob", 1001, "", "", -1.0, -1, -1.0, -1.0, -1, -1, {}, False,
    ]  # fmt: skip


def test_a_key_the_row_has_no_field_for_is_refused_not_dropped():
    with pytest.raises(TypeError, match="no ListUsers field for cpu_seconds"):
        userrows.row({**PENALIZED, "cpu_seconds": 3.0})


def test_times_and_badness_are_sent_as_doubles_even_when_whole():
    fields = userrows.row({**PENALIZED, "tier_expiry": 1_800_000_000, "cpu_badness": 0})
    assert isinstance(fields[4], float) and isinstance(fields[6], float)
