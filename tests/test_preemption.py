"""Preemption (issue 13): properties of the pure choice of the jobs to stop, and a preempted built-in
workload through real coordinator and agent processes, resuming where it was stopped."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpudeck.coordinator.preemption import Candidate, victims
from gpudeck.coordinator.scheduler import JobRequest, place
from gpudeck.model import JobState
from gpudeck.protocol.node_messages import Kill
from tests.test_job_control import Deck
from tests.cluster import Cluster, wait_until

NODES = ("a", "b", "c")


@st.composite
def cluster(draw: st.DrawFn) -> tuple[dict[str, tuple[int, ...]], list[Candidate]]:
    """Nodes of 4 GPUs, each GPU free or held by one of a few running jobs."""
    free: dict[str, list[int]] = {name: [] for name in NODES}
    held: dict[int, list[tuple[str, int]]] = {}
    for name in NODES:
        for index in range(4):
            holder = draw(st.integers(0, 4))  # 0: free
            if holder:
                held.setdefault(holder, []).append((name, index))
            else:
                free[name].append(index)
    running = []
    for job_id, gpus in held.items():
        hosts: dict[str, list[int]] = {}
        for name, index in gpus:
            hosts.setdefault(name, []).append(index)
        running.append(Candidate(job_id, draw(st.integers(-2, 2)), draw(st.floats(0, 100)),
                                 tuple((name, tuple(indices)) for name, indices in sorted(hosts.items()))))
    return {name: tuple(indices) for name, indices in free.items()}, running


requests = st.one_of(st.builds(lambda g: JobRequest(99, gpus=g), st.integers(1, 12)),
                     st.builds(lambda n, g: JobRequest(99, nodes=n, gpus_per_node=g), st.integers(1, 3),
                               st.integers(1, 4)))


def freed(free: dict[str, tuple[int, ...]], stopped: list[Candidate]) -> dict[str, tuple[int, ...]]:
    after = {name: set(indices) for name, indices in free.items()}
    for job in stopped:
        for name, indices in job.hosts:
            after[name].update(indices)
    return {name: tuple(sorted(indices)) for name, indices in after.items()}


@settings(max_examples=300, deadline=None)
@given(cluster(), requests, st.integers(-2, 3))
def test_victims_make_the_job_fit_have_lower_priority_and_are_all_needed(state, request, priority):
    free, running = state
    chosen = victims(request, priority, free, running)
    by_id = {job.job_id: job for job in running}
    stopped = [by_id[job_id] for job_id in chosen]
    if place(request, free) is not None:
        assert chosen == (), "a job that fits on the free GPUs stops nobody"
        return
    lower = [job for job in running if job.priority < priority]
    if not chosen:
        assert place(request, freed(free, lower)) is None, "nobody stopped although stopping would make it fit"
        return
    assert all(job.priority < priority for job in stopped)
    assert place(request, freed(free, stopped)) is not None
    for spared in stopped:
        assert place(request, freed(free, [j for j in stopped if j is not spared])) is None, f"{spared} not needed"


def test_the_lowest_priority_and_latest_started_go_first():
    free: dict[str, tuple[int, ...]] = {"a": ()}
    old = Candidate(1, 0, started_at=10.0, hosts=(("a", (0,)),))
    new = Candidate(2, 0, started_at=50.0, hosts=(("a", (1,)),))
    low = Candidate(3, -5, started_at=5.0, hosts=(("a", (2,)),))
    assert victims(JobRequest(9, gpus=1), 1, free, [old, new, low]) == (3,)
    assert victims(JobRequest(9, gpus=2), 1, free, [old, new, low]) == (2, 3)
    assert victims(JobRequest(9, gpus=1), 0, free, [old, new]) == (), "equal priority stops nobody"


def _final_model(folder: Path) -> dict[str, torch.Tensor]:
    """The model in a data-parallel job's checkpoint of its last step, on its node."""
    last = max(folder.glob("*-model-*.pt"), key=lambda path: path.name)
    return torch.load(last, map_location="cpu", weights_only=True)["state"]["model"]


def test_a_preempted_workload_resumes_from_its_checkpoint_and_ends_as_if_never_stopped(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    cluster.start_coordinator("--preempt-grace", "20s")
    cluster.start_agent("node-a", 2)
    try:
        cluster.wait_nodes("up", 1)
        steps = ["--steps", "400", "--checkpoint-every", "1000", "--dtype", "float64", "--log-every", "10"]
        low = cluster.submit("--gpus", "2", "--preemptible", "--workload", "data-parallel", *steps,
                             "--step-sleep", "0.02")
        wait_until(lambda: "step 20 loss" in cluster.cli("logs", str(low)).stdout, 120, "the low job at step 20")
        high = cluster.submit("--gpus", "2", "--priority", "10", "--no-project", "--", "sh", "-c",
                              "echo grace=${GPUDECK_PREEMPT_GRACE:-none}")
        stopped = cluster.wait_job(low, ("pending",))
        assert f"preempted by job {high}" in stopped["reason"], stopped
        assert cluster.wait_job(high, ("succeeded", "failed"))["state"] == "succeeded"
        assert "grace=none" in cluster.cli("logs", str(high)).stdout, "only preemptible jobs are told a grace"
        done = cluster.wait_job(low, ("succeeded", "failed"), timeout=180)
        assert done["state"] == "succeeded" and done["attempt"] == 2 and done["restarts"] == 0, done
        first = cluster.cli("logs", str(low), "--attempt", "1").stdout
        saved = re.search(r"saved the checkpoint of step (\d+)", first)
        assert saved and "as asked (SIGTERM)" in first, first
        second = cluster.cli("logs", str(low)).stdout
        assert f"resuming from the checkpoint of step {saved[1]}" in second, second
        told = cluster.submit("--preemptible", "--no-project", "--", "sh", "-c", "echo grace=$GPUDECK_PREEMPT_GRACE")
        cluster.wait_job(told, ("succeeded",))
        assert "grace=20" in cluster.cli("logs", str(told)).stdout
        plain = cluster.submit("--gpus", "2", "--workload", "data-parallel", *steps)
        assert cluster.wait_job(plain, ("succeeded", "failed"), timeout=180)["state"] == "succeeded"
        checkpoints = tmp_path / "node-a" / "checkpoints"
        resumed, uninterrupted = _final_model(checkpoints / str(low)), _final_model(checkpoints / str(plain))
        assert all(torch.equal(resumed[name], uninterrupted[name]) for name in uninterrupted)
    finally:
        cluster.stop()


def test_a_preempted_job_waits_for_the_job_it_was_stopped_for_and_nobody_is_stopped_twice(tmp_path: Path) -> None:
    """bob's preemptible job is stopped for ada's of higher --priority. When its ranks have ended,
    bob's job does not take its GPUs back, although bob's fair share (nothing used) may score higher;
    ada's starts there, and bob's starts after it. While bob's ranks stop, nothing more is stopped."""
    deck = Deck(tmp_path / "db", {"node-a": 2})
    past = deck.submit(owner="ada", gpus=2)  # ada has used the cluster for an hour, bob not at all
    deck.control.schedule()
    deck.start_all(past)
    deck.clock.now += 3600
    deck.control.lifecycle.exited("node-a", past, 1, 0, "")
    low = deck.submit(owner="bob", gpus=2, preemptible=True)
    deck.control.schedule()
    deck.start_all(low)
    high = deck.submit(owner="ada", gpus=2, priority=5)
    other = deck.submit(owner="ada", gpus=1, priority=5)
    deck.taken(Kill)
    deck.control.schedule()
    kills = deck.taken(Kill)
    assert [(m.job, m.grace) for _, m in kills] == [(low, 30.0)]
    row = deck.job(low)
    assert row.state is JobState.PENDING and row.restarts == 0 and f"preempted by job {high}" in row.reason
    deck.clock.now += 1
    deck.control.schedule()
    assert deck.taken(Kill) == [], "no second job is stopped while the first one's ranks stop"
    deck.control.lifecycle.exited("node-a", low, 1, 143, "rank 0 was stopped by SIGTERM")
    deck.clock.now += 10  # priorities are scored again: bob's share beats ada's higher --priority
    deck.control.schedule()
    assert deck.job(high).state is JobState.STARTING and deck.job(low).state is JobState.PENDING
    assert f"waits until job {high} has started" in deck.job(low).reason
    assert deck.job(other).state is JobState.PENDING
