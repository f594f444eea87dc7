"""Which preemptible jobs to stop so that a waiting job of higher `--priority` can start.

Pure, like the scheduler it completes: the free GPUs, the running preemptible jobs and the waiting
request in, the jobs to stop out.

Policy, and why:

- Only `--preemptible` jobs are stopped, and only for a job whose own `--priority` is higher. The
  priority score (fair share, age) is not used: it moves with time and usage, and a job stopped
  because someone's share changed an hour later would be stopped for no act of anyone's.
- Only when the waiting job cannot start on the free GPUs, and only as many jobs as it needs: the
  candidates are taken lowest `--priority` first, then the most recently started (the least work
  lost), until the request fits on the free GPUs and theirs; then every chosen job the request
  does not need after all (the ones chosen early may have been made unnecessary by a later, bigger
  one) is spared again, last chosen first.
- GPUs of a node that is not offered (down, draining) free nothing: the caller's free map holds only
  the nodes jobs may be placed on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gpudeck.coordinator.scheduler import FreeMap, Hosts, JobRequest, place


@dataclass(frozen=True)
class Candidate:
    """A running preemptible job."""

    job_id: int
    priority: int  # its --priority
    started_at: float
    hosts: Hosts


def victims(request: JobRequest, priority: int, free: FreeMap, running: Sequence[Candidate]) -> tuple[int, ...]:
    """The jobs to stop so that `request` (of `--priority` `priority`) fits; () when it fits
    already or when stopping every lower-priority candidate would not make it fit."""
    if place(request, free) is not None:
        return ()
    order = sorted((job for job in running if job.priority < priority),
                   key=lambda job: (job.priority, -job.started_at, -job.job_id))
    chosen: list[Candidate] = []
    for job in order:
        chosen.append(job)
        if place(request, _freed(free, chosen)) is not None:
            break
    else:
        return ()
    for job in reversed(chosen[:-1]):
        spared = [other for other in chosen if other is not job]
        if place(request, _freed(free, spared)) is not None:
            chosen = spared
    return tuple(sorted(job.job_id for job in chosen))


def _freed(free: FreeMap, stopped: Sequence[Candidate]) -> FreeMap:
    """The free map once `stopped` gave their GPUs back (on the nodes it holds)."""
    after = {name: set(indices) for name, indices in free.items()}
    for job in stopped:
        for name, indices in job.hosts:
            if name in after:
                after[name].update(indices)
    return {name: tuple(sorted(indices)) for name, indices in after.items()}
