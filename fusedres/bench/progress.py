"""A dependency-free progress bar on stderr."""

from __future__ import annotations

import sys
import time


class Progress:
    """`Progress(total)`; `.advance(label)` after each unit of work; `.close()` at the end."""

    def __init__(self, total: int, enabled: bool = True, width: int = 30) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.enabled = enabled
        self.width = width
        self.start = time.perf_counter()
        self._tty = sys.stderr.isatty()
        self._last_line = 0.0

    def advance(self, label: str = "", units: int = 1) -> None:
        self.done = min(self.done + units, self.total)
        if not self.enabled:
            return
        now = time.perf_counter()
        # Off a terminal (CI logs, files) print a line at most every 5 s, not a carriage-return storm.
        if not self._tty and now - self._last_line < 5 and self.done < self.total:
            return
        self._last_line = now
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        line = f"[{bar}] {self.done}/{self.total} {now - self.start:6.0f}s {label[:60]}"
        sys.stderr.write(("\r" + line.ljust(120)) if self._tty else line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self._tty:
            sys.stderr.write("\n")
            sys.stderr.flush()
