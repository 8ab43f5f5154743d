"""TOML text for files people review: tables of keys, each with a comment, in order.

Deterministic (the same tables give the same text) and small: strings, whole and
decimal numbers, booleans and flat lists are all the policy files hold.
"""

from __future__ import annotations

import json
import re
from typing import Any

WIDTH = 88  # of a line, where the values allow
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")


class Table:
    """A table by its path (none: the top of the file) and its (key, value, comment)s."""

    def __init__(self, *path: str) -> None:
        self.path = path
        self.entries: list[tuple[str, Any, str]] = []

    def add(self, key: str, value: Any, comment: str) -> None:
        self.entries.append((key, value, comment))


def key(name: str) -> str:
    return name if _BARE_KEY_RE.fullmatch(name) else _string(name)


def _string(text: str) -> str:
    # JSON's escapes are TOML's (but for pairs of surrogates: other characters stay
    # as they are); DEL is the one control character JSON leaves raw and TOML refuses.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def value(item: Any) -> str:
    if isinstance(item, bool):
        return "true" if item else "false"
    if isinstance(item, int):
        return str(item)
    if isinstance(item, str):
        return _string(item)
    if isinstance(item, float):
        # 30.0 as 30, as a person writes it; beyond 2^53 a float is no exact count
        return str(int(item)) if item.is_integer() and abs(item) < 2**53 else repr(item)
    if isinstance(item, list):
        return "[" + ", ".join(value(v) for v in item) + "]"
    raise TypeError(f"no TOML form for {item!r}")


def comment(text: str) -> str:
    """``text`` on one line, whatever whitespace it holds; control characters escaped."""
    line = " ".join(text.split())
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)


def text(tables: list[Table]) -> str:
    blocks = []
    for table in tables:
        lines = [f"[{'.'.join(map(key, table.path))}]"] if table.path else []
        for name, item, note in table.entries:
            line = f"{key(name)} = {value(item)}  # {comment(note)}"
            if len(line) > WIDTH and isinstance(item, list):
                line = "\n".join([f"# {comment(note)}", f"{key(name)} = [", *_rows(item), "]"])
            lines.append(line)
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _rows(items: list[Any]) -> list[str]:
    """A long list's items, several a line, never one split across lines."""
    rows: list[str] = []
    row = "   "
    for item in items:
        word = f" {value(item)},"
        if len(row) + len(word) > WIDTH and row.strip():
            rows.append(row)
            row = "   "
        row += word
    return [*rows, row] if row.strip() else rows
