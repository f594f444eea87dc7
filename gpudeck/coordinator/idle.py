"""Idle jobs: running jobs whose GPUs all stay at 0 % utilisation, from the nodes' telemetry.

A job that holds GPUs and computes nothing (a notebook left open, a script waiting on input, a
rank stuck before its first collective) keeps others from those GPUs. The tracker is pure: the
server feeds it, every tick, the utilisation of each running job's GPUs and the time; it says since
when each job has been idle, and which have been idle longer than the cluster allows
(`gpudeck coordinator --idle-after`): those are flagged, in `gpudeck jobs` and the dashboard, and
with `--idle-cancel` cancelled. A short pause (an evaluation on the CPU, a checkpoint being written)
is not flagged.

Only the GPUs a job holds count, and only what they report: a job is idle once every one of them
reads 0 %, busy again as soon as one reads more, and unchanged while some read nothing (a node
that is reconnecting, a GPU that cannot report its use), so a missed report neither starts nor
resets the clock. A new attempt of a job starts with a clean slate.
"""

from __future__ import annotations

from typing import Callable, Iterable

from gpudeck.config import IDLE_AFTER
from gpudeck.coordinator.store import JobRow
from gpudeck.protocol.payloads import GpuReading

Utilizations = list[int | None]  # one per GPU the job holds; None where no reading says


class IdleTracker:
    """Since when each running job's GPUs have all read 0 %; a job is flagged (its view shows it)
    once that has lasted `after` seconds."""

    def __init__(self, after: float = IDLE_AFTER) -> None:
        self.after = after
        self._since: dict[int, tuple[int, float]] = {}  # job -> (attempt, idle since)
        self._flagged: dict[int, float] = {}  # job -> idle since, for jobs idle `after` or longer
        self._changed: set[int] = set()

    def update(self, running: dict[int, tuple[int, Utilizations]], now: float) -> None:
        """Judge every running job (id -> (attempt, its GPUs' utilisation)); jobs not given are
        forgotten (they stopped running)."""
        for job_id in [job_id for job_id in self._since if job_id not in running]:
            del self._since[job_id]
        for job_id, (attempt, utilizations) in running.items():
            self._judge(job_id, attempt, utilizations, now)
        flagged = {job_id: since for job_id, (_, since) in self._since.items() if now - since >= self.after}
        self._changed |= {job_id for job_id in flagged.keys() | self._flagged.keys()
                          if flagged.get(job_id) != self._flagged.get(job_id)}
        self._flagged = flagged

    def _judge(self, job_id: int, attempt: int, utilizations: Utilizations, now: float) -> None:
        known = [value for value in utilizations if value is not None]
        current = self._since.get(job_id)
        if current is not None and current[0] != attempt or any(value > 0 for value in known):
            self._since.pop(job_id, None)
            current = None
        if current is None and utilizations and len(known) == len(utilizations) and not any(known):
            self._since[job_id] = (attempt, now)

    def idle_since(self, job_id: int) -> float | None:
        """When a flagged job's GPUs went idle; None for a job not flagged."""
        return self._flagged.get(job_id)

    def overdue(self) -> list[tuple[int, float]]:
        """(job, idle since) of the flagged jobs, oldest idle first."""
        return sorted(self._flagged.items(), key=lambda item: (item[1], item[0]))

    def take_changed(self) -> set[int]:
        """Jobs flagged or unflagged since the last call (their views are due again)."""
        changed, self._changed = self._changed, set()
        return changed


def held_utilizations(rows: Iterable[JobRow], readings_of: Callable[[str], list[GpuReading] | None]
                      ) -> dict[int, tuple[int, Utilizations]]:
    """What `IdleTracker.update` takes, for these running jobs: each GPU of the current placement
    with its node's last reading (`readings_of(node)`, None for a node not connected)."""
    by_node: dict[str, dict[int, int | None]] = {}
    running = {}
    for row in rows:
        utilizations: Utilizations = []
        for node, gpus in row.hosts:
            if node not in by_node:
                by_node[node] = {gpu.index: gpu.utilization for gpu in readings_of(node) or []}
            utilizations += [by_node[node].get(index) for index in gpus]
        running[row.id] = (row.attempt, utilizations)
    return running
