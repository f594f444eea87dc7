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
        # collectives called and completed, and the time with at least one of them in flight (DDP
        # keeps several buckets in flight at once: summing each one's time would count it twice).
        self._entered = self._ops = self._in_flight = 0
        self._waited = 0.0
        self._first: float | None = None
        self._busy_since = self._last = 0.0

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

    def entered(self) -> None:
        """A collective was called; `completed` follows when it is done."""
        now = time.monotonic()
        with self._lock:
            self._entered += 1
            if self._first is None:
                self._first = now
            if self._in_flight == 0:
                self._busy_since = now
            self._in_flight += 1

    def completed(self) -> None:
        """A collective `entered` before finished (its work completed, or it failed)."""
        now = time.monotonic()
        with self._lock:
            self._ops += 1
            self._in_flight = max(0, self._in_flight - 1)
            if self._in_flight == 0:
                self._waited += now - self._busy_since
            self._last = max(self._last, now)

    def sync(self) -> dict[str, int]:
        """Cumulative progress: collectives entered and completed (ops), and in microseconds the time
        with one in flight (wait) and the span from the first call to the last completion, or to now
        while one is in flight (a rank blocked in a hung collective shows its wait growing); empty
        before the first collective."""
        now = time.monotonic()
        with self._lock:
            if self._first is None:
                return {}
            waited, end = self._waited, max(self._last, self._first)
            if self._in_flight:
                waited, end = waited + now - self._busy_since, now
            return {"entered": self._entered, "ops": self._ops, "wait_us": int(waited * 1e6),
                    "span_us": int((end - self._first) * 1e6)}
