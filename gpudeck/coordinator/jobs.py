"""The life of jobs: submit, place, launch, follow, end, requeue.

This is where the `JobState` transitions of `gpudeck.model` happen. Every change is stored before
anything is sent, so a coordinator killed at any point restarts into a state the agents' reports can
be reconciled with: a launch the agent never received is sent again, a launch it did receive is a
no-op the second time, and ranks of an attempt the coordinator no longer wants are killed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import re
from typing import Callable

from gpudeck.arrays import parse_array, parse_ref
from gpudeck.coordinator.dependencies import Upstream, Waiting, gate
from gpudeck.coordinator.preemption import Candidate, victims
from gpudeck.coordinator.priority import Factor, Policy, decayed_usage, fair_shares
from gpudeck.coordinator.registry import Registry
from gpudeck.coordinator.scheduler import (
    Decision, GpuSlot, JobRequest, NodeSlots, Placement, RunningJob, impossible_reason, limit_reason, schedule,
    validate_request,
)
from gpudeck.coordinator.store import AttemptNode, JobRow, Store
from gpudeck.model import DOCTOR, WORKLOADS, JobSpec, JobState, NodeState, format_duration
from gpudeck.protocol.messages import Message
from gpudeck.protocol.node_messages import Forget, Kill, Launch
from gpudeck.protocol.payloads import GpuReading, JobReport

log = logging.getLogger(__name__)
_RANK_DETAIL = re.compile(r"^rank (\d+) (.+)$")
JOB_PORTS = (29500, 29999)  # the rendezvous ports, first and last; the firewall must open them
FENCE_DEADLINE = 120.0  # longest a lost node's GPUs wait for it to confirm its ranks are gone

MAX_REASON = 300  # characters of a node's word on what it is doing
DEFAULT_TIME_LIMIT = 86400.0  # how long a job without --time-limit is planned to run (not a stop)
PREEMPT_GRACE = 30.0  # seconds a preempted job has between SIGTERM and SIGKILL
RESCORE_EVERY = 5.0  # seconds between recomputing priorities (decayed usage, fair shares, ages)
USAGE_HORIZON = 20  # half-lives of history read when the coordinator starts; older use counts under 1e-6
Send = Callable[[str, Message], bool]  # queues the message for a node; never waits on it


def request_of(row: JobRow, priority: float) -> JobRequest:
    """What the scheduler sees of a pending job, with its priority score (`JobControl._score`)."""
    spec = row.spec
    return JobRequest(job_id=row.id, priority=priority, gpus=spec.gpus, nodes=spec.nodes,
                      gpus_per_node=spec.gpus_per_node, owner=row.owner, time_limit=spec.time_limit,
                      on_nodes=tuple(spec.on_nodes))


def _waiting(row: JobRow) -> Waiting:
    """What the dependency gate sees of a pending job."""
    throttle = parse_array(row.spec.array).throttle if row.spec.array else 0
    return Waiting(row.id, tuple(row.spec.after), tuple(row.spec.after_any), row.array_job, row.array_index, throttle)


def _gpu_slot(gpu: GpuReading, busy: dict[int, int], cordoned: dict[int, str]) -> GpuSlot:
    foreign = [p for p in gpu.processes if p.foreign]
    described = f"{foreign[0].name or 'process'} pid {foreign[0].pid}" if foreign else None
    return GpuSlot(index=gpu.index, busy_job=busy.get(gpu.index), foreign=described, cordoned=cordoned.get(gpu.index))


def _launch_order(row: JobRow, attempt: int, node_rank: int, shape: list[int], gpus: list[int], master_addr: str,
                  master_port: int, script: bytes, preempt_grace: float) -> Launch:
    """`shape`: how many GPUs each node holds, in node-rank order; ranks go node by node, one per GPU
    (and one on a node given none: gpudeck doctor's check)."""
    spec = row.spec
    ranks = [max(1, gpus_held) for gpus_held in shape]
    return Launch(job=row.id, attempt=attempt, node_rank=node_rank, nnodes=len(shape), gpus=gpus,
                  first_rank=sum(ranks[:node_rank]), world_size=sum(ranks),
                  master_addr=master_addr, master_port=master_port, script_name=spec.script_name, script=script,
                  workload=spec.workload, args=spec.args, workdir=spec.workdir, project=spec.project,
                  subdir=spec.subdir, command=spec.command, env=spec.env, python=spec.python, venv=spec.venv,
                  requirements=spec.requirements, image=spec.image, launcher=spec.launcher,
                  array_job=row.array_job, array_index=row.array_index, owner=row.owner,
                  preempt_grace=preempt_grace if spec.preemptible else 0.0)


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
                 job_ports: tuple[int, int] = JOB_PORTS, policy: Policy = Policy(),
                 default_time_limit: float = DEFAULT_TIME_LIMIT, preempt_grace: float = PREEMPT_GRACE) -> None:
        self.store = store
        self.registry = registry
        self.send = send
        self.clock = clock
        self.job_ports = job_ports
        self.policy = policy
        self.default_time_limit = default_time_limit
        self.preempt_grace = preempt_grace
        self._stopping: set[tuple[int, int]] = set()  # preempted attempts whose ranks have not ended yet
        self._preempted_by: dict[int, int] = {}  # a preempted job -> the job it was stopped for, until that starts
        # What the last scheduling pass saw, so that the next can skip the jobs that already waited.
        self._context: object = None
        self._requests: dict[int, JobRequest] = {}  # built once per rescoring
        self._node_slots: dict[str, tuple[list[GpuReading], dict[int, int], dict[int, str], NodeSlots]] = {}
        # Priorities: every pending job's score is as of `_scored_at`, so scores compare at one instant.
        self._scored_at = -math.inf
        self._usage: dict[str, float] = {}  # each owner's decayed GPU-seconds as of `_usage_at`
        self._usage_at: float | None = None
        self._shares: dict[str, float] = {}  # each owner's fair-share factor
        self._reserved: int | None = None  # the job the last pass reserved GPUs for
        self.estimated_start: dict[int, float] = {}  # pending jobs whose start is planned (epoch seconds)

    # --- submit and schedule -------------------------------------------------------------------

    def submit(self, spec: JobSpec, owner: str) -> JobRow:
        """Store `owner`'s job, or raise ValueError with the reason it can never run."""
        spec.check()
        if spec.workload and spec.workload not in WORKLOADS and spec.workload != DOCTOR:
            known = ", ".join(sorted(WORKLOADS)) or "none in this version"
            raise ValueError(f"there is no built-in workload {spec.workload!r} (built-in workloads: {known})")
        if spec.on_nodes:
            spec = self._doctor_check(spec)
        else:
            request = JobRequest(job_id=0, gpus=spec.gpus, nodes=spec.nodes, gpus_per_node=spec.gpus_per_node)
            problem = validate_request(request) or impossible_reason(request, self._capacity())
            if problem:
                raise ValueError(problem)
        user = self.store.user(owner)
        if user is not None and user.max_gpus is not None and spec.total_gpus > user.max_gpus:
            raise ValueError(limit_reason(owner, user.max_gpus, spec.total_gpus, 0))
        for ref in (*spec.after, *spec.after_any):
            if self._named(ref) is None:
                raise LookupError(f"there is no job {ref} to run after")
        if spec.array:  # one row per task, in one transaction; the array's id is its first task's
            job_id = self.store.add_array(spec, self.clock(), owner, parse_array(spec.array).indices)
        else:
            job_id = self.store.add_job(spec, self.clock(), owner)
        return self.store.job(job_id)  # type: ignore[return-value]

    def _doctor_check(self, spec: JobSpec) -> JobSpec:
        """gpudeck doctor's check, on nodes that have joined and are not down, told the job ports
        (what it checks the nodes can reach on each other)."""
        running = next((row.id for row in self.store.jobs((JobState.PENDING, JobState.STARTING, JobState.RUNNING))
                        if row.spec.on_nodes), None)
        if running is not None:  # one at a time: two would measure each other's traffic, and cost the nodes twice
            raise ValueError(f"gpudeck doctor's check is already running as job {running}; wait for it to end "
                             f"(or `gpudeck cancel {running}`)")
        known = {node.name for node in self.store.nodes() if node.state is not NodeState.DOWN}
        unknown = [name for name in spec.on_nodes if name not in known]
        if unknown:
            raise ValueError(f"{', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a node of this "
                             "cluster that is up (gpudeck nodes lists them)")
        first, last = self.job_ports
        nodes = ",".join(sorted(spec.on_nodes))  # the node-rank order (the scheduler lists hosts by name)
        return dataclasses.replace(spec, args=[*spec.args, "--nodes", nodes, "--job-ports", f"{first}-{last}"])

    def _named(self, ref: str) -> JobRow | None:
        """The job a reference names: '7', or the task '12.3' (see gpudeck.arrays)."""
        job, index = parse_ref(ref)
        return self.store.job(job) if index is None else self.store.task(job, index)

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
        cordoned = self.store.cordoned_by_node()
        return [self._slots_of(name, link.gpus, busy.get(name, {}),
                               {row.gpu: row.cause for row in cordoned.get(name, [])})
                for name, link in sorted(self.registry.links.items())
                if self.registry.states.get(name) is NodeState.UP and name not in draining]

    def _slots_of(self, name: str, gpus: list[GpuReading], busy: dict[int, int], cordoned: dict[int, str]) -> NodeSlots:
        """A node's slots, rebuilt only when its readings, its jobs or its cordons changed (passes
        come with every submit; telemetry once a second)."""
        cached = self._node_slots.get(name)
        if cached is not None and cached[0] is gpus and cached[1] == busy and cached[2] == cordoned:
            return cached[3]
        slots = NodeSlots(name, tuple(_gpu_slot(g, busy, cordoned) for g in gpus))
        self._node_slots[name] = (gpus, busy, cordoned, slots)
        return slots

    def draining(self) -> list[str]:
        return [node.name for node in self.store.nodes() if node.draining and node.state is not NodeState.DOWN]

    def schedule(self) -> str:
        """One scheduling pass; says which kind ("full", "new jobs", "none").

        When what the scheduler sees is as it was after the last pass (the same slots, running jobs
        and their planned ends, limits, draining nodes and fence notes) and the scores were not
        recomputed since, every job that waited then still waits for the same reason: free GPUs only
        shrink, the time a waiting job would end by only grows with the clock, so only a change of
        the reservation could let one start. Then only jobs new to the queue are scheduled, with the
        reserved job so that they cannot delay it; if a new job takes the reservation over (one of
        higher score that cannot start either), the others' verdicts are due again and a full pass
        follows at once. A steady stream of submits to a full cluster costs what the new jobs cost,
        not what the queue holds. Anything that frees or takes a GPU makes the next pass a full one,
        and so does rescoring every RESCORE_EVERY seconds: ages and decayed usage change the order
        with time, and between rescorings the order is the one at the last."""
        now = self.clock()
        slots, draining, fenced = self.slots(), self.draining(), self._fence_note()
        running, limits = self._running(), self._limits()
        context = (tuple(slots), tuple(draining), fenced, running, tuple(sorted(limits.items())))
        newly = self.store.take_newly_pending()
        rescored = self._rescore(now)
        reserved = self.store.job(self._reserved) if self._reserved is not None else None
        still_reserved = self._reserved is None or (reserved is not None and reserved.state is JobState.PENDING)
        if context == self._context and not rescored and still_reserved:
            if not newly:
                return "none"
            ids = dict.fromkeys(([self._reserved] if self._reserved is not None else []) + newly)
            fresh = [row for job_id in ids if (row := self.store.job(job_id)) and row.state is JobState.PENDING]
            decision = self._decide(fresh, slots, running, limits, now)
            if (decision.reservation.job_id if decision.reservation else None) == self._reserved:
                self._apply(fresh, decision, draining, fenced, context)
                return "new jobs"
        fresh = self.store.jobs((JobState.PENDING,))
        if len(self._requests) > 2 * len(fresh) + 1000:
            self._requests = {}
        self._apply(fresh, self._decide(fresh, slots, running, limits, now), draining, fenced, context)
        return "full" if fresh else "none"

    def _decide(self, fresh: list[JobRow], slots: list[NodeSlots], running: tuple[RunningJob, ...],
                limits: dict[str, int], now: float) -> Decision:
        fresh = self._gated(fresh)  # --after, --after-any and array throttles first: coordinator.dependencies
        fresh = self._behind_preemptors(fresh)
        requests = []
        for row in fresh:
            if row.id not in self._requests:
                self._requests[row.id] = request_of(row, self._score(row))
            requests.append(self._requests[row.id])
        return schedule(slots, requests, running, limits, now, self.default_time_limit)

    def _apply(self, fresh: list[JobRow], decision: Decision, draining: list[str], fenced: str,
               context: object) -> None:
        """Store the pass's reasons and estimates and launch its placements."""
        self._context = context
        rows = {row.id: row for row in fresh}
        self.store.set_reasons({job_id: _explained(rows[job_id], reason, draining) + fenced
                                for job_id, reason in decision.reasons.items()})
        estimates = dict(decision.estimated_start)
        self.store.touch([job_id for job_id in set(estimates) | set(self.estimated_start)
                          if estimates.get(job_id) != self.estimated_start.get(job_id)])
        self.estimated_start = estimates
        self._reserved = decision.reservation.job_id if decision.reservation else None
        for placement in decision.placements:
            self._launch(rows[placement.job_id], placement)
        if decision.placements:
            self._context = None  # GPUs were taken: every waiting job's reason is due again
        if decision.reasons and self._preempt(rows, decision):
            self._context = None

    # --- preemption (the choice is coordinator.preemption) ----------------------------------------

    def _preempt(self, rows: dict[int, JobRow], decision: Decision) -> bool:
        """Stop preemptible jobs for the first waiting job, by score, that stopping them lets start;
        none while the jobs stopped for an earlier one still hold GPUs. True when it stopped any."""
        holding = {(share.job, share.attempt) for share in self.holding()}
        self._stopping &= holding
        candidates = self._preemptible()
        if self._stopping or not candidates:
            return False
        for job_id in sorted(decision.reasons, key=lambda job: -self._requests[job].priority
                             if job in self._requests else 0):
            row, request = rows[job_id], self._requests.get(job_id)
            if request is None or job_id in decision.over_limit:
                continue
            chosen = victims(request, row.spec.priority, decision.free_after, candidates)
            if chosen:
                self._stop_for(row, chosen)
                return True
        return False

    def _behind_preemptors(self, rows: list[JobRow]) -> list[JobRow]:
        """The jobs that may be placed: a preempted job waits until the job it was stopped for has
        started, or the GPUs it gave back could go straight back to it (its fair share may well
        score higher) and the two would stop each other in turn."""
        waiting = {job: by for job, by in self._preempted_by.items()
                   if (row := self.store.job(by)) is not None and row.state is JobState.PENDING}
        self._preempted_by = waiting
        held = {row.id: f"preempted by job {waiting[row.id]}; it waits until job {waiting[row.id]} has started"
                for row in rows if row.id in waiting}
        self.store.set_reasons(held)
        return [row for row in rows if row.id not in held]

    def _preemptible(self) -> list[Candidate]:
        return [Candidate(row.id, row.spec.priority, row.started_at or 0.0,
                          tuple((node, tuple(gpus)) for node, gpus in row.hosts))
                for row in self.store.jobs((JobState.STARTING, JobState.RUNNING))
                if row.spec.preemptible and (row.id, row.attempt) not in self._stopping]

    def _stop_for(self, row: JobRow, chosen: tuple[int, ...]) -> None:
        """Send the chosen jobs back to the queue, without spending a restart, and stop their ranks:
        SIGTERM, then SIGKILL after the grace."""
        why = f"preempted by job {row.id}"
        for job_id in chosen:
            victim = self.store.job(job_id)
            if victim is None:
                continue
            self.store.transition(job_id, JobState.PENDING, at=self.clock(), requeued_because=why,
                                  reason=f"{why}: its ranks have {self.preempt_grace:g} s to save and stop")
            self._kill_open(job_id, victim.attempt, why, self.preempt_grace)
            self._stopping.add((job_id, victim.attempt))
            self._preempted_by[job_id] = row.id
            log.info("job %d %s (priority %d over %d)", job_id, why, row.spec.priority, victim.spec.priority)
        names = ", ".join(map(str, chosen))
        self.store.set_reasons({row.id: f"preempting job{'s' if len(chosen) > 1 else ''} {names}: it starts once "
                                        f"{'they stop' if len(chosen) > 1 else 'it stops'} (within "
                                        f"{self.preempt_grace:g} s)"})

    def _running(self) -> tuple[RunningJob, ...]:
        """Every share that holds GPUs, with when it gives them back at the latest: a fenced one at
        its fence deadline, one of a running attempt when its time limit (or the default) ends it,
        one of an attempt that has ended (its ranks are being stopped) now."""
        shares = []
        for share in self.holding():
            row = self.store.job(share.job)
            if share.fenced_until is not None:
                ends = share.fenced_until
            elif row and row.attempt == share.attempt and row.state.active and row.started_at is not None:
                ends = row.started_at + (row.spec.time_limit or self.default_time_limit)
            else:
                ends = 0.0
            shares.append(RunningJob(share.job, ((share.node, tuple(share.gpus)),), ends, row.owner if row else ""))
        return tuple(shares)

    def _limits(self) -> dict[str, int]:
        """The most GPUs each person's jobs may hold at once, for those who have a limit."""
        return {user.name: user.max_gpus for user in self.store.users() if user.max_gpus is not None}

    def _rescore(self, now: float) -> bool:
        """Recompute decayed usage and fair shares, at most every RESCORE_EVERY seconds and only while
        jobs wait; True when it did (every pending job's score is then due again). Usage is carried
        over from the last time, so each time reads only the attempts that held GPUs since."""
        if now - self._scored_at < RESCORE_EVERY:
            return False
        pending = self.store.jobs((JobState.PENDING,))
        if not pending:
            return False
        since = self._usage_at if self._usage_at is not None else now - USAGE_HORIZON * self.policy.half_life
        self._usage = decayed_usage(self.store.held_gpus(since), now, self.policy.half_life, since, self._usage)
        self._usage_at = self._scored_at = now
        self._shares = fair_shares(self._usage, {row.owner for row in pending})
        self._requests = {}
        return True

    def _score(self, row: JobRow) -> float:
        return self.policy.total(row.spec.priority, row.submitted_at, self._shares.get(row.owner, 1.0),
                                 self._scored_at)

    def standing(self, row: JobRow) -> tuple[tuple[Factor, ...], float | None]:
        """A pending job's priority factors as of now (what `gpudeck show` explains) and its
        estimated start; nothing for a job that does not wait."""
        if row.state is not JobState.PENDING:
            return (), None
        factors = self.policy.explain(row.spec.priority, row.submitted_at, self._shares.get(row.owner, 1.0),
                                      self.clock())
        return factors, self.estimated_start.get(row.id)

    # --- dependencies and arrays (the policy is coordinator.dependencies) ------------------------

    def _gated(self, rows: list[JobRow]) -> list[JobRow]:
        """The pending jobs the scheduler may consider this pass. The others get their reason, and
        those waiting for a job that failed or was cancelled fail, with the jobs waiting for them."""
        verdict = gate([_waiting(row) for row in rows], self._upstream(rows), self._array_running())
        self._fail_waiting(verdict.failed)
        self.store.set_reasons(verdict.reasons)
        by_id = {row.id: row for row in rows}
        return [by_id[job_id] for job_id in verdict.offered]

    def _fail_waiting(self, failed: dict[int, str]) -> None:
        """Fail these pending jobs, then every pending job that those failures leave unable to run,
        until none is left: a chain of --after fails at once, whatever this pass looked at."""
        while failed:
            by_reason: dict[str, list[int]] = {}
            for job_id, reason in failed.items():
                by_reason.setdefault(reason, []).append(job_id)
            for reason, ids in by_reason.items():
                self.store.transition_all(ids, JobState.FAILED, reason=reason, ended_at=self.clock())
                log.info("%d waiting jobs failed: %s", len(ids), reason)
            waiting = [row for row in self.store.jobs((JobState.PENDING,)) if row.spec.after]
            failed = gate([_waiting(row) for row in waiting], self._upstream(waiting), {}).failed

    def _upstream(self, rows: list[JobRow]) -> dict[str, Upstream]:
        """The jobs these rows wait for, by the reference they name each by."""
        targets: dict[str, tuple[int, bool]] = {}  # reference -> job id, and whether it may mean a whole array
        for ref in {ref for row in rows for ref in (*row.spec.after, *row.spec.after_any)}:
            job, index = parse_ref(ref)
            task = self.store.task(job, index) if index is not None else None
            if index is None or task is not None:
                targets[ref] = (task.id if task is not None else job, index is None)
        states = self.store.states_of(sorted({job for job, _ in targets.values()}))
        upstream = {}
        for ref, (job, whole) in targets.items():
            if job in states:
                state, tasks = states[job]
                upstream[ref] = (Upstream(f"array {ref}", tasks, array=True) if whole and tasks
                                 else Upstream(f"job {ref}", {state: 1}))
        return upstream

    def _array_running(self) -> dict[int, int]:
        """How many tasks of each array are starting or running."""
        running: dict[int, int] = {}
        for row in self.store.jobs((JobState.STARTING, JobState.RUNNING)):
            if row.array_job is not None:
                running[row.array_job] = running.get(row.array_job, 0) + 1
        return running

    def _fence_note(self) -> str:
        """What a pending job cannot see in the free GPUs: those of a lost node kept back until it
        confirms the ranks it may still run are gone."""
        now = self.clock()
        notes = [f"GPUs {','.join(map(str, s.gpus))} of {s.node} stay reserved until {s.node} confirms that job "
                 f"{s.job}'s ranks have stopped (at most {s.fenced_until - now:.0f} s more)"
                 for s in self.holding()
                 if s.fenced_until is not None and self.registry.states.get(s.node) is NodeState.UP]
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
            self.send(node, _launch_order(row, attempt, node_rank, [len(g) for _, g in hosts], gpus, master, port,
                                          script, self.preempt_grace))

    def send_launch(self, job_id: int, attempt: int, node: str) -> None:
        """Send a stored launch again (its agent reconnected without having started it)."""
        row = self.store.job(job_id)
        shares = self.store.attempt_nodes(job_id, attempt)
        share = next((s for s in shares if s.node == node), None)
        if row is None or share is None:
            return
        master_addr, master_port = self.store.master(job_id, attempt)
        shape = [len(s.gpus) for s in sorted(shares, key=lambda s: s.node_rank)]
        self.send(node, _launch_order(row, attempt, share.node_rank, shape, share.gpus, master_addr,
                                      master_port, self.store.script(job_id), self.preempt_grace))

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

    def _kill_open(self, job_id: int, attempt: int, reason: str, grace: float = 0.0) -> None:
        for share in self.store.attempt_nodes(job_id, attempt):
            if share.exit_code is None:
                self.send(share.node, Kill(job=job_id, attempt=attempt, reason=reason, grace=grace))

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

    def cancel(self, job_id: int, reason: str = "cancelled by a user") -> JobRow:
        row = self.store.job(job_id)
        if row is None:
            raise LookupError(f"there is no job {job_id}")
        if row.state.finished:
            raise ValueError(f"job {job_id} already {row.state.value}; nothing to cancel")
        self.store.transition(job_id, JobState.CANCELLED, reason=reason, ended_at=self.clock())
        self._kill_open(job_id, row.attempt, reason)
        self._context = None  # a pending job's cancel frees no GPU, but the jobs waiting for it are due again
        return self.store.job(job_id)  # type: ignore[return-value]

    def cancel_array(self, array_job: int, reason: str = "cancelled by a user") -> JobRow:
        """Cancel every task of an array that has not ended, in one transaction; the array's first task."""
        tasks = self.store.unfinished_tasks(array_job)
        if not tasks:
            raise ValueError(f"every task of array {array_job} has already ended; nothing to cancel")
        self.store.transition_all([task.id for task in tasks], JobState.CANCELLED, reason=reason, ended_at=self.clock())
        for task in tasks:
            if task.attempt:
                self._kill_open(task.id, task.attempt, reason)
        self._context = None
        log.info("array %d: %d tasks cancelled", array_job, len(tasks))
        return self.store.job(array_job)  # type: ignore[return-value]

    def enforce_time_limits(self) -> None:
        now = self.clock()
        for row in self.store.jobs((JobState.STARTING, JobState.RUNNING)):
            limit = row.spec.time_limit
            if limit and row.started_at and now - row.started_at > limit:
                self._end(row, JobState.FAILED, f"ran past its time limit of {format_duration(limit)}", None)
