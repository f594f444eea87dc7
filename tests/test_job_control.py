"""The job lifecycle in milliseconds: `JobControl` against a real SQLite store, a fake clock and a
send that records, with registry entries standing in for connected agents.

The real-process tests (test_cluster, test_trust) prove the same paths end to end; these pin every
transition and reason, including the ones that are slow or hard to provoke with real processes
(time limits, fence deadlines, a coordinator restarted between launch and start).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gpudeck.agent.launchers import rank_variables
from gpudeck.coordinator.jobs import JobControl
from gpudeck.coordinator.lifecycle import FENCE_DEADLINE
from gpudeck.coordinator.registry import DOWN_AFTER, SUSPECT_AFTER, AgentLink, Registry
from gpudeck.coordinator.store import JobRow, Store
from gpudeck.coordinator.views import node_view
from gpudeck.model import IllegalTransition, JobSpec, JobState, NodeState, RunSpec
from gpudeck.protocol.messages import Message
from gpudeck.protocol.node_messages import Forget, Kill, Launch
from gpudeck.protocol.payloads import GpuReading, JobReport

PORTS = (31000, 31009)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Deck:
    """JobControl with everything it talks to, and helpers to act as the agents."""

    def __init__(self, path: Path, nodes: dict[str, int]) -> None:
        self.path = path
        self.clock = Clock()
        self.sent: list[tuple[str, Message]] = []
        self.registry = Registry()
        self.store = Store(path)
        for name, gpus in nodes.items():
            self.join(name, gpus)
        self.control = JobControl(self.store, self.registry, self.send, self.clock, PORTS)

    def send(self, node: str, message: Message) -> bool:
        if self.registry.link(node) is None:
            return False
        self.sent.append((node, message))
        return True

    def join(self, name: str, gpus: int) -> None:
        readings = [gpu_reading(index) for index in range(gpus)]
        self.registry.attach(AgentLink(name=name, hostname=name, address=f"10.0.0.{len(self.registry.links) + 1}",
                                       simulated=True, conn=None, gpus=readings, last_seen=self.clock()))  # type: ignore[arg-type]
        self.registry.states[name] = NodeState.UP
        self.store.upsert_node(name, name, f"10.0.0.{len(self.registry.links)}", True, readings, self.clock())

    def restart(self) -> None:
        """A new coordinator on the same file: nothing of the old one's memory survives."""
        self.store.close()
        self.store = Store(self.path)
        self.control = JobControl(self.store, self.registry, self.send, self.clock, PORTS)

    def submit(self, owner: str = "ada", **fields: Any) -> int:
        return self.control.submit(JobSpec(name="job", run=RunSpec(workload="data-parallel"), **fields), owner).id

    def job(self, job_id: int) -> JobRow:
        row = self.store.job(job_id)
        assert row is not None
        return row

    def taken(self, kind: type[Message]) -> list[tuple[str, Any]]:
        """The messages of one kind sent since the last call, as (node, message)."""
        found = [(node, m) for node, m in self.sent if isinstance(m, kind)]
        self.sent = [(node, m) for node, m in self.sent if not isinstance(m, kind)]
        return found

    def start_all(self, job_id: int) -> None:
        row = self.job(job_id)
        for node, _ in row.hosts:
            self.control.lifecycle.started(node, job_id, row.attempt)


def gpu_reading(index: int) -> GpuReading:
    return GpuReading(index=index, name="Simulated GPU", uuid=f"SIM-{index}", memory_total=1, memory_used=0,
                      utilization=0, temperature=30, power=1.0, power_limit=2.0)


@pytest.fixture
def deck(tmp_path: Path) -> Deck:
    return Deck(tmp_path / "gpudeck.db", {"node-a": 2, "node-b": 2})


def test_submit_place_launch_start_and_succeed(deck: Deck):
    job = deck.submit(nodes=2, gpus_per_node=2)
    assert deck.job(job).state is JobState.PENDING
    deck.control.schedule()
    row = deck.job(job)
    assert row.state is JobState.STARTING and row.attempt == 1
    launches = deck.taken(Launch)
    assert sorted((node, m.node_rank, m.nnodes, m.gpus) for node, m in launches) == [
        ("node-a", 0, 2, [0, 1]), ("node-b", 1, 2, [0, 1])]
    assert {m.master_addr for _, m in launches} == {"10.0.0.1"} and PORTS[0] <= launches[0][1].master_port <= PORTS[1]
    deck.control.lifecycle.started("node-a", job, 1)
    assert deck.job(job).state is JobState.STARTING, "running only once every node started"
    deck.control.lifecycle.started("node-b", job, 1)
    deck.control.lifecycle.started("node-b", job, 1)  # repeated after a reconnect: no second transition
    assert deck.job(job).state is JobState.RUNNING
    deck.control.lifecycle.exited("node-a", job, 1, 0, "")
    assert deck.job(job).state is JobState.RUNNING
    deck.control.lifecycle.exited("node-b", job, 1, 0, "")
    assert deck.job(job).state is JobState.SUCCEEDED and deck.job(job).exit_code == 0
    assert sorted(node for node, _ in deck.taken(Forget)) == ["node-a", "node-b"]


def test_a_failing_rank_fails_the_job_names_it_and_stops_the_others(deck: Deck):
    job = deck.submit(nodes=2, gpus_per_node=1)
    deck.control.schedule()
    deck.start_all(job)
    deck.control.lifecycle.exited("node-b", job, 1, 3, "rank 1 exited with code 3", failed_at=deck.clock.now - 1)
    row = deck.job(job)
    assert row.state is JobState.FAILED and row.exit_code == 3
    assert row.reason == "rank 1 on node-b failed first: it exited with code 3"
    assert [node for node, _ in deck.taken(Kill)] == ["node-a"]
    deck.control.lifecycle.exited("node-a", job, 1, 1, "rank 0 exited with code 1", failed_at=deck.clock.now - 5)
    assert deck.job(job).reason == "rank 0 on node-a failed first: it exited with code 1", \
        "the failure that happened first is the job's, whichever report came first"


def test_gpus_split_unevenly_over_nodes_number_the_ranks_node_by_node(tmp_path: Path):
    deck = Deck(tmp_path / "gpudeck.db", {"node-a": 2, "node-b": 1})
    job = deck.submit(gpus=3)
    deck.control.schedule()
    launches = sorted((m.node_rank, len(m.gpus), m.first_rank, m.world_size) for _, m in deck.taken(Launch))
    assert launches == [(0, 2, 0, 3), (1, 1, 2, 3)], launches
    deck.restart()
    deck.control.launcher.send_launch(job, 1, "node-b")  # resent after a reconnect: the same numbering
    ((_, again),) = deck.taken(Launch)
    variables = [rank_variables(again, 0, {})]
    assert (variables[0]["RANK"], variables[0]["WORLD_SIZE"], variables[0]["LOCAL_WORLD_SIZE"]) == ("2", "3", "1")


def test_a_taken_rendezvous_port_places_the_job_again(deck: Deck):
    job = deck.submit(nodes=2, gpus_per_node=1)
    deck.control.schedule()
    deck.taken(Launch)
    deck.control.lifecycle.exited("node-a", job, 1, 1, "port 31000 is taken", retry=True)
    row = deck.job(job)
    assert row.state is JobState.PENDING and row.reason == "placing it again: port 31000 is taken"
    assert [node for node, _ in deck.taken(Kill)] == ["node-b"]
    deck.control.lifecycle.exited("node-b", job, 1, -15, "killed")
    deck.control.schedule()
    assert deck.job(job).attempt == 2 and len(deck.taken(Launch)) == 2


def _lose(deck: Deck, node: str) -> None:
    """The node stops answering until it is judged down; the others keep their heartbeat."""
    if node in deck.registry.links:
        deck.registry.detach(deck.registry.links[node])
    deck.clock.now += DOWN_AFTER
    for name in deck.registry.links:
        deck.registry.heard(name, deck.clock.now)
    for name, state in deck.registry.tick(deck.clock.now):
        if state is NodeState.DOWN:
            deck.control.lifecycle.node_down(name)


def test_a_lost_node_requeues_the_job_and_fences_its_gpus(deck: Deck):
    job = deck.submit(gpus=2, max_restarts=1)
    deck.control.schedule()
    node = deck.job(job).hosts[0][0]
    deck.start_all(job)
    deck.taken(Launch)
    _lose(deck, node)
    row = deck.job(job)
    assert row.state is JobState.PENDING and row.restarts == 1
    assert row.reason == f"requeued: node {node} stopped answering (restart 1 of 1)"
    other = "node-b" if node == "node-a" else "node-a"
    deck.control.schedule()
    assert deck.job(job).hosts[0][0] == other, "placed on the node that still answers"
    assert deck.job(job).attempt == 2


def test_fenced_gpus_wait_for_the_node_or_the_fence_deadline(tmp_path: Path):
    deck = Deck(tmp_path / "gpudeck.db", {"node-a": 1})
    first = deck.submit(gpus=1, max_restarts=1)
    deck.control.schedule()
    deck.start_all(first)
    _lose(deck, "node-a")
    deck.join("node-a", 1)  # back, but it has not said its old ranks are gone
    second = deck.submit(gpus=1)
    deck.control.schedule()
    assert deck.job(second).state is JobState.PENDING
    assert "stay reserved until node-a confirms that job 1's ranks have stopped" in deck.job(second).reason
    deck.clock.now += FENCE_DEADLINE
    deck.control.schedule()
    assert {deck.job(first).state, deck.job(second).state} == {JobState.STARTING, JobState.PENDING}


def test_a_lost_node_without_restarts_fails_the_job(deck: Deck):
    job = deck.submit(nodes=2, gpus_per_node=1)
    deck.control.schedule()
    deck.start_all(job)
    _lose(deck, "node-b")
    row = deck.job(job)
    assert row.state is JobState.FAILED and row.reason == "node node-b stopped answering"
    assert [node for node, _ in deck.taken(Kill)] == ["node-a"]


def test_a_rank_that_fails_after_its_peer_node_went_silent_requeues_the_job(deck: Deck):
    """A peer's machine dies: the surviving ranks see their sockets close and exit with an error
    seconds before the node is judged down. That failure is the node's loss, not the job's."""
    job = deck.submit(nodes=2, gpus_per_node=1, max_restarts=1)
    deck.control.schedule()
    deck.start_all(job)
    deck.registry.detach(deck.registry.links["node-b"])
    deck.clock.now += 1
    deck.registry.tick(deck.clock.now)
    deck.control.lifecycle.exited("node-a", job, 1, 1, "rank 0 exited with code 1", failed_at=deck.clock.now)
    row = deck.job(job)
    assert row.state is JobState.PENDING and row.restarts == 1, row
    assert row.reason == "requeued: node node-b stopped answering (restart 1 of 1)"
    _lose(deck, "node-b")
    assert deck.job(job).restarts == 1, "the node's loss, once judged, spends no second restart"
    deck.join("node-b", 1)
    deck.control.schedule()
    assert deck.job(job).state is JobState.PENDING, "node-b's GPU stays fenced until it says its ranks ended"
    deck.control.lifecycle.reconcile("node-b", [JobReport(job=job, attempt=1, exit_code=-9, detail="killed")])
    deck.control.schedule()
    assert deck.job(job).state is JobState.STARTING and deck.job(job).attempt == 2


def test_a_failure_while_every_peer_answers_is_the_jobs_own(deck: Deck):
    job = deck.submit(nodes=2, gpus_per_node=1, max_restarts=1)
    deck.control.schedule()
    deck.start_all(job)
    deck.control.lifecycle.exited("node-a", job, 1, 1, "rank 0 exited with code 1")
    assert deck.job(job).state is JobState.FAILED and deck.job(job).restarts == 0


def test_the_time_limit_fails_a_running_job(deck: Deck):
    job = deck.submit(gpus=1, time_limit=60)
    deck.control.schedule()
    deck.start_all(job)
    deck.clock.now += 59
    deck.control.lifecycle.enforce_time_limits()
    assert deck.job(job).state is JobState.RUNNING
    deck.clock.now += 2
    deck.control.lifecycle.enforce_time_limits()
    assert deck.job(job).state is JobState.FAILED and deck.job(job).reason == "ran past its time limit of 1m00s"
    assert len(deck.taken(Kill)) == 1


def test_cancel_pending_running_and_finished(deck: Deck):
    waiting = deck.submit(gpus=4)
    deck.control.schedule()
    running = deck.submit(gpus=1)
    deck.control.schedule()
    assert deck.job(waiting).state is JobState.STARTING and deck.job(running).state is JobState.PENDING
    deck.control.lifecycle.cancel(running)
    assert deck.job(running).state is JobState.CANCELLED and not deck.taken(Kill)
    deck.control.lifecycle.cancel(waiting)
    assert deck.job(waiting).reason == "cancelled by a user" and len(deck.taken(Kill)) == 2
    with pytest.raises(ValueError, match="already cancelled; nothing to cancel"):
        deck.control.lifecycle.cancel(waiting)
    with pytest.raises(LookupError, match="there is no job 99"):
        deck.control.lifecycle.cancel(99)


def test_a_restarted_coordinator_adopts_running_ranks_and_resends_lost_launches(deck: Deck):
    running = deck.submit(gpus=2)
    deck.control.schedule()
    deck.start_all(running)
    unstarted = deck.submit(gpus=2)
    deck.control.schedule()
    deck.taken(Launch)
    deck.restart()
    ran_on = deck.job(running).hosts[0][0]
    waits_on = deck.job(unstarted).hosts[0][0]
    deck.control.lifecycle.reconcile(ran_on, [JobReport(job=running, attempt=1)])
    deck.control.lifecycle.reconcile(waits_on, [])
    assert deck.job(running).state is JobState.RUNNING and not deck.taken(Kill)
    assert [(node, m.job) for node, m in deck.taken(Launch)] == [(waits_on, unstarted)], \
        "a launch the agent never received is sent again"
    deck.control.lifecycle.reconcile(waits_on, [JobReport(job=77, attempt=3)])
    assert [(node, m.job) for node, m in deck.taken(Kill)] == [(waits_on, 77)], "ranks nobody wants are killed"


def test_an_agent_that_restarted_lost_its_ranks(deck: Deck):
    job = deck.submit(gpus=2)
    deck.control.schedule()
    deck.start_all(job)
    node = deck.job(job).hosts[0][0]
    deck.control.lifecycle.reconcile(node, [])
    assert deck.job(job).state is JobState.FAILED
    assert deck.job(job).reason == f"{node} no longer runs its ranks (its agent restarted)"


def test_the_store_refuses_a_transition_the_table_does_not_have(deck: Deck):
    job = deck.submit(gpus=1)
    deck.control.lifecycle.cancel(job)
    with pytest.raises(IllegalTransition, match="cannot go from cancelled to running"):
        deck.store.transition(job, JobState.RUNNING)
    assert deck.job(job).state is JobState.CANCELLED, "nothing was written"


def test_registry_suspect_then_down_then_up_again():
    registry = Registry()
    link = AgentLink(name="n", hostname="n", address="a", simulated=True, conn=None, gpus=[], last_seen=0.0)  # type: ignore[arg-type]
    registry.attach(link)
    registry.states["n"] = NodeState.UP
    assert registry.tick(SUSPECT_AFTER - 0.1) == []
    assert registry.tick(SUSPECT_AFTER) == [("n", NodeState.SUSPECT)]
    registry.heard("n", SUSPECT_AFTER + 1)
    assert registry.tick(SUSPECT_AFTER + 1) == [("n", NodeState.UP)]
    registry.detach(link)
    assert registry.tick(SUSPECT_AFTER + 1.5) == [("n", NodeState.SUSPECT)], "a closed connection is suspect at once"
    assert registry.tick(SUSPECT_AFTER + 1 + DOWN_AFTER) == [("n", NodeState.DOWN)]
    assert registry.tick(10_000) == [], "down stays down without a new connection"
    registry.attach(AgentLink(name="n", hostname="n", address="a", simulated=True, conn=None, gpus=[],  # type: ignore[arg-type]
                              last_seen=10_001))
    assert registry.tick(10_001) == [("n", NodeState.UP)]


def test_a_down_node_shows_the_age_of_its_last_heartbeat(deck: Deck):
    """Judged down, a node is still shown with how long ago it was last heard (not since it joined)."""
    deck.clock.now += 400
    deck.registry.heard("node-b", deck.clock.now)
    _lose(deck, "node-b")
    deck.clock.now += 30
    row = next(n for n in deck.store.nodes() if n.name == "node-b")
    view = node_view(row, deck.registry, [], deck.clock.now)
    assert view.state == "down" and view.last_heartbeat_age == DOWN_AFTER + 30, view


def test_a_pass_with_nothing_freed_schedules_only_new_jobs_and_reasons_stay_true(tmp_path: Path):
    deck = Deck(tmp_path / "gpudeck.db", {"node-a": 2})
    first = deck.submit(gpus=1)
    assert deck.control.schedule() == "full"
    big = deck.submit(gpus=2)
    assert deck.control.schedule() == "full", "the first placement took a GPU"
    assert deck.job(big).reason == ("needs 2 GPUs; 1 is free on 1 node (node-a 1); it is next in line and starts "
                                    "when job 1 ends")
    assert deck.control.schedule() == "none"
    unbounded = deck.submit(gpus=1)
    assert deck.control.schedule() == "new jobs"
    assert deck.job(unbounded).state is JobState.PENDING, "with no time limit it could delay the reserved job"
    assert deck.job(unbounded).reason.startswith(f"waits for job {big}, which is next in line")
    small = deck.submit(gpus=1, time_limit=60)
    assert deck.control.schedule() == "new jobs"
    assert deck.job(small).state is JobState.STARTING, "a new job that ends before the reservation starts at once"
    assert deck.control.schedule() == "full", "its placement took a GPU: every reason is due again"
    assert deck.job(big).reason == ("needs 2 GPUs; none are free; it is next in line and starts when jobs 1 and "
                                    f"{small} end")
    deck.start_all(first)
    deck.control.lifecycle.exited("node-a", first, 1, 0, "")
    assert deck.control.schedule() == "full", "a GPU was freed"
    assert deck.job(big).reason == (f"needs 2 GPUs; 1 is free on 1 node (node-a 1); it is next in line and starts "
                                    f"when job {small} ends")


# --- dependencies and arrays (the gate's policy: test_dependencies) ------------------------------------


def test_a_pending_dependency_cancelled_fails_the_chain_waiting_for_it_on_the_next_pass(tmp_path: Path):
    deck = Deck(tmp_path / "gpudeck.db", {"node-a": 1})
    running = deck.submit(gpus=1)
    deck.submit(gpus=1)  # next in line: the GPU is reserved for it, not for the job that is cancelled
    held = deck.submit(gpus=1)
    waits = deck.submit(gpus=1, after=[str(held)])
    then = deck.submit(gpus=1, after=[str(waits)])
    deck.control.schedule()
    assert deck.job(running).state is JobState.STARTING and deck.job(waits).reason == f"waits for job {held} to succeed"
    deck.control.schedule()  # the pass after a placement is a full one
    assert deck.control.schedule() == "none", "nothing changed since"
    deck.control.lifecycle.cancel(held)  # frees no GPU: nothing else tells the next pass to look at the waiting jobs
    deck.control.schedule()
    assert (deck.job(waits).state, deck.job(waits).reason) == (
        JobState.FAILED, f"job {held} was cancelled, and this job was to run after it succeeded")
    assert (deck.job(then).state, deck.job(then).reason) == (
        JobState.FAILED, f"job {waits} failed, and this job was to run after it succeeded"), "in the same pass"


def test_array_tasks_launch_with_their_index_one_at_a_time_under_a_throttle_of_one(deck: Deck):
    array = deck.submit(gpus=1, array="3,5-6%1")
    assert [(row.array_job, row.array_index) for row in deck.store.jobs()] == [(array, 3), (array, 5), (array, 6)]
    for index in (3, 5, 6):
        deck.control.schedule()
        (node, launch), = deck.taken(Launch)
        assert (launch.array_job, launch.array_index) == (array, index)
        task = deck.store.task(array, index)
        assert task is not None
        deck.start_all(task.id)
        deck.control.schedule()
        assert deck.taken(Launch) == [], "the throttle holds the others back while one runs"
        deck.control.lifecycle.exited(node, task.id, 1, 0, "")
    assert {row.state for row in deck.store.jobs()} == {JobState.SUCCEEDED}


def test_after_an_arrays_id_waits_for_every_task_and_after_a_task_for_that_one(deck: Deck):
    array = deck.submit(gpus=1, array="0-1")
    whole = deck.submit(gpus=1, after=[str(array)])
    first = deck.submit(gpus=1, after=[f"{array}.0"])
    deck.control.schedule()
    assert deck.job(whole).reason == f"waits for array {array} to succeed"
    assert deck.job(first).reason == f"waits for job {array}.0 to succeed"
    for index, code in ((0, 0), (1, 3)):
        task = deck.store.task(array, index)
        assert task is not None
        deck.start_all(task.id)
        deck.control.lifecycle.exited(task.hosts[0][0], task.id, 1, code, "rank 0 exited with code 3" if code else "")
    deck.control.schedule()
    assert (deck.job(whole).state, deck.job(whole).reason) == (
        JobState.FAILED, f"array {array} had 1 failed task, and this job was to run after it succeeded")
    assert deck.job(first).state is JobState.STARTING, "task 0 alone succeeded, and that was all it waited for"


def test_the_doctor_check_launches_one_rank_per_node_beside_full_gpus_one_check_at_a_time(deck: Deck):
    holder = deck.submit(nodes=2, gpus_per_node=2)
    with pytest.raises(ValueError, match="ghost is not a node of this cluster that is up"):
        deck.control.submit(JobSpec(name="doctor", run=RunSpec(workload="doctor"), on_nodes=["ghost"]), "bob")
    check = deck.control.submit(JobSpec(name="doctor", run=RunSpec(workload="doctor"),
                                                on_nodes=["node-b", "node-a"]), "ada")
    assert check.spec.run.args == ["--nodes", "node-a,node-b", "--job-ports", f"{PORTS[0]}-{PORTS[1]}"]
    with pytest.raises(ValueError, match=f"already running as job {check.id}"):
        deck.control.submit(JobSpec(name="doctor", run=RunSpec(workload="doctor"), on_nodes=["node-a"]), "bob")
    deck.control.schedule()
    assert deck.job(holder).state is JobState.STARTING and deck.job(check.id).state is JobState.STARTING
    launches = sorted((node, m.gpus, m.node_rank, m.first_rank, m.world_size) for node, m in deck.taken(Launch)
                      if m.job == check.id)
    assert launches == [("node-a", [], 0, 0, 2), ("node-b", [], 1, 1, 2)]
    deck.restart()  # the stored check reads back as valid, the coordinator's own arguments included
    assert deck.job(check.id).spec.on_nodes == ["node-b", "node-a"]
