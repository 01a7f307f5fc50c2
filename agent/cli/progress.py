"""Progress of long work: a bar on a terminal (bytes, rate, ETA), plain lines when piped."""

from __future__ import annotations

import sys
import time
from typing import TextIO

PLAIN_EVERY = 10.0


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_seconds(s: float) -> str:
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class ProgressBar:
    """Call :meth:`update` with (done, total); :meth:`close` at the end."""

    def __init__(self, label: str, stream: TextIO | None = None, width: int = 28) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.width = width
        self._start = time.monotonic()
        self._first_done: int | None = None
        self._last_plain = 0.0
        self._drawn = False
        self._state = ""

    def update(self, done: int, total: int, state: str = "") -> None:
        now = time.monotonic()
        if self._first_done is None:
            self._first_done = done
        elapsed = max(now - self._start, 1e-6)
        rate = max(done - self._first_done, 0) / elapsed
        eta = (total - done) / rate if rate > 0 and total > done else 0.0
        if self.tty:
            frac = min(done / total, 1.0) if total else 0.0
            fill = int(frac * self.width)
            bar = "#" * fill + "-" * (self.width - fill)
            line = (f"\r{self.label[:32]:32} [{bar}] {frac * 100:5.1f}% "
                    f"{human_bytes(done)}/{human_bytes(total)} {human_bytes(rate)}/s "
                    f"ETA {human_seconds(eta)} {state}")
            self.stream.write(line[:160].ljust(120))
            self.stream.flush()
            self._drawn = True
        elif total and (now - self._last_plain >= PLAIN_EVERY or state != self._state):
            self._last_plain = now
            self._state = state
            pct = f"{done * 100 / total:.0f}%" if total else "?"
            self.stream.write(f"{self.label}: {state} {human_bytes(done)} of "
                              f"{human_bytes(total)} ({pct})\n")
            self.stream.flush()

    def close(self, message: str = "") -> None:
        if self._drawn:
            self.stream.write("\n")
        if message:
            self.stream.write(message + "\n")
        self.stream.flush()
