"""Tells a step of the wall clock (settimeofday, a VM's clock fixed, an NTP step) apart
from time passing.

Tier expiries are wall-clock times, so a clock set a day forward would end every
penalty at once, and one set back would stretch them by a day. Between two looks,
the wall clock and the boot-time clock (which counts a suspend too, and is never
set) advance alike but for slewing; what the wall clock gained beyond that is a
step, which the daemon shifts the recorded times by.
"""

from __future__ import annotations

import time

STEP_MIN = 1.0  # seconds: below this it is jitter, not a step
SLEW = 0.001  # NTP slews at most 500 ppm: twice that of the time between looks is no step


def boot_clock() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class ClockWatch:
    """The last look at both clocks, and how far the wall clock jumped since."""

    def __init__(self) -> None:
        self._last: tuple[float, float] | None = None

    def step(self, wall: float, boot: float) -> float:
        """Seconds the wall clock was set forward (negative: back) since the last look
        marked; 0.0 if it was not."""
        if self._last is None:
            return 0.0
        passed = boot - self._last[1]
        jumped = (wall - self._last[0]) - passed
        return jumped if abs(jumped) > STEP_MIN + SLEW * abs(passed) else 0.0

    def mark(self, wall: float, boot: float) -> None:
        """The step up to now is dealt with (not before: one not followed is seen again)."""
        self._last = (wall, boot)
