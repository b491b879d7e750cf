"""Freed memory on virtual machines that hand it back to their host, and how the harness keeps that from deciding
a ratio.

A guest kernel with free page reporting (virtio-balloon) gives pages back to the host once they have been free for
a moment, and the next write into such a page faults it in again through the host. Where the benchmarks were
measured, writing 1 GiB into pages given back cost 2–6 s of system time, into pages just freed ~0.3 s. So whichever
of two commands started right after a deletion wrote into warm pages: `cp`, run right after the previous
conversion's output was deleted, did; the conversion, a second later, mostly did not.

`probe` measures the effect. `freed_pages("hold")` then keeps freed pages in the guest while the harness
measures, where the kernel has knobs for how long a page must be free before it is given back and how much may
wait that long (`min_free_ms`, `max_waiting_mib`; restored afterwards), so both sides of a ratio write into warm
pages, as on a machine without reporting. Where it cannot hold them, `settle` waits before each timed command
until what was freed has been given back, so both sides start cold.
"""

from __future__ import annotations

import os
import resource
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

KNOBS = Path("/sys/module/page_reporting/parameters")
DELAY_KNOB = KNOBS / "min_free_ms"  # how long a page stays free before it is given back
WAITING_KNOB = KNOBS / "max_waiting_mib"  # how much freed memory may wait; beyond it, pages go back at once
WAITING_MIB = 1 << 16
# How long a freed page is kept before it is given back, longest first: the kernel caps the knob (at 5 minutes
# where this was written), and a page freed and used again within that time stays warm.
HOLD_MS = (300_000, 120_000, 60_000)
SETTLE_SECONDS = 4.0  # pages freed were given back within 0.5-2 s where this was measured
_BLOCK = 8 << 20

_state: dict[str, Any] = {"returned": False, "held": False}


def _write_seconds(path: Path, size: int) -> float:
    """System CPU seconds this process spends writing `size` bytes to a new file at `path`."""
    block = os.urandom(_BLOCK)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(size // _BLOCK):
            os.write(fd, block)
    finally:
        os.close(fd)
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime - before


def probe(workdir: Path, size: int) -> dict[str, Any]:
    """System seconds per GiB written into pages freed just before, and into pages freed SETTLE_SECONDS before."""
    path = workdir / "page-probe.bin"
    try:
        _write_seconds(path, size)
        path.unlink()
        recycled = _write_seconds(path, size)
        path.unlink()
        time.sleep(SETTLE_SECONDS)
        settled = _write_seconds(path, size)
    finally:
        path.unlink(missing_ok=True)
    per_gib = (1 << 30) / size
    found = {"write_recycled_system_seconds_per_gib": recycled * per_gib,
             "write_after_pause_system_seconds_per_gib": settled * per_gib}
    # Pages given back show as writes several times dearer after the pause than straight after the deletion.
    found["freed_pages_given_back"] = settled > 3 * max(recycled, 1e-3)
    _state["returned"] = found["freed_pages_given_back"]
    return found


def _exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # so a harness stopped by SIGTERM still restores the knob


@contextmanager
def freed_pages(mode: str, workdir: Path, warm_bytes: int, probe_bytes: int) -> Iterator[dict[str, Any]]:
    """While the block runs, treat freed pages by `mode`: "hold" them in the guest where the kernel allows it (first
    writing and deleting `warm_bytes`, so that many pages are warm), else "settle" (see `settle`); "leave" does
    neither and measures nothing. Yields what was found and done, for the results."""
    if mode == "leave":
        yield {"mode": mode}
        return
    found = {"mode": mode, **probe(workdir, probe_bytes), "held": False}
    try:
        if mode == "hold" and found["freed_pages_given_back"] and os.access(DELAY_KNOB, os.W_OK):
            with _held(found, workdir, warm_bytes):
                yield found
        else:
            yield found
    finally:
        _state.update(held=False, returned=False)


@contextmanager
def _held(found: dict[str, Any], workdir: Path, warm_bytes: int) -> Iterator[None]:
    """Raise the kernel's knobs so freed pages stay in the guest; put them back afterwards, even on SIGTERM."""
    before = {knob: knob.read_text().strip() for knob in (DELAY_KNOB, WAITING_KNOB) if knob.exists()}
    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        if WAITING_KNOB in before:
            WAITING_KNOB.write_text(str(WAITING_MIB))
        for hold_ms in HOLD_MS:
            try:
                DELAY_KNOB.write_text(str(hold_ms))
            except OSError:
                continue  # above the kernel's cap
            _state["held"] = found["held"] = True
            found["held_ms"] = hold_ms
            break
        warm = workdir / "page-warm.bin"
        _write_seconds(warm, warm_bytes)
        warm.unlink()
        yield
    finally:
        for knob, value in before.items():
            knob.write_text(value)
        signal.signal(signal.SIGTERM, previous)


def settle() -> None:
    """Before a timed command: where freed pages are given back and not held, wait until they have been, so every
    timed command starts from the same state whatever the previous one deleted."""
    if _state["returned"] and not _state["held"]:
        time.sleep(SETTLE_SECONDS)
