"""The scheduling side of jobs: submit, the scheduling pass and the one place that applies it.

A pass reads what it needs into a `planning.View`, lets `planning.plan` decide, and `apply` does
every write and send the plan calls for. What happens to jobs once placed (agents' reports, lost
nodes, cancels, time limits) is `coordinator.lifecycle`; the orders sent to nodes are
`coordinator.launching`.
"""

from __future__ import annotations

import dataclasses
import logging
from types import MappingProxyType
from typing import Callable

from gpudeck.arrays import parse_array, parse_ref
from gpudeck.coordinator.dependencies import Upstream, gate
from gpudeck.coordinator.launching import Launcher, Send
from gpudeck.coordinator.lifecycle import Lifecycle
from gpudeck.coordinator.planning import Active, Cluster, Plan, Preemption, Scores, View, plan, waiting
from gpudeck.coordinator.preemption import Candidate
from gpudeck.coordinator.priority import Factor, Ledger, Policy
from gpudeck.coordinator.registry import Registry
from gpudeck.coordinator.scheduler import (
    GpuSlot, JobRequest, NodeSlots, RunningJob, impossible_reason, limit_reason, validate_request,
)
from gpudeck.coordinator.store import AttemptNode, JobRow, Store
from gpudeck.model import DOCTOR, WORKLOADS, JobSpec, JobState, NodeState
from gpudeck.protocol.payloads import GpuReading

log = logging.getLogger(__name__)
JOB_PORTS = (29500, 29999)  # the rendezvous ports, first and last; the firewall must open them
DEFAULT_TIME_LIMIT = 86400.0  # how long a job without --time-limit is planned to run (not a stop)
PREEMPT_GRACE = 30.0  # seconds a preempted job has between SIGTERM and SIGKILL
RESCORE_EVERY = 5.0  # seconds between recomputing priorities (decayed usage, fair shares, ages)
USAGE_HORIZON = 20  # half-lives of history read when the coordinator starts; older use counts under 1e-6


def _gpu_slot(gpu: GpuReading, busy: dict[int, int], cordoned: dict[int, str]) -> GpuSlot:
    foreign = [p for p in gpu.processes if p.foreign]
    described = f"{foreign[0].name or 'process'} pid {foreign[0].pid}" if foreign else None
    return GpuSlot(index=gpu.index, busy_job=busy.get(gpu.index), foreign=described, cordoned=cordoned.get(gpu.index))


class JobControl:
    def __init__(self, store: Store, registry: Registry, send: Send, clock: Callable[[], float],
                 job_ports: tuple[int, int] = JOB_PORTS, policy: Policy = Policy(),
                 default_time_limit: float = DEFAULT_TIME_LIMIT, preempt_grace: float = PREEMPT_GRACE) -> None:
        self.store = store
        self.registry = registry
        self.clock = clock
        self.job_ports = job_ports
        self.policy = policy
        self.default_time_limit = default_time_limit
        self.preempt_grace = preempt_grace
        self.launcher = Launcher(store, registry, send, clock, job_ports, preempt_grace)
        self.lifecycle = Lifecycle(store, registry, send, clock, self.launcher, self.reconsider)
        self.ledger = Ledger(policy, USAGE_HORIZON)  # priorities: decayed usage and fair shares
        self._stopping: set[tuple[int, int]] = set()  # preempted attempts whose ranks have not ended yet
        self._preempted_by: dict[int, int] = {}  # a preempted job -> the job it was stopped for, until that starts
        # What the last scheduling pass saw, so that the next can skip the jobs that already waited.
        self._context: object = None
        self._requests: dict[int, JobRequest] = {}  # built once per rescoring
        self._node_slots: dict[str, tuple[list[GpuReading], dict[int, int], dict[int, str], NodeSlots]] = {}
        self._reserved: int | None = None  # the job the last pass reserved GPUs for
        self.estimated_start: dict[int, float] = {}  # pending jobs whose start is planned (epoch seconds)

    # --- submit and schedule -------------------------------------------------------------------

    def submit(self, spec: JobSpec, owner: str) -> JobRow:
        """Store `owner`'s job, or raise ValueError with the reason it can never run."""
        spec.check()
        workload = spec.run.workload
        if workload and workload not in WORKLOADS and workload != DOCTOR:
            known = ", ".join(sorted(WORKLOADS)) or "none in this version"
            raise ValueError(f"there is no built-in workload {workload!r} (built-in workloads: {known})")
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
        args = [*spec.run.args, "--nodes", nodes, "--job-ports", f"{first}-{last}"]
        return dataclasses.replace(spec, run=dataclasses.replace(spec.run, args=args))

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

    def _slots(self, holding: list[AttemptNode]) -> list[NodeSlots]:
        """The GPUs jobs may be placed on: those of nodes that are up and not draining."""
        busy: dict[str, dict[int, int]] = {}
        for share in holding:
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

    def reconsider(self) -> None:
        """Make the next pass a full one: something let waiting jobs move without freeing a GPU."""
        self._context = None

    # --- the pass ------------------------------------------------------------------------------

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
        holding = self.holding()
        cluster = Cluster(tuple(self._slots(holding)), self._running(holding), self._limits(), tuple(self.draining()),
                          self._fence_note(holding, now), now, self.default_time_limit)
        newly = self.store.take_newly_pending()
        rescored = self._rescore(now)
        reserved = self.store.job(self._reserved) if self._reserved is not None else None
        still_reserved = self._reserved is None or (reserved is not None and reserved.state is JobState.PENDING)
        active = None
        if cluster.context == self._context and not rescored and still_reserved:
            if not newly:
                return "none"
            ids = dict.fromkeys(([self._reserved] if self._reserved is not None else []) + newly)
            fresh = [row for job_id in ids if (row := self.store.job(job_id)) and row.state is JobState.PENDING]
            active = self._active(holding)
            planned = plan(self._view(fresh, cluster, active))
            if planned.reserved == self._reserved:
                self.apply(planned, cluster.context)
                return "new jobs"
        fresh = self.store.jobs((JobState.PENDING,))
        if len(self._requests) > 2 * len(fresh) + 1000:
            self._requests = {}
        self.apply(plan(self._view(fresh, cluster, active or self._active(holding))), cluster.context)
        return "full" if fresh else "none"

    def _view(self, pending: list[JobRow], cluster: Cluster, active: Active) -> View:
        scores = Scores(self.policy, self.ledger.shares, self.ledger.scored_at)
        return View(pending, self._upstream(pending), cluster, active, scores, MappingProxyType(self._requests))

    def _active(self, holding: list[AttemptNode]) -> Active:
        """The running jobs as gating and preemption see them; forgets the preempted attempts that
        gave their GPUs back and the preemptors that have started."""
        self._stopping &= {(share.job, share.attempt) for share in holding}
        self._preempted_by = {job: by for job, by in self._preempted_by.items()
                              if (row := self.store.job(by)) is not None and row.state is JobState.PENDING}
        array_running: dict[int, int] = {}
        candidates = []
        for row in self.store.jobs((JobState.STARTING, JobState.RUNNING)):
            if row.array_job is not None:
                array_running[row.array_job] = array_running.get(row.array_job, 0) + 1
            if row.spec.preemptible and (row.id, row.attempt) not in self._stopping:
                candidates.append(Candidate(row.id, row.spec.priority, row.started_at or 0.0,
                                            tuple((node, tuple(gpus)) for node, gpus in row.hosts)))
        return Active(array_running, tuple(candidates), bool(self._stopping), dict(self._preempted_by))

    def apply(self, planned: Plan, context: object) -> None:
        """Do what the pass decided: fail the jobs that can never run, store every reason and
        estimate, launch the placements, then stop the jobs preempted for a waiting one."""
        self._context = context
        self._fail_waiting(planned.failed)
        self._requests.update(planned.requests)
        self.store.set_reasons(planned.reasons)
        estimates = dict(planned.decision.estimated_start)
        self.store.touch([job_id for job_id in set(estimates) | set(self.estimated_start)
                          if estimates.get(job_id) != self.estimated_start.get(job_id)])
        self.estimated_start = estimates
        self._reserved = planned.reserved
        launched = [self.launcher.launch(row, placement) for row, placement in planned.launches]
        if launched:
            self._context = None  # GPUs were taken: every waiting job's reason is due again
        if planned.preemption is not None and all(launched):  # a launch short of a port: the next pass plans anew
            self._stop_for(planned.preemption)
            self._context = None

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
            rows = [row for row in self.store.jobs((JobState.PENDING,)) if row.spec.after]
            failed = gate([waiting(row) for row in rows], self._upstream(rows), {}).failed

    def _stop_for(self, preemption: Preemption) -> None:
        """Send the chosen jobs back to the queue, without spending a restart, and stop their ranks:
        SIGTERM, then SIGKILL after the grace."""
        row, chosen = preemption.by, preemption.victims
        why = f"preempted by job {row.id}"
        for job_id in chosen:
            victim = self.store.job(job_id)
            if victim is None:
                continue
            self.store.transition(job_id, JobState.PENDING, at=self.clock(), requeued_because=why,
                                  reason=f"{why}: its ranks have {self.preempt_grace:g} s to save and stop")
            self.launcher.kill_open(job_id, victim.attempt, why, self.preempt_grace)
            self._stopping.add((job_id, victim.attempt))
            self._preempted_by[job_id] = row.id
            log.info("job %d %s (priority %d over %d)", job_id, why, row.spec.priority, victim.spec.priority)
        names = ", ".join(map(str, chosen))
        self.store.set_reasons({row.id: f"preempting job{'s' if len(chosen) > 1 else ''} {names}: it starts once "
                                        f"{'they stop' if len(chosen) > 1 else 'it stops'} (within "
                                        f"{self.preempt_grace:g} s)"})

    # --- what a pass reads ---------------------------------------------------------------------

    def _running(self, holding: list[AttemptNode]) -> tuple[RunningJob, ...]:
        """Every share that holds GPUs, with when it gives them back at the latest: a fenced one at
        its fence deadline, one of a running attempt when its time limit (or the default) ends it,
        one of an attempt that has ended (its ranks are being stopped) now."""
        shares = []
        for share in holding:
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
        if now - self.ledger.scored_at < RESCORE_EVERY:
            return False
        pending = self.store.jobs((JobState.PENDING,))
        if not pending:
            return False
        self.ledger.rescore(self.store.held_gpus(self.ledger.since(now)), {row.owner for row in pending}, now)
        self._requests = {}
        return True

    def standing(self, row: JobRow) -> tuple[tuple[Factor, ...], float | None]:
        """A pending job's priority factors as of now (what `gpudeck show` explains) and its
        estimated start; nothing for a job that does not wait."""
        if row.state is not JobState.PENDING:
            return (), None
        factors = self.policy.explain(row.spec.priority, row.submitted_at, self.ledger.shares.get(row.owner, 1.0),
                                      self.clock())
        return factors, self.estimated_start.get(row.id)

    # --- what the dependency gate reads (the policy is coordinator.dependencies) ---------------

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

    def _fence_note(self, holding: list[AttemptNode], now: float) -> str:
        """What a pending job cannot see in the free GPUs: those of a lost node kept back until it
        confirms the ranks it may still run are gone."""
        notes = [f"GPUs {','.join(map(str, s.gpus))} of {s.node} stay reserved until {s.node} confirms that job "
                 f"{s.job}'s ranks have stopped (at most {s.fenced_until - now:.0f} s more)"
                 for s in holding
                 if s.fenced_until is not None and self.registry.states.get(s.node) is NodeState.UP]
        return "; " + "; ".join(notes) if notes else ""
