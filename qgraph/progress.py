"""Progress of long steps (calibration, the sensitivity search, QAT epochs, the report): a bar with an ETA on stderr.

``Progress(total, "calibrating", unit="samples")`` is a context manager whose :meth:`Progress.update` adds done
work; ``total=None`` counts without an ETA. The ETA is the linear extrapolation of the rate so far::

    ETA = elapsed · (total − done) / done

With tqdm installed the bar is tqdm's; otherwise qgraph draws its own on stderr: redrawn in place (at most 5 times
a second) on a terminal, and on a pipe or a log file one line at most every 10 seconds plus one at the end, so a
captured log stays readable. Each finished bar also logs one INFO line with its total and duration.

Silenced when the ``qgraph`` logger does not show warnings (``qgraph --quiet`` sets it to errors only) or when the
environment variable ``QGRAPH_PROGRESS`` is ``0``; :func:`set_enabled` overrides both (tests, embedding programs).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import TextIO

logger = logging.getLogger(__name__)

#: Seconds between redraws on a terminal, and between lines on a pipe.
TERMINAL_INTERVAL_SECONDS = 0.2
PIPE_INTERVAL_SECONDS = 10.0

_enabled_override: bool | None = None


def set_enabled(enabled: bool | None) -> None:
    """Force progress bars on or off (None: decide from the logging level and ``QGRAPH_PROGRESS``)."""
    global _enabled_override
    _enabled_override = enabled


def enabled() -> bool:
    if _enabled_override is not None:
        return _enabled_override
    if os.environ.get("QGRAPH_PROGRESS", "").strip() == "0":
        return False
    return logging.getLogger("qgraph").isEnabledFor(logging.WARNING)


def format_seconds(seconds: float) -> str:
    """``m:ss`` (or ``h:mm:ss``) for a duration."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress:
    """A progress bar for ``total`` units of work (None: unknown), written to ``stream`` (default stderr)."""

    def __init__(self, total: float | None, description: str, *, unit: str = "", stream: TextIO | None = None) -> None:
        self.total = total
        self.description = description
        self.unit = unit
        self.done = 0.0
        self.note = ""
        self.stream = stream if stream is not None else sys.stderr
        self.started = time.perf_counter()
        self._last_draw = float("-inf")
        self._closed = False
        self._bar = None
        self._active = enabled()
        self._terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        if self._active:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=description, unit=f" {unit}" if unit else "it", file=self.stream,
                                 leave=True, dynamic_ncols=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __call__(self, amount: float = 1) -> None:
        self.update(amount)

    def update(self, amount: float = 1, *, note: str | None = None) -> None:
        """Add ``amount`` units of done work; ``note`` replaces the text shown after the bar. The bar closes once the
        total is done (the work after it, such as the search that follows calibration, is not counted in its time);
        later updates only count."""
        self.done += amount
        if note is not None:
            self.note = note
        if self._closed:
            return
        if self.total is not None and self.done >= self.total:
            if self._active and self._bar is not None:
                self._bar.update(amount)
            self.close()
            return
        if not self._active:
            return
        if self._bar is not None:
            if note is not None:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(amount)
            return
        now = time.perf_counter()
        interval = TERMINAL_INTERVAL_SECONDS if self._terminal else PIPE_INTERVAL_SECONDS
        if now - self._last_draw >= interval:
            self._draw(now)

    def set_total(self, total: float | None) -> None:
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def eta_seconds(self) -> float | None:
        """Seconds left at the rate so far (None while nothing is done or the total is unknown)."""
        if self.total is None or self.done <= 0:
            return None
        elapsed = time.perf_counter() - self.started
        return max(0.0, elapsed * (self.total - self.done) / self.done)

    def line(self) -> str:
        """The bar as one line of text."""
        elapsed = time.perf_counter() - self.started
        unit = f" {self.unit}" if self.unit else ""
        if self.total:
            fraction = min(1.0, self.done / self.total)
            filled = int(round(20 * fraction))
            eta = self.eta_seconds()
            text = (f"{self.description}: {100 * fraction:3.0f}% |{'#' * filled}{'.' * (20 - filled)}| "
                    f"{self.done:g}/{self.total:g}{unit} [{format_seconds(elapsed)}"
                    + (f" < {format_seconds(eta)}" if eta is not None else "") + "]")
        else:
            text = f"{self.description}: {self.done:g}{unit} [{format_seconds(elapsed)}]"
        return text + (f" {self.note}" if self.note else "")

    def _draw(self, now: float, *, final: bool = False) -> None:
        self._last_draw = now
        if self._terminal:
            self.stream.write("\r\x1b[2K" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        elapsed = time.perf_counter() - self.started
        if self._active:
            if self._bar is not None:
                self._bar.close()
            elif self.done > 0 or self._last_draw > float("-inf"):  # a bar never drawn nor moved stays unsaid (an
                self._draw(time.perf_counter(), final=True)  # error before the first sample: only the error shows)
        logger.info("%s: %g%s in %.1f s", self.description, self.done, f" {self.unit}" if self.unit else "", elapsed)
