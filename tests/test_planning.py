"""The scheduling pass's decision from plain values: `planning.plan` reads a `View` and returns a
`Plan`, with no store, no sends and no clock, so a pass can be decided off the event loop.

`tests/test_job_control.py` pins what applying a plan does to jobs; these pin that deciding does
nothing, and that every step's verdict is in the plan.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

from gpudeck.coordinator.dependencies import Upstream
from gpudeck.coordinator.planning import Active, Cluster, Preemption, Scores, View, plan
from gpudeck.coordinator.preemption import Candidate
from gpudeck.coordinator.priority import Policy
from gpudeck.coordinator.scheduler import GpuSlot, NodeSlots
from gpudeck.coordinator.store import JobRow
from gpudeck.model import JobSpec, JobState, RunSpec

NOW = 1_000_000.0


def row(job_id: int, **spec: Any) -> JobRow:
    return JobRow(id=job_id, spec=JobSpec(name="job", run=RunSpec(workload="data-parallel"), **spec),
                  state=JobState.PENDING, reason="",
                  submitted_at=NOW - 100 + job_id, started_at=None, ended_at=None, attempt=0, exit_code=None,
                  restarts=0, requeued_because="", failed_at=None, hosts=[], owner="ada")


def view(pending: list[JobRow], upstream: dict[str, Upstream] | None = None, free: int = 2,
         candidates: tuple[Candidate, ...] = (), preempted_by: dict[int, int] | None = None) -> View:
    slots = (NodeSlots("node-a", tuple(GpuSlot(index=i, busy_job=None if i < free else 99) for i in range(2))),)
    cluster = Cluster(slots, (), {}, ("node-c",), "", NOW, 600.0)
    active = Active({}, candidates, False, preempted_by or {})
    return View(pending, upstream or {}, cluster, active, Scores(Policy(), {}, NOW), {})


def test_a_plan_holds_every_verdict_and_changes_nothing_it_was_given():
    pending = [row(1, gpus=1), row(2, gpus=2, after=["7"]), row(3, gpus=1, after=["8"]), row(4, gpus=2),
               row(5, gpus=1)]
    upstream = {"7": Upstream("job 7", {"failed": 1}), "8": Upstream("job 8", {"running": 1})}
    given = view(pending, upstream, preempted_by={5: 4})
    before = copy.deepcopy(given)
    planned = plan(given)
    assert given == before, "deciding writes nothing"
    assert planned.failed == {2: "job 7 failed, and this job was to run after it succeeded"}
    assert planned.reasons[3] == "waits for job 8 to succeed"
    assert planned.reasons[5] == "preempted by job 4; it waits until job 4 has started"
    assert [(placed.job_id, placed.hosts) for _, placed in planned.launches] == [(1, (("node-a", (0,)),))]
    assert planned.reasons[4].endswith("(node-c is draining)"), "the scheduler's reason, explained"
    assert planned.reserved == 4 and set(planned.requests) == {1, 4}
    assert plan(given) == planned, "the same view gives the same plan"


def test_a_waiting_job_of_higher_priority_plans_its_victims():
    victim = Candidate(9, priority=0, started_at=NOW - 60, hosts=(("node-a", (0, 1)),))
    urgent = row(1, gpus=2, priority=10)
    planned = plan(view([urgent], free=0, candidates=(victim,)))
    assert planned.preemption == Preemption(urgent, (9,))
    given = view([urgent], free=0, candidates=(victim,))
    stopping = replace(given, active=replace(given.active, stopping=True))
    assert plan(stopping).preemption is None, "none while jobs stopped for an earlier one still hold GPUs"
