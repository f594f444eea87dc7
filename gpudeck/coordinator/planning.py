"""One scheduling pass, decided before anything is written: gate, score, place, victims.

A pass reads a `View` (the pending rows it considers, what they wait on, the cluster as the
scheduler sees it, the scores and the requests already built) and returns a `Plan`;
`JobControl.apply` then does every write and send the plan calls for, in one place. Keeping the
decision apart from the effects, as Nomad's planner and the Kubernetes scheduler framework do, lets
a pass be tested from plain values, and lets it run off the event loop once its view is copied: it
does no I/O, reads no clock and changes nothing it is given.

The steps, each a pure module of its own:

- gate (`coordinator.dependencies`): which jobs wait for their --after and --after-any jobs or their
  array's throttle, and which can never run because a job they were to run after failed;
- behind preemptors: a preempted job waits until the job it was stopped for has started;
- score (`coordinator.priority`): a request per job, built once per rescoring;
- place (`coordinator.scheduler`): placements, the reserved job, each waiting job's reason;
- victims (`coordinator.preemption`): the preemptible jobs to stop for the first waiting job, by
  score, that stopping them lets start, unless jobs stopped for an earlier one still hold GPUs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpudeck.arrays import parse_array
from gpudeck.coordinator.dependencies import Upstream, Waiting, gate
from gpudeck.coordinator.preemption import Candidate, victims
from gpudeck.coordinator.priority import Policy
from gpudeck.coordinator.scheduler import Decision, JobRequest, NodeSlots, Placement, RunningJob, schedule

if TYPE_CHECKING:  # the rows are read, never written: planning imports nothing that does I/O
    from gpudeck.coordinator.store import JobRow


@dataclass(frozen=True)
class Cluster:
    """What the scheduler sees of the cluster, read once per pass."""

    slots: tuple[NodeSlots, ...]
    running: tuple[RunningJob, ...]
    limits: Mapping[str, int]
    draining: tuple[str, ...]
    fenced: str
    """What a waiting job cannot see in the free GPUs (the fenced GPUs of lost nodes), or ''."""
    now: float
    default_time_limit: float

    @property
    def context(self) -> object:
        """What decides every waiting job's verdict besides its score: when it is as after the last
        pass, the jobs that waited then still wait for the same reason (`JobControl.schedule`)."""
        return (self.slots, self.draining, self.fenced, self.running, tuple(sorted(self.limits.items())))


@dataclass(frozen=True)
class Active:
    """The jobs that hold or are about to get GPUs, as gating and preemption see them."""

    array_running: Mapping[int, int]
    """How many tasks of each array are starting or running."""
    candidates: tuple[Candidate, ...]
    """Running preemptible jobs that are not being stopped already."""
    stopping: bool
    """Jobs stopped for an earlier preemptor still hold GPUs: no one is preempted until they stop."""
    preempted_by: Mapping[int, int]
    """A preempted job -> the job it was stopped for, while that job waits."""


@dataclass(frozen=True)
class Scores:
    """Every pending job's score is as of `at`, so that scores compare at one instant."""

    policy: Policy
    shares: Mapping[str, float]
    at: float

    def of(self, row: JobRow) -> float:
        return self.policy.total(row.spec.priority, row.submitted_at, self.shares.get(row.owner, 1.0), self.at)


@dataclass(frozen=True)
class View:
    """A pass's input. `requests` holds the requests built since the last rescoring; off the event
    loop, give a copy."""

    pending: Sequence[JobRow]
    upstream: Mapping[str, Upstream]
    cluster: Cluster
    active: Active
    scores: Scores
    requests: Mapping[int, JobRequest]


@dataclass(frozen=True)
class Preemption:
    """Jobs to send back to the queue so that `by` can start."""

    by: JobRow
    victims: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    failed: dict[int, str]
    """Pending jobs that can never run as asked (a job they were to run after failed), with why."""
    reasons: dict[int, str]
    """Why each other considered job waits, for a person."""
    decision: Decision
    launches: tuple[tuple[JobRow, Placement], ...]
    requests: dict[int, JobRequest]
    """Requests built this pass, to keep until the next rescoring."""
    preemption: Preemption | None

    @property
    def reserved(self) -> int | None:
        return self.decision.reservation.job_id if self.decision.reservation else None


def request_of(row: JobRow, priority: float) -> JobRequest:
    """What the scheduler sees of a pending job, with its priority score (`Scores.of`)."""
    spec = row.spec
    return JobRequest(job_id=row.id, priority=priority, gpus=spec.gpus, nodes=spec.nodes,
                      gpus_per_node=spec.gpus_per_node, owner=row.owner, time_limit=spec.time_limit,
                      on_nodes=tuple(spec.on_nodes))


def waiting(row: JobRow) -> Waiting:
    """What the dependency gate sees of a pending job."""
    throttle = parse_array(row.spec.array).throttle if row.spec.array else 0
    return Waiting(row.id, tuple(row.spec.after), tuple(row.spec.after_any), row.array_job, row.array_index, throttle)


def plan(view: View) -> Plan:
    """Decide one pass over `view.pending`."""
    verdict = gate([waiting(row) for row in view.pending], view.upstream, view.active.array_running)
    by_id = {row.id: row for row in view.pending}
    held = _behind_preemptors(verdict.offered, view.active.preempted_by)
    offered = [by_id[job_id] for job_id in verdict.offered if job_id not in held]
    built = {row.id: request_of(row, view.scores.of(row)) for row in offered if row.id not in view.requests}
    requests = [view.requests[row.id] if row.id in view.requests else built[row.id] for row in offered]
    cluster = view.cluster
    decision = schedule(cluster.slots, requests, cluster.running, cluster.limits, cluster.now,
                        cluster.default_time_limit)
    explained = {job_id: _explained(by_id[job_id], reason, cluster.draining) + cluster.fenced
                 for job_id, reason in decision.reasons.items()}
    launches = tuple((by_id[placement.job_id], placement) for placement in decision.placements)
    scored = {request.job_id: request for request in requests}
    return Plan(failed=verdict.failed, reasons={**verdict.reasons, **held, **explained}, decision=decision,
                launches=launches, requests=built,
                preemption=_preemption(by_id, scored, decision, view.active, launches, cluster.now))


def _behind_preemptors(offered: Sequence[int], preempted_by: Mapping[int, int]) -> dict[int, str]:
    """The offered jobs that may not be placed, with why: a preempted job waits until the job it was
    stopped for has started, or the GPUs it gave back could go straight back to it (its fair share
    may well score higher) and the two would stop each other in turn."""
    return {job_id: f"preempted by job {preempted_by[job_id]}; it waits until job {preempted_by[job_id]} has started"
            for job_id in offered if job_id in preempted_by}


def _explained(row: JobRow, reason: str, draining: Sequence[str]) -> str:
    """The scheduler's reason with what it cannot know: why the job was requeued, which nodes it
    was not offered because they drain."""
    if draining:
        reason += f" ({', '.join(draining)} {'is' if len(draining) == 1 else 'are'} draining)"
    return f"requeued: {row.requeued_because}; {reason}" if row.requeued_because else reason


def _preemption(rows: Mapping[int, JobRow], requests: Mapping[int, JobRequest], decision: Decision, active: Active,
                launches: Sequence[tuple[JobRow, Placement]], now: float) -> Preemption | None:
    """Stop preemptible jobs (those placed this pass among them) for the first waiting job, by
    score, that stopping them lets start."""
    if not decision.reasons or active.stopping:
        return None
    placed = tuple(Candidate(row.id, row.spec.priority, now, placement.hosts)
                   for row, placement in launches if row.spec.preemptible)
    candidates = active.candidates + placed
    if not candidates:
        return None
    for job_id in sorted(decision.reasons, key=lambda job: -requests[job].priority if job in requests else 0):
        row, request = rows[job_id], requests.get(job_id)
        if request is None or job_id in decision.over_limit:
            continue
        chosen = victims(request, row.spec.priority, decision.free_after, candidates)
        if chosen:
            return Preemption(row, chosen)
    return None
