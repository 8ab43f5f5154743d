"""Progress lines on stderr, so a CI log shows which slow step is running."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


def say(message: str) -> None:
    print(f"vmharness: {message}", file=sys.stderr, flush=True)


@contextmanager
def step(what: str) -> Iterator[None]:
    say(f"{what} ...")
    started = time.monotonic()
    try:
        yield
    except BaseException:
        say(f"{what} FAILED after {time.monotonic() - started:.1f}s")
        raise
    say(f"{what} done in {time.monotonic() - started:.1f}s")
