"""Live parameter-sync counters: kept in memory while jobs run, written to the store at a bounded rate.

Agents report every job's cumulative counters once a second per node; writing each report to SQLite
and reading it back for every publish is most of a busy coordinator's disk and CPU. Here a report
only updates memory; the counters reach the file at most every PERSIST_EVERY seconds (so a
coordinator killed with -9 loses at most that much of a running job's counts) and at once when an
attempt ends, so a finished job's totals are exact on disk.
"""

from __future__ import annotations

from gpudeck.coordinator.store import Store

PERSIST_EVERY = 5.0
Counts = dict[tuple[int, int], dict[str, int]]  # (attempt, rank) -> kind -> bytes
ByRank = dict[int, dict[str, int]]  # rank -> kind -> bytes, summed over attempts


class TrafficBook:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._live: dict[int, Counts] = {}  # jobs that reported since this coordinator started
        self._dirty: set[tuple[int, int]] = set()  # (job, attempt) with counts not yet on disk
        self._changed: set[int] = set()
        self._persisted_at = 0.0

    def record(self, job_id: int, attempt: int, by_rank: ByRank) -> None:
        """Merge a cumulative report; a counter never goes down, so a stale report changes nothing."""
        counts = self._live.get(job_id)
        if counts is None:
            counts = self._live[job_id] = self.store.traffic_counts(job_id)
        grew = False
        for rank, kinds in by_rank.items():
            held = counts.setdefault((attempt, rank), {})
            for kind, count in kinds.items():
                if count > held.get(kind, 0):
                    held[kind] = count
                    grew = True
        if grew:
            self._dirty.add((job_id, attempt))
            self._changed.add(job_id)

    def totals(self, job_ids: list[int]) -> dict[int, ByRank]:
        """Each job's bytes by rank and kind over all its attempts: live jobs from memory, the rest
        from the store in batched queries."""
        found = {job_id: _summed(self._live[job_id]) for job_id in job_ids if job_id in self._live}
        stored = self.store.traffic_totals([job_id for job_id in job_ids if job_id not in self._live])
        found.update(stored)
        return {job_id: found.get(job_id, {}) for job_id in job_ids}

    def take_changed(self) -> set[int]:
        changed, self._changed = self._changed, set()
        return changed

    def persist(self, now: float) -> None:
        """Write what changed, at most once every PERSIST_EVERY seconds."""
        if self._dirty and now - self._persisted_at >= PERSIST_EVERY:
            self._write(set(self._dirty))
            self._persisted_at = now

    def persist_job(self, job_id: int, finished: bool) -> None:
        """Write one job's counts now (its attempt ended); a finished job leaves memory."""
        self._write({key for key in self._dirty if key[0] == job_id})
        if finished:
            self._live.pop(job_id, None)

    def _write(self, keys: set[tuple[int, int]]) -> None:
        if not keys:
            return
        rows = [(job_id, attempt, rank, kind, count)
                for job_id, attempt in keys
                for (held_attempt, rank), kinds in self._live[job_id].items() if held_attempt == attempt
                for kind, count in kinds.items()]
        self.store.set_traffic(rows)
        self._dirty -= keys


def _summed(counts: Counts) -> ByRank:
    totals: ByRank = {}
    for (_, rank), kinds in counts.items():
        into = totals.setdefault(rank, {})
        for kind, count in kinds.items():
            into[kind] = into.get(kind, 0) + count
    return totals
