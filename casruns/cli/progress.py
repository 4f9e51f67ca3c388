"""Progress for long operations: shown on a terminal, silent with --json or when piped."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Progress:
    def __init__(self, label: str, *, enabled: bool | None = None) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._last = 0.0
        self._shown = False

    def __call__(self, *args) -> None:
        """``(done, total)`` or ``(phase, done, total)``."""
        if not self.enabled:
            return
        if len(args) == 3:
            phase, done, total = args
            if phase != getattr(self, "_phase", phase) and self._shown:
                sys.stderr.write("\n")
            self._phase = phase
            label = f"{self.label}: {phase}"
        else:
            done, total = args
            label = self.label
        now = time.monotonic()
        if now - self._last < 0.1 and (total is None or done < total):
            return  # at most ten redraws a second
        self._last = now
        sys.stderr.write(f"\r{label}: {done}" if total is None else f"\r{label}: {done}/{total}")  # None: not known
        sys.stderr.flush()
        self._shown = True

    def done(self) -> None:
        if self._shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


@contextmanager
def progress(label: str, as_json: bool) -> Iterator[Progress]:
    """A command's progress: shown on a terminal, never under ``--json``; its line is ended
    once the work in the ``with`` block returns."""
    p = Progress(label, enabled=False if as_json else None)
    yield p
    p.done()
