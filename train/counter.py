"""The per-rank byte totals that the counting wrappers add to and the reporter sends."""

from __future__ import annotations

import threading
import time


class TrafficCounter:
    """Thread-safe cumulative byte totals by kind of operation.

    Collectives are counted from the training thread, DDP hooks from autograd threads and RPC
    results from RPC callback threads, so every update takes the lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals: dict[str, int] = {}
        # Collective progress (the coordinator's straggler and hang detection, coordinator.progress):
        # collectives called and completed, microseconds spent between the two, and the span from
        # the first call to the last completion.
        self._entered = self._ops = self._wait_us = 0
        self._first: float | None = None
        self._last = 0.0

    def add(self, kind: str, nbytes: int) -> None:
        """Add ``nbytes`` to ``kind``; kinds appear once bytes flowed, so zeros are skipped."""
        if not nbytes:
            return
        with self._lock:
            self._totals[kind] = self._totals.get(kind, 0) + nbytes

    def snapshot(self) -> dict[str, int]:
        """A copy of the totals so far."""
        with self._lock:
            return dict(self._totals)

    def entered(self) -> float:
        """A collective was called; returns its start, for `completed`."""
        now = time.monotonic()
        with self._lock:
            self._entered += 1
            if self._first is None:
                self._first = now
        return now

    def completed(self, started: float) -> None:
        """The collective called at `started` finished (its work completed, or it failed)."""
        now = time.monotonic()
        with self._lock:
            self._ops += 1
            self._wait_us += int((now - started) * 1e6)
            self._last = max(self._last, now)

    def sync(self) -> dict[str, int]:
        """Cumulative progress: collectives entered and completed (ops), time waited in them and the
        span they cover, in microseconds; empty before the first collective."""
        with self._lock:
            if self._first is None:
                return {}
            span = int((max(self._last, self._first) - self._first) * 1e6)
            return {"entered": self._entered, "ops": self._ops, "wait_us": self._wait_us, "span_us": span}
