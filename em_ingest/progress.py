"""Progress of one piece of long work (a fetch, a conversion): counted from any thread, told as one-line
messages to a sink at a bounded rate."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType

Sink = Callable[[str], None]
Clock = Callable[[], float]
LOGGER_NAME = "em_ingest.progress"
_log = logging.getLogger(LOGGER_NAME)


def log_sink(line: str) -> None:
    """The default sink: an INFO record of the `em_ingest.progress` logger."""
    _log.info("%s", line)


def human_bytes(n: float) -> str:
    """`n` bytes in binary units, e.g. "3.4 GiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("not reached")


def human_duration(seconds: float) -> str:
    """A duration, e.g. "0.4 s", "45 s", "3 min 12 s", "2 h 05 min"."""
    if seconds < 9.95:
        return f"{seconds:.1f} s"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Progress:
    """How far one piece of long work has come, e.g. `Progress("fetch epfl/hippocampus-training")`.

    Work is counted in units (`unit`: objects, blocks, ...) and bytes, from any number of threads:
    `advance` for work done, `skip` for work found already done (it counts as done but not towards the
    rate). Totals are given up front or added with `expect` as they become known; units expected without
    a size keep the percentage in units until `sized` tells their bytes. A line goes to `sink` at most
    every `every_s` seconds, or sooner each time another `every_fraction` of the total is done (but never
    twice within `min_interval_s`), and `finish` (or leaving a `with` block) writes the final line. The
    sink is called under the reporter's lock, so lines arrive whole and in order.

    `advance` is cheap (a lock, a clock read and a comparison) so it can be called per chunk or block.
    """

    def __init__(self, what: str, *, total_units: int | None = None, total_bytes: int | None = None,
                 unit: str = "objects", sink: Sink | None = None, every_s: float = 10.0,
                 every_fraction: float = 0.05, min_interval_s: float = 1.0, done_word: str = "done",
                 skipped_word: str = "skipped", clock: Clock = time.monotonic):
        self.what = what
        self.unit = unit
        self.sink = sink if sink is not None else log_sink
        self.every_s = every_s
        self.every_fraction = every_fraction
        self.min_interval_s = min_interval_s
        self.done_word = done_word
        self.skipped_word = skipped_word
        self._clock = clock
        self._lock = threading.Lock()
        self._total_units = total_units
        self._total_bytes = total_bytes
        self._unsized = 0  # expected units whose bytes are not in the byte total yet
        self._units = self._bytes = 0  # done, skipped included
        self._skipped_units = self._skipped_bytes = 0
        self._finished = False
        # The clock starts with the first work or total it is told of (listing before a fetch is not its rate).
        self._started: float | None = clock() if total_units is not None or total_bytes is not None else None
        self._last_line = self._started if self._started is not None else 0.0
        # The rate of a line is over the work since the previous line: its time and (units, bytes) worked then.
        self._rate_from = self._last_line
        self._rate_base = (0, 0)
        # Before the start, the first `advance` takes the slow path and starts the clock.
        self._next_line_at = float("-inf") if self._started is None else self._started + every_s
        self._by_bytes = False
        self._next_mark = float("inf")
        self._replan()

    # ---- counting (any thread) -----------------------------------------------------------------------
    def advance(self, units: int = 1, nbytes: int = 0) -> None:
        """`units` more done, carrying `nbytes` (bytes may come alone, e.g. while one large object downloads,
        and may be negative when a transfer restarts and takes back bytes it had reported)."""
        now = self._clock()
        with self._lock:
            self._units += units
            self._bytes += nbytes
            if (now < self._next_line_at
                    and (self._bytes if self._by_bytes else self._units) < self._next_mark) or self._finished:
                return
            self._write_if_due(now)

    def skip(self, units: int = 1, nbytes: int = 0) -> None:
        """`units` found already done (e.g. unchanged since the last fetch): done, but not part of the rate."""
        now = self._clock()
        with self._lock:
            self._units += units
            self._bytes += nbytes
            self._skipped_units += units
            self._skipped_bytes += nbytes
            if not self._finished:
                self._write_if_due(now)

    def expect(self, units: int = 0, nbytes: int | None = 0) -> None:
        """Add to the totals: `units` more to do, of `nbytes` bytes altogether (None: not known yet)."""
        with self._lock:
            self._start(self._clock())
            self._total_units = (self._total_units or 0) + units
            if nbytes is None:
                self._unsized += units
            else:
                self._total_bytes = (self._total_bytes or 0) + nbytes
            self._replan()

    def sized(self, nbytes: int, units: int = 1) -> None:
        """The bytes of `units` that were expected without a size became known."""
        with self._lock:
            self._unsized = max(0, self._unsized - units)
            self._total_bytes = (self._total_bytes or 0) + nbytes
            self._replan()

    def finish(self, *, failed: bool = False) -> None:
        """Write the final line (once): what was done, in how long, at what rate."""
        now = self._clock()
        with self._lock:
            if self._finished:
                return
            self._finished = True
            self.sink(self._format(now, final="failed" if failed else "done"))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.finish(failed=exc is not None)

    # ---- reading -------------------------------------------------------------------------------------
    @property
    def done(self) -> tuple[int, int]:
        """(units, bytes) done so far, skipped ones included."""
        with self._lock:
            return self._units, self._bytes

    def line(self) -> str:
        """The message as the next line would say it now (its rate: since the last line written)."""
        with self._lock:
            rate_from, rate_base = self._rate_from, self._rate_base
            line = self._format(self._clock())
            self._rate_from, self._rate_base = rate_from, rate_base
            return line

    # ---- under the lock ------------------------------------------------------------------------------
    def _start(self, now: float) -> None:
        if self._started is None:
            self._started = self._last_line = self._rate_from = now
            self._next_line_at = now + self.every_s

    def _percent_total(self) -> int | None:
        """The total the percentage is of, in bytes when every expected unit's size is known, else units."""
        if self._by_bytes:
            return self._total_bytes
        return self._total_units or None

    def _replan(self) -> None:
        """Where the next "another fraction done" line falls, after a line or a change of the totals."""
        self._by_bytes = bool(self._total_bytes) and self._unsized == 0
        total = self._percent_total()
        if total is None or self.every_fraction <= 0:
            self._next_mark = float("inf")
            return
        step = total * self.every_fraction
        done = self._bytes if self._by_bytes else self._units
        mark = (done // step + 1) * step
        # No line for reaching 100 %: the final line follows.
        self._next_mark = mark if mark < total - step / 2 else float("inf")

    def _write_if_due(self, now: float) -> None:
        # The sink is called under the lock: lines arrive whole and in order, and lines are rare enough
        # (a second or more apart) that the other threads' wait for one does not matter.
        self._start(now)
        by_time = now >= self._next_line_at
        by_fraction = (self._bytes if self._by_bytes else self._units) >= self._next_mark
        if not by_time and not (by_fraction and now - self._last_line >= self.min_interval_s):
            return
        self._last_line = now
        self._next_line_at = now + self.every_s
        self._replan()
        self.sink(self._format(now))

    def _format(self, now: float, final: str | None = None) -> str:
        """The message. A line on the way gives the rate since the previous line (the current speed, which
        the time left is reckoned from); the final line gives the average over the whole work."""
        units, nbytes = self._units, self._bytes
        worked = (units - self._skipped_units, nbytes - self._skipped_bytes)
        started = self._started if self._started is not None else now
        since, before = (started, (0, 0)) if final is not None else (self._rate_from, self._rate_base)
        self._rate_from, self._rate_base = now, worked
        parts = [f"{units}/{self._total_units} {self.unit}" if self._total_units else f"{units} {self.unit}"]
        if self._skipped_units:
            parts[0] += f" ({worked[0]} {self.done_word}, {self._skipped_units} {self.skipped_word})"
        if self._total_bytes and self._unsized == 0:
            parts.append(f"{human_bytes(nbytes)} of {human_bytes(self._total_bytes)}")
        elif nbytes:
            parts.append(human_bytes(nbytes))
        total = self._percent_total()
        done = nbytes if self._by_bytes else units
        if total and final is None:
            parts.append(f"{min(100.0, 100.0 * done / total):.0f} %")
        window = now - since
        unit_rate = (worked[0] - before[0]) / window if window > 0 else 0.0
        byte_rate = (worked[1] - before[1]) / window if window > 0 else 0.0
        if byte_rate > 0:
            parts.append(f"{human_bytes(byte_rate)}/s")
        if unit_rate > 0:
            parts.append(f"{unit_rate:.1f} {self.unit}/s" if unit_rate >= 1 else f"{unit_rate:.2g} {self.unit}/s")
        if final is not None:
            return f"{self.what}: {final} in {human_duration(now - started)}, {', '.join(parts)}"
        rate = byte_rate if self._by_bytes else unit_rate
        if total and rate > 0 and done < total:
            parts.append(f"about {human_duration((total - done) / rate)} left")
        return f"{self.what}: {', '.join(parts)}"
