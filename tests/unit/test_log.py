"""Log fields: nothing a user names or says can forge a field or a line."""

import pytest

from pam_cgpolicy import log
from pam_cgpolicy.accounts import Account
from pam_cgpolicy.classify import Decision
from pam_cgpolicy.slicelimits import SliceLimits


def parse(line: str) -> list[tuple[str, str]]:
    """A reader of the lines: key=bare or key="escaped", separated by single spaces."""
    pairs, i = [], 0
    while i < len(line):
        key_end = line.index("=", i)
        key, i = line[i:key_end], key_end + 1
        if line[i] == '"':
            i += 1
            value = []
            while line[i] != '"':
                if line[i] == "\\":
                    i += 1
                value.append(line[i])
                i += 1
            i += 1
            pairs.append((key, "".join(value)))
        else:
            end = line.find(" ", i)
            end = len(line) if end == -1 else end
            pairs.append((key, line[i:end]))
            i = end
        if i < len(line):
            assert line[i] == " "
            i += 1
    return pairs


FORGERIES = [
    "bob action=exempt",
    'bob" action="exempt',
    "bob\ncgpolicy-pam-hook[1]: user=alice action=applied",
    "bob\r\x1b[2K user=root",
    "a\\",
    'x\\" action=exempt',
    "",
    "bob\u2028user=root",
]


@pytest.mark.parametrize("name", FORGERIES)
def test_a_forged_value_stays_one_field_on_one_line(name: str) -> None:
    line = log.fields(user=name, action="applied")
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\u2028" not in line
    keys = [key for key, _ in parse(line)]
    assert keys == ["user", "action"]
    assert parse(line)[1] == ("action", "applied")


def test_plain_values_stay_bare_and_none_is_left_out() -> None:
    assert log.fields(user="bob", uid=2002, rule="groups: students", reason=None) == (
        'user=bob uid=2002 rule="groups: students"'
    )
    assert log.quote('say "hi"\n') == '"say \\"hi\\"\\n"'


def test_the_login_line_quotes_a_hostile_user_name() -> None:
    account = Account("eve\nuser=root action=exempt", 3000, frozenset({3000}), frozenset())
    line = SliceLimits(Decision(account, "skipped", 'reason" action="exempt'), ()).log_line()
    assert "\n" not in line
    assert [key for key, _ in parse(line)] == ["user", "uid", "action", "reason"]
    assert dict(parse(line))["action"] == "skipped"
