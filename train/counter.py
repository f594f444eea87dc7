"""The per-rank byte totals that the counting wrappers add to and the reporter sends."""

from __future__ import annotations

import threading


class TrafficCounter:
    """Thread-safe cumulative byte totals by kind of operation.

    Collectives are counted from the training thread, DDP hooks from autograd threads and RPC
    results from RPC callback threads, so every update takes the lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals: dict[str, int] = {}

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
