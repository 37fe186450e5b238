"""Progress of long work: a bar with rate and time left on a terminal, one line per stage in a log.

Someone at a terminal wants to see that the canary test (or a feature extraction) moves and when
it will end: a tqdm bar. A log file (stderr redirected, CI, a systemd unit) wants neither carriage
returns nor a line per step, but one line per finished stage with the same facts: how far, how
long so far, about how long to go. Both go to stderr, so stdout keeps only the results.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

from tqdm import tqdm


class Progress:
    """`total` units of work (`unit`: rounds, images...) named `what`; `step` counts, `stage_done` reports."""

    def __init__(self, what: str, total: int, unit: str, stream: TextIO | None = None) -> None:
        self.what, self.total, self.unit = what, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.done, self.started = 0, time.monotonic()
        self.bar: tqdm | None = None
        if hasattr(self.stream, "isatty") and self.stream.isatty():
            self.bar = tqdm(total=total, desc=what, unit=unit, file=self.stream, dynamic_ncols=True)

    def step(self, units: int = 1) -> None:
        """`units` more units of work are done."""
        self.done += units
        if self.bar is not None:
            self.bar.update(units)

    def stage_done(self, stage: str) -> None:
        """A named stage finished: the bar shows it; a log gets one line with progress and time left."""
        if self.bar is not None:
            self.bar.set_postfix_str(f"{stage} done")
            return
        elapsed = time.monotonic() - self.started
        left = elapsed / self.done * (self.total - self.done) if 0 < self.done < self.total else None
        eta = "" if left is None else f", about {_duration(left)} left"
        print(
            f"{self.what}: {stage} done ({self.done}/{self.total} {self.unit}, {_duration(elapsed)}{eta})",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def _duration(seconds: float) -> str:
    """1.2s, 42s, 3m05s, 1h02m: short, and exact enough to plan by."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
