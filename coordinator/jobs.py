"""The life of jobs: submit, place, launch, follow, end, requeue.

This is where the `JobState` transitions of `gpudeck.model` happen. Every change is stored before
anything is sent, so a coordinator killed at any point restarts into a state the agents' reports can
be reconciled with: a launch the agent never received is sent again, a launch it did receive is a
no-op the second time, and ranks of an attempt the coordinator no longer wants are killed.
"""

from __future__ import annotations

import logging
import random
import re
from typing import Callable

from gpudeck.coordinator.registry import Registry
from gpudeck.coordinator.scheduler import GpuSlot, JobRequest, NodeSlots, Placement, impossible_reason, schedule, validate_request
from gpudeck.coordinator.store import AttemptNode, JobRow, Store
from gpudeck.model import WORKLOADS, JobSpec, JobState, NodeState, format_duration
from gpudeck.protocol.messages import Forget, Kill, Launch, Message
from gpudeck.protocol.payloads import GpuReading, JobReport

log = logging.getLogger(__name__)
_RANK_DETAIL = re.compile(r"^rank (\d+) (.+)$")
JOB_PORTS = (29500, 29999)  # the rendezvous ports, first and last; the firewall must open them
FENCE_DEADLINE = 120.0  # longest a lost node's GPUs wait for it to confirm its ranks are gone

MAX_REASON = 300  # characters of a node's word on what it is doing
Send = Callable[[str, Message], bool]  # queues the message for a node; never waits on it


def request_of(row: JobRow) -> JobRequest:
    spec = row.spec
    return JobRequest(job_id=row.id, priority=spec.priority, gpus=spec.gpus, nodes=spec.nodes,
                      gpus_per_node=spec.gpus_per_node)


def _gpu_slot(gpu: GpuReading, busy: dict[int, int]) -> GpuSlot:
    foreign = [p for p in gpu.processes if p.foreign]
    described = f"{foreign[0].name or 'process'} pid {foreign[0].pid}" if foreign else None
    return GpuSlot(index=gpu.index, busy_job=busy.get(gpu.index), foreign=described)


def _launch_order(job_id: int, attempt: int, node_rank: int, shape: list[int], gpus: list[int], master_addr: str,
                  master_port: int, spec: JobSpec, script: bytes) -> Launch:
    """`shape`: how many GPUs (ranks) each node holds, in node-rank order; ranks go node by node."""
    return Launch(job=job_id, attempt=attempt, node_rank=node_rank, nnodes=len(shape), gpus=gpus,
                  first_rank=sum(shape[:node_rank]), world_size=sum(shape),
                  master_addr=master_addr, master_port=master_port, script_name=spec.script_name, script=script,
                  workload=spec.workload, args=spec.args, workdir=spec.workdir, project=spec.project,
                  subdir=spec.subdir, command=spec.command, env=spec.env, python=spec.python, venv=spec.venv,
                  requirements=spec.requirements, image=spec.image, launcher=spec.launcher)


def _failure(node: str, exit_code: int, detail: str) -> str:
    """Why a job failed, for a person: which rank on which node failed first, and with what."""
    rank = _RANK_DETAIL.match(detail)
    if rank:
        return f"rank {rank.group(1)} on {node} failed first: it {rank.group(2)}"
    return f"ranks on {node} exited with code {exit_code}" + (f": {detail}" if detail else "")


def _explained(row: JobRow, reason: str, draining: list[str]) -> str:
    """The scheduler's reason with what it cannot know: why the job was requeued, which nodes it
    was not offered because they drain."""
    if draining:
        reason += f" ({', '.join(draining)} {'is' if len(draining) == 1 else 'are'} draining)"
    return f"requeued: {row.requeued_because}; {reason}" if row.requeued_because else reason


class JobControl:
    def __init__(self, store: Store, registry: Registry, send: Send, clock: Callable[[], float],
                 job_ports: tuple[int, int] = JOB_PORTS) -> None:
        self.store = store
        self.registry = registry
        self.send = send
        self.clock = clock
        self.job_ports = job_ports
        # What the last scheduling pass saw, so that the next can skip the jobs that already waited.
        self._context: object = None
        self._requests: dict[int, JobRequest] = {}  # a job's request never changes: built once
        self._node_slots: dict[str, tuple[list[GpuReading], dict[int, int], NodeSlots]] = {}

    # --- submit and schedule -------------------------------------------------------------------

    def submit(self, spec: JobSpec, owner: str) -> JobRow:
        """Store `owner`'s job, or raise ValueError with the reason it can never run."""
        spec.check()
        if spec.workload and spec.workload not in WORKLOADS:
            known = ", ".join(sorted(WORKLOADS)) or "none in this version"
            raise ValueError(f"there is no built-in workload {spec.workload!r} (built-in workloads: {known})")
        request = JobRequest(job_id=0, gpus=spec.gpus, nodes=spec.nodes, gpus_per_node=spec.gpus_per_node)
        problem = validate_request(request) or impossible_reason(request, self._capacity())
        if problem:
            raise ValueError(problem)
        return self.store.job(self.store.add_job(spec, self.clock(), owner))  # type: ignore[return-value]

    def _capacity(self) -> list[NodeSlots]:
        """Every node that has ever joined and is not down, all GPUs free: what could ever fit."""
        nodes = []
        for node in self.store.nodes():
            if node.state is NodeState.DOWN:
                continue
            link = self.registry.link(node.name)
            gpus = link.gpus if link else node.gpus
            nodes.append(NodeSlots(node.name, tuple(GpuSlot(index=g.index) for g in gpus)))
        return nodes

    def holding(self) -> list[AttemptNode]:
        """Shares that hold their GPUs: not reported ended, and not fenced past the fence deadline."""
        now = self.clock()
        return [s for s in self.store.open_attempt_nodes() if s.fenced_until is None or s.fenced_until > now]

    def slots(self) -> list[NodeSlots]:
        busy: dict[str, dict[int, int]] = {}
        for share in self.holding():
            for index in share.gpus:
                busy.setdefault(share.node, {})[index] = share.job
        draining = set(self.draining())
        return [self._slots_of(name, link.gpus, busy.get(name, {}))
                for name, link in sorted(self.registry.links.items())
                if self.registry.states.get(name) is NodeState.UP and name not in draining]

    def _slots_of(self, name: str, gpus: list[GpuReading], busy: dict[int, int]) -> NodeSlots:
        """A node's slots, rebuilt only when its readings or its jobs changed (passes come with
        every submit; telemetry once a second)."""
        cached = self._node_slots.get(name)
        if cached is not None and cached[0] is gpus and cached[1] == busy:
            return cached[2]
        slots = NodeSlots(name, tuple(_gpu_slot(g, busy) for g in gpus))
        self._node_slots[name] = (gpus, busy, slots)
        return slots

    def draining(self) -> list[str]:
        return [node.name for node in self.store.nodes() if node.draining and node.state is not NodeState.DOWN]

    def schedule(self) -> str:
        """One scheduling pass; says which kind ("full", "new jobs", "none").

        When what is free is as it was after the last pass (the same slots, draining nodes and fence
        notes), the jobs that waited then still cannot start and their reasons still hold: only jobs
        new to the queue are scheduled. A steady stream of submits to a full cluster then costs what
        the new jobs cost, not what the queue holds; anything that frees or takes a GPU makes the
        next pass a full one."""
        slots, draining, fenced = self.slots(), self.draining(), self._fence_note()
        context = (tuple(slots), tuple(draining), fenced)
        newly = self.store.take_newly_pending()
        if context == self._context:
            kind = "new jobs"
            fresh = [row for job_id in newly if (row := self.store.job(job_id)) and row.state is JobState.PENDING]
        else:
            kind = "full"
            fresh = self.store.jobs((JobState.PENDING,))
            if len(self._requests) > 2 * len(fresh) + 1000:
                self._requests = {}
        self._context = context
        if not fresh:
            return "none"
        requests = []
        for row in fresh:
            if row.id not in self._requests:
                self._requests[row.id] = request_of(row)
            requests.append(self._requests[row.id])
        decision = schedule(slots, requests)
        rows = {row.id: row for row in fresh}
        self.store.set_reasons({job_id: _explained(rows[job_id], reason, draining) + fenced
                                for job_id, reason in decision.reasons.items()})
        for placement in decision.placements:
            self._launch(rows[placement.job_id], placement)
        if decision.placements:
            self._context = None  # GPUs were taken: every waiting job's reason is due again
        return kind

    def _fence_note(self) -> str:
        """What a pending job cannot see in the free GPUs: those of a lost node kept back until it
        confirms the ranks it may still run are gone."""
        now = self.clock()
        notes = [f"GPUs {','.join(map(str, s.gpus))} of {s.node} stay reserved until {s.node} confirms that job "
                 f"{s.job}'s ranks have stopped (at most {s.fenced_until - now:.0f} s more)"
                 for s in self.holding() if s.fenced_until is not None and self.registry.states.get(s.node) is NodeState.UP]
        return "; " + "; ".join(notes) if notes else ""

    def _free_port(self, master_addr: str) -> int | None:
        """A rendezvous port no attempt of ours uses on that address, picked at random so that other
        programs there (another cluster's jobs, a torchrun started by hand on 29500) rarely hold it."""
        used = self.store.open_master_ports(master_addr)
        first, last = self.job_ports
        free = [port for port in range(first, last + 1) if port not in used]
        return random.choice(free) if free else None

    def _launch(self, row: JobRow, placement: Placement) -> None:
        hosts = [(node, list(gpus)) for node, gpus in placement.hosts]
        master = self.registry.links[hosts[0][0]].address
        port = self._free_port(master)
        if port is None:
            first, last = self.job_ports
            self.store.set_reasons({row.id: f"every rendezvous port ({first}-{last}) on {master} is in use by "
                                            "running jobs; it starts when one ends"})
            return
        attempt = row.attempt + 1
        self.store.start_attempt(row.id, attempt, hosts, master, port, self.clock())
        log.info("job %d attempt %d placed on %s", row.id, attempt, ", ".join(n for n, _ in hosts))
        script = self.store.script(row.id)
        for node_rank, (node, gpus) in enumerate(hosts):
            self.send(node, _launch_order(row.id, attempt, node_rank, [len(g) for _, g in hosts], gpus, master, port,
                                          row.spec, script))

    def send_launch(self, job_id: int, attempt: int, node: str) -> None:
        """Send a stored launch again (its agent reconnected without having started it)."""
        row = self.store.job(job_id)
        shares = self.store.attempt_nodes(job_id, attempt)
        share = next((s for s in shares if s.node == node), None)
        if row is None or share is None:
            return
        master_addr, master_port = self.store.master(job_id, attempt)
        shape = [len(s.gpus) for s in sorted(shares, key=lambda s: s.node_rank)]
        self.send(node, _launch_order(job_id, attempt, share.node_rank, shape, share.gpus, master_addr,
                                      master_port, row.spec, self.store.script(job_id)))

    # --- reports from agents -------------------------------------------------------------------

    def _current(self, job_id: int, attempt: int) -> JobRow | None:
        """The job if `attempt` is its current, still active attempt."""
        row = self.store.job(job_id)
        if row is None or row.attempt != attempt or not row.state.active:
            return None
        return row

    def preparing(self, node: str, job_id: int, attempt: int, doing: str) -> None:
        """A node's word on what it does before the attempt can start, as the starting job's reason."""
        row = self._current(job_id, attempt)
        if row is not None and row.state is JobState.STARTING:
            self.store.set_reasons({job_id: doing[:MAX_REASON]})

    def started(self, node: str, job_id: int, attempt: int) -> None:
        row = self._current(job_id, attempt)
        if row is None:
            self.send(node, Kill(job=job_id, attempt=attempt, reason="this attempt is no longer wanted"))
            return
        self.store.mark_started(job_id, attempt, node)
        if row.state is JobState.STARTING and all(s.started for s in self.store.attempt_nodes(job_id, attempt)):
            self.store.transition(job_id, JobState.RUNNING, reason="")

    def exited(self, node: str, job_id: int, attempt: int, exit_code: int, detail: str,
                     retry: bool = False, failed_at: float | None = None) -> None:
        newly = self.store.record_exit(job_id, attempt, node, exit_code)
        self.send(node, Forget(job=job_id, attempt=attempt))
        row = self._current(job_id, attempt) if newly else None
        if row is None:
            if newly and exit_code != 0 and failed_at is not None:
                self._earlier_failure(job_id, attempt, node, exit_code, detail, failed_at)
            return
        shares = self.store.attempt_nodes(job_id, attempt)
        if retry:
            self._kill_open(job_id, attempt, f"placing the job again: {detail}")
            self.store.transition(job_id, JobState.PENDING, at=self.clock(), reason=f"placing it again: {detail}")
            log.info("job %d attempt %d could not start on %s (%s); placing it again", job_id, attempt, node, detail)
        elif exit_code != 0 and (silent := self._silent_peer(shares, node)):
            self._lost(job_id, attempt, silent, f"node {silent} stopped answering", confirmed=False)
        elif exit_code != 0:
            self._end(row, JobState.FAILED, _failure(node, exit_code, detail), exit_code, failed_at)
        elif all(s.exit_code == 0 for s in shares):
            self._end(row, JobState.SUCCEEDED, "", 0)

    def _silent_peer(self, shares: list[AttemptNode], reporter: str) -> str | None:
        """A node of the attempt that stopped answering without saying its ranks ended. A dead
        machine's peers see their sockets close and fail within a second, well before the node is
        judged down: their failure is then that node's loss, which requeues the job."""
        for share in shares:
            if (share.node != reporter and share.exit_code is None
                    and (self.registry.link(share.node) is None
                         or self.registry.states.get(share.node) is not NodeState.UP)):
                return share.node
        return None

    def _earlier_failure(self, job_id: int, attempt: int, node: str, exit_code: int, detail: str,
                         failed_at: float) -> None:
        """A node whose report came second may have failed first (the others then only lost their
        peer): the job's code and reason are those of the failure that happened first."""
        row = self.store.job(job_id)
        if (row is None or row.attempt != attempt or row.state is not JobState.FAILED or row.failed_at is None
                or failed_at >= row.failed_at):
            return
        self.store.amend_job(job_id, exit_code=exit_code, reason=_failure(node, exit_code, detail), failed_at=failed_at)

    def _end(self, row: JobRow, state: JobState, reason: str, exit_code: int | None,
                   failed_at: float | None = None) -> None:
        self.store.transition(row.id, state, reason=reason, exit_code=exit_code, ended_at=self.clock(),
                              failed_at=failed_at)
        log.info("job %d %s%s", row.id, state.value, f": {reason}" if reason else "")
        self._kill_open(row.id, row.attempt, reason or state.value)

    def _kill_open(self, job_id: int, attempt: int, reason: str) -> None:
        for share in self.store.attempt_nodes(job_id, attempt):
            if share.exit_code is None:
                self.send(share.node, Kill(job=job_id, attempt=attempt, reason=reason))

    def reconcile(self, node: str, reported: list[JobReport]) -> None:
        """Adopt what a (re)connecting agent still runs; resend lost launches; count lost ranks."""
        held = set()
        for job in reported:
            held.add((job.job, job.attempt))
            if job.exit_code is not None:
                self.exited(node, job.job, job.attempt, job.exit_code, job.detail, job.retry, job.failed_at)
            else:
                self.started(node, job.job, job.attempt)
        for share in self.store.open_attempt_nodes():
            if share.node != node or (share.job, share.attempt) in held:
                continue
            if not share.started and self._current(share.job, share.attempt):
                self.send_launch(share.job, share.attempt, node)
            else:
                self._lost(share.job, share.attempt, node, f"{node} no longer runs its ranks (its agent restarted)",
                                 confirmed=True)

    def node_down(self, node: str) -> None:
        for share in self.store.open_attempt_nodes():
            if share.node == node:
                self._lost(share.job, share.attempt, node, f"node {node} stopped answering", confirmed=False)

    def _lost(self, job_id: int, attempt: int, node: str, why: str, confirmed: bool) -> None:
        """A node's share of an attempt is gone: stop the other ranks, then requeue or fail the job.
        A node that only stopped answering may still run its ranks: its GPUs are fenced (kept from
        other jobs) until it says they ended or FENCE_DEADLINE passes."""
        if confirmed:
            self.store.record_exit(job_id, attempt, node, -1)
        else:
            self.store.fence(job_id, attempt, node, self.clock() + FENCE_DEADLINE)
        row = self._current(job_id, attempt)
        if row is None:
            return
        self._kill_open(job_id, attempt, why)
        if row.restarts < row.spec.max_restarts:
            restarts = row.restarts + 1
            note = f"{why} (restart {restarts} of {row.spec.max_restarts})"
            self.store.transition(job_id, JobState.PENDING, at=self.clock(), restarts=restarts, requeued_because=note,
                                  reason=f"requeued: {note}")
            log.info("job %d requeued: %s", job_id, why)
        else:
            extra = " and it has no restarts left (--max-restarts)" if row.spec.max_restarts else ""
            self.store.transition(job_id, JobState.FAILED, reason=f"{why}{extra}", ended_at=self.clock())
            log.info("job %d failed: %s", job_id, why)

    # --- user actions and the clock ------------------------------------------------------------

    def cancel(self, job_id: int) -> JobRow:
        row = self.store.job(job_id)
        if row is None:
            raise LookupError(f"there is no job {job_id}")
        if row.state.finished:
            raise ValueError(f"job {job_id} already {row.state.value}; nothing to cancel")
        self.store.transition(job_id, JobState.CANCELLED, reason="cancelled by a user", ended_at=self.clock())
        self._kill_open(job_id, row.attempt, "cancelled by a user")
        return self.store.job(job_id)  # type: ignore[return-value]

    def enforce_time_limits(self) -> None:
        now = self.clock()
        for row in self.store.jobs((JobState.STARTING, JobState.RUNNING)):
            limit = row.spec.time_limit
            if limit and row.started_at and now - row.started_at > limit:
                self._end(row, JobState.FAILED, f"ran past its time limit of {format_duration(limit)}", None)
