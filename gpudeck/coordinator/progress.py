"""Stragglers and hangs, from the collective progress every rank reports with its traffic.

Each rank's counting wrapper (gpudeck.train.counter) keeps cumulative counts: collectives entered
and completed, the microseconds it spent inside them (waiting for its peers and the transfer), and
the span from its first call to its last completion. The span less the wait is the time the rank
spent on its own work. In a synchronous job every rank completes the same collectives, so a rank
whose own work per collective is well above its peers' is the one they all wait for: the straggler,
named as "rank 5 on node-c is 1.8× slower than the median" (its own time per collective over the
median of the others', in the last WINDOW seconds).

A job whose ranks have all completed no collective for `hang_after` seconds is hung. The rank that
stopped first is the one not inside a collective (it stopped in its own code while the others wait
for it); when every rank waits inside one, the one whose progress stopped earliest. A job is judged
only once it has completed a collective: a command that never calls torch.distributed is not hung.

Per job, memory is bounded: a sample per rank per report, kept for WINDOW seconds, at most
MAX_RANKS ranks. The heatmap of the job detail is the share of each BUCKET a rank spent waiting.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from gpudeck.protocol.payloads import HangView, ProgressView, TrafficByRank
from gpudeck.text import spoken_duration

WINDOW = 300.0  # seconds of history the heatmap and the straggler verdict look at
BUCKET = 15.0  # seconds per heatmap cell
MAX_RANKS = 4096
MIN_OPS = 3  # collectives each rank must have completed in the window before any is judged
STRAGGLER_RATIO = 1.3  # own time per collective over the others' median that makes a straggler


@dataclass(frozen=True)
class _Sample:
    at: float
    entered: int
    ops: int
    wait_us: int
    span_us: int


@dataclass
class _Rank:
    samples: deque[_Sample] = field(default_factory=deque)
    progressed_at: float = 0.0  # when its completed count last grew


@dataclass
class _Job:
    attempt: int
    ranks: dict[int, _Rank] = field(default_factory=dict)


class ProgressBook:
    def __init__(self, hang_after: float, clock: Callable[[], float]) -> None:
        self.hang_after = hang_after
        self.clock = clock
        self._jobs: dict[int, _Job] = {}
        self._changed: set[int] = set()

    def record(self, job_id: int, attempt: int, sync: TrafficByRank) -> None:
        """Take one report's cumulative counts; a new attempt starts from scratch."""
        now = self.clock()
        job = self._jobs.get(job_id)
        if job is None or job.attempt != attempt:
            job = self._jobs[job_id] = _Job(attempt)
        for rank, counts in sync.items():
            held = job.ranks.get(rank)
            if held is None:
                if len(job.ranks) >= MAX_RANKS:
                    continue
                held = job.ranks[rank] = _Rank(progressed_at=now)
            sample = _Sample(now, counts.get("entered", 0), counts.get("ops", 0), counts.get("wait_us", 0),
                             counts.get("span_us", 0))
            if held.samples and sample.ops > held.samples[-1].ops:
                held.progressed_at = now
            if held.samples and sample.ops < held.samples[-1].ops:
                continue  # a stale, reordered report
            held.samples.append(sample)
            while len(held.samples) > 2 and held.samples[1].at <= now - WINDOW:
                held.samples.popleft()
        self._changed.add(job_id)

    def keep_only(self, running: set[int]) -> None:
        """Forget jobs that stopped running."""
        for job_id in [job_id for job_id in self._jobs if job_id not in running]:
            del self._jobs[job_id]
            self._changed.add(job_id)

    def take_changed(self) -> set[int]:
        changed, self._changed = self._changed, set()
        return changed

    def view(self, job_id: int, node_of: Callable[[int], str]) -> ProgressView | None:
        """The job's heatmap, straggler and hang, or None before it reported any progress."""
        job = self._jobs.get(job_id)
        if job is None or not job.ranks:
            return None
        now = self.clock()
        return ProgressView(bucket_seconds=BUCKET, wait={str(rank): _heat(held.samples, now)
                                                          for rank, held in sorted(job.ranks.items())},
                            straggler=_straggler(job, node_of), hung=self._hang(job, now, node_of))

    def stalled_for(self, job_id: int) -> float | None:
        """Seconds since any rank of the job completed a collective; None for a job not judged."""
        job = self._jobs.get(job_id)
        since = _stalled_since(job) if job is not None else None
        return None if since is None else self.clock() - since

    def _hang(self, job: _Job, now: float, node_of: Callable[[int], str]) -> HangView | None:
        since = _stalled_since(job)
        if since is None or now - since < self.hang_after:
            return None
        outside = [rank for rank, held in job.ranks.items() if held.samples[-1].entered == held.samples[-1].ops]
        first = min(outside or job.ranks, key=lambda rank: (job.ranks[rank].progressed_at, rank))
        where = "outside any collective" if outside else "inside a collective"
        return HangView(since=since, rank=first, node=node_of(first),
                        sentence=f"no collective completed for {spoken_duration(now - since)}; rank {first} on "
                        f"{node_of(first)} stopped first ({where}, the others wait for it)"
                        if outside else f"no collective completed for {spoken_duration(now - since)}; every rank "
                        f"waits inside one, rank {first} on {node_of(first)} since longest")


def _stalled_since(job: _Job) -> float | None:
    """When a rank of the job last completed a collective; None before any has (not judged yet)."""
    if not any(held.samples and held.samples[-1].ops > 0 for held in job.ranks.values()):
        return None
    return max(held.progressed_at for held in job.ranks.values())


def _own_time_per_op(samples: deque[_Sample]) -> float | None:
    """Seconds of the rank's own work per completed collective over the window."""
    first, last = samples[0], samples[-1]
    ops = last.ops - first.ops
    if ops < MIN_OPS:
        return None
    own = (last.span_us - first.span_us) - (last.wait_us - first.wait_us)
    return max(0.0, own) / 1e6 / ops


def _straggler(job: _Job, node_of: Callable[[int], str]) -> str:
    own = {rank: value for rank, held in job.ranks.items() if (value := _own_time_per_op(held.samples)) is not None}
    if len(own) < 2:
        return ""
    slowest = max(own, key=lambda rank: (own[rank], -rank))
    others = statistics.median(value for rank, value in own.items() if rank != slowest)
    if others <= 0 or own[slowest] / others < STRAGGLER_RATIO:
        return ""
    return f"rank {slowest} on {node_of(slowest)} is {own[slowest] / others:.1f}× slower than the median"


def _heat(samples: deque[_Sample], now: float) -> list[float | None]:
    """The share of each BUCKET of the window (oldest first) the rank spent in collectives; None
    where no report covers that time. One pass over the samples: views are built every second for
    every running job."""
    listed = list(samples)
    count = int(WINDOW // BUCKET)
    last_at: list[int] = []  # per bucket boundary, the index of the last sample at or before it (-1: none)
    index = -1
    for boundary in range(count + 1):
        at = now - (count - boundary) * BUCKET
        while index + 1 < len(listed) and listed[index + 1].at <= at:
            index += 1
        last_at.append(index)
    cells: list[float | None] = []
    for bucket in range(count):
        before, top = last_at[bucket], last_at[bucket + 1]
        if top == before or before < 0 and top - before < 2:
            cells.append(None)
            continue
        base, end = listed[max(before, 0)], listed[top]
        elapsed = end.span_us - base.span_us
        cells.append(round(min(1.0, (end.wait_us - base.wait_us) / elapsed), 3) if elapsed > 0 else 0.0)
    return cells
