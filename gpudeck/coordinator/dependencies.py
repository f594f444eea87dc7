"""Which pending jobs the scheduler may consider now: those whose --after and --after-any jobs have
ended as asked, and, of an array, no more tasks than its throttle lets run at once.

It is pure (pending jobs, the states of the jobs they wait for and each array's running tasks in;
the jobs offered, the reasons of the others and the jobs that can never start out), like the
scheduler it runs before, so the policy is tested with properties and no sockets.

Policy, and why:

- `--after J`: J must succeed. A job named by the id of an array's first task stands for the whole
  array (`cancel 12` cancels it all, and `--after 12` waits for it all), so every task must
  succeed. When one fails or is cancelled the waiting job can never run as asked: it fails at once,
  with a reason naming the job, instead of waiting for ever.
- `--after-any J`: J must have ended, however it ended (a clean-up or report job).
- A job waiting for others is not offered: it holds no GPUs and takes no backfill slot, and its
  reason names every job it still waits for.
- An array runs at most its throttle (`%N`) of tasks at once: the tasks starting or running count,
  and of the pending ones only so many more are offered, lowest index first, so an array advances
  through its indices in order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

FINISHED = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class Waiting:
    """A pending job as the gate sees it."""

    job_id: int
    after: tuple[str, ...] = ()
    """References (see gpudeck.arrays.parse_ref) of jobs that must succeed first."""
    after_any: tuple[str, ...] = ()
    """References of jobs that must end first, however they end."""
    array_job: int | None = None
    array_index: int | None = None
    throttle: int = 0
    """At most this many tasks of its array start or run at once; 0: no limit."""


@dataclass(frozen=True)
class Upstream:
    """A job others wait for, as a person names it ('job 7', 'job 12.3', 'array 12'), and its jobs
    by state: the one job, or (`array`) every task of an array."""

    name: str
    states: Mapping[str, int] = field(default_factory=dict)
    array: bool = False

    @property
    def succeeded(self) -> bool:
        return sum(self.states.values()) == self.states.get("succeeded", 0)

    @property
    def ended(self) -> bool:
        return all(state in FINISHED for state in self.states)

    @property
    def failures(self) -> str:
        """How it ended otherwise than succeeding ('failed', 'was cancelled', 'had 2 failed tasks'), or ''."""
        failed, cancelled = self.states.get("failed", 0), self.states.get("cancelled", 0)
        if not (failed or cancelled):
            return ""
        if not self.array:
            return "failed" if failed else "was cancelled"
        parts = [f"{n} {kind} {'task' if n == 1 else 'tasks'}" for n, kind in ((failed, "failed"),
                                                                                (cancelled, "cancelled")) if n]
        return "had " + " and ".join(parts)


@dataclass(frozen=True)
class Gate:
    """One pass's answer: the jobs to offer the scheduler (in the order given, tasks of an array
    among themselves by index), why each other job waits, and the jobs that can never start."""

    offered: tuple[int, ...]
    reasons: dict[int, str]
    failed: dict[int, str]


def gate(pending: Sequence[Waiting], upstream: Mapping[str, Upstream], running: Mapping[int, int]) -> Gate:
    """Decide for each pending job; `upstream` holds every reference a pending job names (one that is
    missing names a job that no longer exists), `running` each array's tasks starting or running."""
    reasons: dict[int, str] = {}
    failed: dict[int, str] = {}
    ready: list[Waiting] = []
    for job in pending:
        verdict = _dependencies(job, upstream)
        if verdict is None:
            ready.append(job)
        elif verdict[0]:
            failed[job.job_id] = verdict[1]
        else:
            reasons[job.job_id] = verdict[1]
    offered = _throttled(ready, running, reasons)
    return Gate(tuple(offered), reasons, failed)


def _dependencies(job: Waiting, upstream: Mapping[str, Upstream]) -> tuple[bool, str] | None:
    """None when its dependencies allow it to start; else (True, why it never can) or (False, what it
    waits for)."""
    succeed, end = [], []
    for ref in job.after:
        found = upstream.get(ref)
        if found is None:
            return True, f"job {ref}, which this job was to run after, no longer exists"
        if found.failures:
            return True, f"{found.name} {found.failures}, and this job was to run after it succeeded"
        if not found.succeeded:
            succeed.append(found.name)
    for ref in job.after_any:
        found = upstream.get(ref)
        if found is not None and not found.ended:
            end.append(found.name)
    if not succeed and not end:
        return None
    wants = [f"{_names(succeed)} to succeed"] if succeed else []
    wants += [f"{_names(end)} to end"] if end else []
    return False, "waits for " + " and for ".join(wants)


def _names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _throttled(ready: list[Waiting], running: Mapping[int, int], reasons: dict[int, str]) -> list[int]:
    """The ready jobs, without the tasks of an array beyond its throttle; tasks of one array are
    taken and offered lowest index first, in the places its tasks had in `ready`."""
    by_array: dict[int, list[Waiting]] = {}
    for job in ready:
        if job.array_job is not None:
            by_array.setdefault(job.array_job, []).append(job)
    chosen: dict[int, list[int]] = {}
    for array, tasks in by_array.items():
        tasks.sort(key=lambda task: task.array_index or 0)
        throttle = tasks[0].throttle
        room = len(tasks) if not throttle else max(0, throttle - running.get(array, 0))
        chosen[array] = [task.job_id for task in tasks[:room]]
        for task in tasks[room:]:
            reasons[task.job_id] = (f"waits its turn: array {array} runs at most {throttle} of its tasks at once "
                                    f"(--array ...%{throttle})")
    offered, taken = [], {array: iter(ids) for array, ids in chosen.items()}
    for job in ready:
        if job.array_job is None:
            offered.append(job.job_id)
        elif (task_id := next(taken[job.array_job], None)) is not None:
            offered.append(task_id)
    return offered
