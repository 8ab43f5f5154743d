"""Random policy trees, valid and broken, from one ``random.Random``.

The fuzz test draws its Random from hypothesis, benchmarks/fuzz_policy.py runs
it for as many cases as asked, and the VM test sends the limits of the valid
groups it makes to a real slice. Values mix the well-formed, the edges systemd
draws its lines at, and junk.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from pam_cgpolicy.errors import PolicyError
from pam_cgpolicy.limits import LIMIT_KEYS
from pam_cgpolicy.policy import load_policy

EDGES: list[object] = [
    0, 1, -1, 2**63, 2**64 - 1, 2**64, 10000, 10001, "0", "1", "0%", "0.01%", "100%",
    "100.01%", "150%", "21474836.47%", "21474836.48%", "9" * 400 + "%", "9" * 5000,
    "²", "١٢", "idle", "infinity", "", " ", "0-3,6", "8191", "8192", "0-", "5-2",
    "1.5G", "16E", "18446744073709551615", "18446744073709551616", "0.5", True, 1.5,
    float("nan"), [], ["x"],
]  # fmt: skip
NAMES = ["admins", "students", "normal", "staff", "../cgpolicy", "a" * 300, "", "x y", "Ölgruppe"]


def limit_value(rng: random.Random, key: str) -> object:
    """One value for a [limits] key: mostly plausible, often an edge, sometimes junk."""
    roll = rng.random()
    if roll < 0.08:
        return rng.choice(EDGES)
    if roll < 0.1:
        return "".join(rng.choice("0123456789.%-,KMGTkB x") for _ in range(rng.randint(0, 8)))
    if key == "CPUQuota":
        return f"{rng.randint(1, 100000) / 100:g}%" if rng.random() < 0.9 else "infinity"
    if key in ("CPUWeight", "IOWeight"):
        return rng.randint(1, 10000) if rng.random() < 0.8 else str(rng.randint(1, 10000))
    if key.startswith("Memory"):
        kind = rng.randrange(3)
        if kind == 0:
            return f"{rng.randint(1, 100)}%"
        if kind == 1:
            return f"{rng.randint(1, 4096)}{rng.choice('KMGT')}"
        return rng.randint(1, 2**40)
    if key == "TasksMax":
        return rng.choice([rng.randint(1, 100000), f"{rng.randint(1, 100)}%", "infinity"])
    low = rng.randint(0, 63)
    return f"{low}-{rng.randint(low, 127)}" if rng.random() < 0.7 else str(low)


def toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if value != value else repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def limits(rng: random.Random) -> dict[str, object]:
    keys = rng.sample(LIMIT_KEYS, rng.randint(0, len(LIMIT_KEYS)))
    return {key: limit_value(rng, key) for key in keys}


def group_text(rng: random.Random) -> str:
    lines = []
    if rng.random() < 0.7:
        lines.append(f"users = {toml(rng.sample(['bob', 'carol', 'x'], rng.randint(1, 2)))}")
    if rng.random() < 0.3:
        lines.append(f"uids = {toml([rng.choice([2002, '3000-3999', 2**32, '9-1', -1, '²'])])}")
    if rng.random() < 0.2:
        lines.append(f"gids = {toml([rng.choice([3001, 2**40, -2, 'wheel'])])}")
    if rng.random() < 0.1:
        lines.append(f"exempt = {toml(rng.choice([True, False, 'yes']))}")
    if rng.random() < 0.05:
        lines.append(f"colour = {toml('blue')}")
    lines.append("[limits]")
    lines += [f"{key} = {toml(value)}" for key, value in limits(rng).items()]
    return "\n".join(lines) + "\n"


def main_text(rng: random.Random, names: list[str]) -> str:
    order = names if rng.random() < 0.8 else [*names, rng.choice(NAMES)]
    timeout = rng.choice([0.1, 60, 0.05, 61, 0, "2", float("nan")]) if rng.random() < 0.2 else 2.0
    min_uid = rng.choice([0, 2**32, 2**32 - 2]) if rng.random() < 0.2 else 1000
    fallback = names[-1] if rng.random() < 0.9 else rng.choice(NAMES)
    return (
        f"[general]\nmin_uid = {toml(min_uid)}\n"
        f"hook_timeout = {toml(timeout)}\n\n"
        f"[status]\norder = {toml(order)}\nfallback = {toml(fallback)}\n"
    )


def mutate(rng: random.Random, text: str) -> str:
    """A few random edits of characters: the typos and truncations admins make."""
    chars = list(text)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(chars) + 1)
        choice = rng.randrange(3)
        if choice == 0 and at < len(chars):
            del chars[at]
        elif choice == 1:
            chars.insert(at, rng.choice('[]="#.,\n\\{}0%-x²\x00'))
        else:
            chars[at:at] = chars[at : at + rng.randint(1, 8)]
    return "".join(chars)


def write_tree(rng: random.Random, root: Path) -> None:
    """A whole policy: the main file and 1-4 groups, each maybe mutated."""
    names = rng.sample(["admins", "students", "staff", "normal"], rng.randint(1, 4))
    files = {"cgpolicy.toml": main_text(rng, names)}
    files.update({f"groups.d/{name}.toml": group_text(rng) for name in names})
    (root / "groups.d").mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).write_text(mutate(rng, text) if rng.random() < 0.1 else text)


def outcome(root: Path) -> str:
    """ "valid" or "refused"; AssertionError when the loader breaks its promise.

    The promise: a PolicyError whose every problem names a file of the tree,
    and its line whenever it names a key (or the key's table) found in that file;
    or a policy that compiles.
    """
    try:
        policy = load_policy(root)
    except PolicyError as err:
        assert err.problems
        for problem in err.problems:
            assert problem.file.startswith(str(root)), str(problem)
            if problem.key is not None and problem.line is None:  # only if nowhere to point
                first = re.escape(problem.key.partition(".")[0])
                named = re.compile(rf'^\s*\[?\s*"?{first}"?\s*[\]=.]', re.MULTILINE)
                assert not named.search(Path(problem.file).read_text()), str(problem)
        return "refused"
    policy.compile()
    return "valid"
