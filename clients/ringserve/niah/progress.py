"""A progress bar on stderr, without tqdm (the SDK depends on grpcio and protobuf only).

On a terminal it redraws one line; into a file or pipe it writes one line per step instead, so
logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

_WIDTH = 24


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """`total` steps labelled `label`; call `step(note)` after each, `close()` at the end."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None):
        self.total = total
        self.label = label
        self.done = 0
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._start = time.monotonic()
        if self._tty and total:
            self._draw("")

    def step(self, note: str = "") -> None:
        self.done += 1
        self._draw(note)

    def _draw(self, note: str) -> None:
        elapsed = time.monotonic() - self._start
        filled = _WIDTH * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (_WIDTH - filled)
        eta = ""
        if 0 < self.done < self.total:
            eta = f" eta {_duration(elapsed / self.done * (self.total - self.done))}"
        line = (f"{self.label} [{bar}] {self.done}/{self.total} "
                f"{_duration(elapsed)}{eta} {note}".rstrip())
        if self._tty:
            self._stream.write("\r\x1b[K" + line)
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def close(self) -> None:
        if self._tty and self.total:
            self._stream.write("\n")
            self._stream.flush()
