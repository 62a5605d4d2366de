"""Progress lines on stderr for long work (conversion, loading, benchmarks).

In:  a total (bytes or items) and `update(n)` calls. Out: a line rewritten in place on a
terminal, or a line every 10% otherwise (logs); silent when disabled.
"""
from __future__ import annotations

import sys
import time


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


class Progress:
    def __init__(self, total: float, desc: str, enabled: bool = True, unit: str = "bytes", stream=None):
        self.total, self.desc, self.enabled, self.unit = max(total, 1), desc, enabled, unit
        self.done = 0.0
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = self._last = time.monotonic()
        self._last_decile = -1

    def _fmt(self, n: float) -> str:
        return _fmt_bytes(n) if self.unit == "bytes" else f"{int(n)}"

    def update(self, n: float, note: str = "") -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        frac = min(self.done / self.total, 1.0)
        decile = int(frac * 10)
        if self.tty and now - self._last < 0.2 and frac < 1.0:
            return
        if not self.tty and decile == self._last_decile:
            return
        self._last, self._last_decile = now, decile
        rate = self.done / max(now - self.t0, 1e-9)
        line = (f"{self.desc}: {frac * 100:5.1f}% ({self._fmt(self.done)} / {self._fmt(self.total)}, "
                f"{self._fmt(rate)}/s){' ' + note if note else ''}")
        self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
