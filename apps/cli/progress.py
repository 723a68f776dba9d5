"""Progress lines for long CLI operations: elapsed time on each step, a spinner on a
terminal, plain lines otherwise (CI logs stay readable)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

_SPIN = "|/-\\"


class Progress:
    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.start = time.monotonic()
        self.tty = self.stream.isatty()
        self._spin = 0
        self._pending = False

    def _elapsed(self) -> str:
        return f"[{time.monotonic() - self.start:6.1f}s]"

    def _line(self, text: str) -> None:
        if self._pending:
            self.stream.write("\r\033[K")
            self._pending = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def step(self, text: str) -> None:
        self._line(f"{self._elapsed()} {text}")

    def tick(self) -> None:
        if not self.tty:
            return
        self._spin = (self._spin + 1) % len(_SPIN)
        self.stream.write(f"\r{self._elapsed()} {_SPIN[self._spin]}")
        self.stream.flush()
        self._pending = True

    def done(self, text: str) -> None:
        self._line(f"{self._elapsed()} ok: {text}")

    def fail(self, text: str) -> None:
        self._line(f"{self._elapsed()} FAILED: {text}")
