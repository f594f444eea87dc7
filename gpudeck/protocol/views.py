"""The values clients see: the node and job views (with the GPU readings inside a node's) and the
usage views, as the coordinator builds them.

Their `to_json` is the `--json` output of the command line (a contract: field names do not change),
the data the dashboard renders, and the recorded data of the dashboard's tests; `from_json` is how a
client reads them back. They live apart from the messages between agents and the coordinator
(`payloads`, `node_messages`) so that a client command loads only what it receives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from gpudeck.model import JobSpec

from gpudeck.protocol.values import plain, typed

TrafficByRank = dict[int, dict[str, int]]
"""Payload bytes: rank -> kind of operation (all_reduce, send, ...) -> bytes."""


@dataclass(frozen=True)
class GpuProcess:
    """One process holding a GPU context; memory_used is None where the driver hides it. `foreign`:
    not started by this cluster (a process the scheduler must not put a job next to)."""

    pid: int
    name: str
    memory_used: int | None
    foreign: bool = False
    since: float | None = None  # when the node's agent first saw it on this GPU (epoch seconds)


@dataclass(frozen=True)
class GpuReading:
    """One GPU's state at one poll; every metric is None when that GPU cannot report it."""

    index: int
    name: str
    uuid: str
    memory_total: int | None
    memory_used: int | None
    utilization: int | None
    temperature: int | float | None
    power: float | None
    power_limit: float | None
    processes: tuple[GpuProcess, ...] = ()
    # Energy the GPU used since its driver loaded (millijoules, NVML's total energy counter, Volta and
    # newer); simulated GPUs count it from their simulated power. The coordinator charges each job the
    # growth of its GPUs' counters.
    energy_mj: int | None = None
    # Health (gpudeck.agent.health): uncorrected ECC errors since the driver loaded, retired pages,
    # rows remapped for uncorrectable errors; `faults`, one sentence each, make the coordinator
    # cordon this GPU.
    ecc_uncorrected: int | None = None
    retired_pages: int | None = None
    remapped_rows: int | None = None
    faults: tuple[str, ...] = ()


@dataclass(frozen=True)
class WarmStatus:
    """A node's warm interpreters (gpudeck.agent.warm): how many it keeps, how many are ready to
    fork a rank, and the memory they hold (proportional set size, in bytes)."""

    size: int = 0
    ready: int = 0
    memory_bytes: int = 0


@dataclass(frozen=True)
class TrafficView:
    by_kind: dict[str, int]
    by_rank: TrafficByRank

    @classmethod
    def of(cls, by_rank: TrafficByRank) -> "TrafficView":
        by_kind: dict[str, int] = {}
        for kinds in by_rank.values():
            for kind, count in kinds.items():
                by_kind[kind] = by_kind.get(kind, 0) + count
        return cls(by_kind=dict(sorted(by_kind.items())),
                   by_rank={rank: dict(sorted(kinds.items())) for rank, kinds in sorted(by_rank.items())})


@dataclass(frozen=True)
class PlacementView:
    node: str
    node_rank: int
    gpus: list[int]


@dataclass(frozen=True)
class RequestView:
    gpus: int | None
    nodes: int | None
    gpus_per_node: int | None


@dataclass(frozen=True)
class OutputFile:
    """A file a job wrote under $GPUDECK_OUTPUT_DIR, kept on its node after the job (path relative)."""

    path: str
    size: int


@dataclass(frozen=True)
class ProjectView:
    """The shipped project of a job: how many files and bytes, and how many bytes its submit uploaded."""

    files: int
    bytes: int
    uploaded_bytes: int


@dataclass(frozen=True)
class FactorView:
    """One term of a pending job's priority, as `sprio` shows it: the factor's `value` (0 to 1) times
    its `weight` is its `contribution`; the contributions sum to the job's `priority_score`."""

    name: str  # "fair_share", "age" or "priority"
    value: float
    weight: float
    contribution: float


@dataclass(frozen=True)
class HangView:
    """A running job whose ranks completed no collective for the coordinator's --hang-after."""

    since: float  # when the last collective completed (epoch seconds)
    rank: int  # the rank that stopped first
    node: str
    sentence: str


@dataclass(frozen=True)
class ProgressView:
    """A running job's collective progress (coordinator.progress): per rank, the share of each
    `bucket_seconds` of the last minutes spent waiting in collectives (oldest first; None where
    nothing was reported), the straggler sentence ("" when none), and whether it is hung."""

    bucket_seconds: float
    wait: dict[str, list[float | None]]
    straggler: str = ""
    hung: HangView | None = None


@dataclass(frozen=True)
class JobView:
    """A job as `gpudeck jobs --json`, `show --json`, `submit --json` and the dashboard see it."""

    id: int
    name: str
    state: str
    reason: str
    nodes: list[str]
    gpus: int
    placement: list[PlacementView]
    request: RequestView
    command: list[str]
    priority: int
    time_limit: float | None
    max_restarts: int
    restarts: int
    attempt: int
    exit_code: int | None
    submitted_at: float
    started_at: float | None
    ended_at: float | None
    traffic: TrafficView = field(default_factory=lambda: TrafficView.of({}))
    project: ProjectView | None = None
    outputs: dict[str, list[OutputFile]] = field(default_factory=dict)  # by node, while the nodes keep them
    owner: str = ""  # who submitted it
    idle_since: float | None = None  # running with every GPU it holds at 0 % use since then (epoch seconds)
    estimated_start: float | None = None  # pending: when it is planned to start (epoch seconds); None: unknown
    priority_score: float | None = None  # pending: what the queue is ordered by, the sum of the factors' contributions
    priority_factors: list[FactorView] = field(default_factory=list)  # pending: the terms of priority_score
    array_job: int | None = None  # a task of an array: the array's id (its first task's), named with
    array_index: int | None = None  # the task's index as ARRAY.INDEX (12.3)
    array: str = ""  # the array's --array, as submitted ("0-31%4")
    after: list[str] = field(default_factory=list)  # jobs it runs after once they succeeded (--after)
    after_any: list[str] = field(default_factory=list)  # jobs it runs after once they ended (--after-any)
    progress: ProgressView | None = None  # running: stragglers and hangs, from the ranks' collectives
    hang_timeout: float | None = None  # cancelled once hung this long (--hang-timeout); None: only flagged

    @classmethod
    def build(cls, job_id: int, spec: JobSpec, state: str, submitted_at: float, reason: str = "",
              hosts: Sequence[tuple[str, list[int]]] = (), restarts: int = 0, attempt: int = 0,
              exit_code: int | None = None, started_at: float | None = None, ended_at: float | None = None,
              traffic: TrafficByRank | None = None,
              outputs: dict[str, list[OutputFile]] | None = None, owner: str = "",
              idle_since: float | None = None, estimated_start: float | None = None,
              priority_factors: Sequence[FactorView] = (), array_job: int | None = None,
              array_index: int | None = None, progress: ProgressView | None = None) -> "JobView":
        """The view of a job with this spec and this history (the coordinator's rows, or a recorded link)."""
        return cls(
            id=job_id, name=spec.name, state=state, reason=reason, nodes=[node for node, _ in hosts],
            gpus=spec.total_gpus,
            placement=[PlacementView(node=node, node_rank=rank, gpus=list(gpus))
                       for rank, (node, gpus) in enumerate(hosts)],
            request=RequestView(gpus=spec.gpus, nodes=spec.nodes, gpus_per_node=spec.gpus_per_node),
            command=spec.run.what, priority=spec.priority,
            time_limit=spec.time_limit, max_restarts=spec.max_restarts, restarts=restarts, attempt=attempt,
            exit_code=exit_code, submitted_at=submitted_at, started_at=started_at, ended_at=ended_at,
            traffic=TrafficView.of(traffic or {}),
            project=ProjectView(files=spec.project_files, bytes=spec.project_bytes,
                                uploaded_bytes=spec.project_uploaded) if spec.run.project else None,
            outputs=outputs or {}, owner=owner, idle_since=idle_since, estimated_start=estimated_start,
            priority_score=sum(f.contribution for f in priority_factors) if priority_factors else None,
            priority_factors=list(priority_factors), array_job=array_job, array_index=array_index, array=spec.array,
            after=list(spec.after), after_any=list(spec.after_any), progress=progress,
            hang_timeout=spec.hang_timeout)

    def to_json(self) -> dict[str, Any]:
        return plain(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "JobView":
        return typed(data, cls, "job")


@dataclass(frozen=True)
class CordonView:
    """A cordoned GPU of a node (coordinator.health): its index, why, since when (epoch seconds)."""

    gpu: int
    cause: str
    since: float


@dataclass(frozen=True)
class NodeView:
    """A node as `gpudeck nodes --json` and the dashboard see it."""

    name: str
    state: str
    draining: bool
    simulated: bool
    hostname: str
    address: str
    connected: bool
    last_heartbeat_age: float
    jobs: list[int]
    gpus: list[GpuReading]
    warm: WarmStatus = field(default_factory=WarmStatus)
    cordoned: list[CordonView] = field(default_factory=list)  # GPUs kept out of the schedule, and why

    def to_json(self) -> dict[str, Any]:
        return plain(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "NodeView":
        return typed(data, cls, "node")


@dataclass(frozen=True)
class JobUsage:
    """What one job held within a usage window (`gpudeck usage --json`, under `by_job`).

    `gpu_seconds` counts each attempt's GPUs from its start to when it gave them back, clipped to
    the window; `wait_s` is from submit to its first start (None when that start is outside the
    window); `energy_j` is what its GPUs' energy counters grew by while it held them (None where no
    GPU of it reports energy), `energy_simulated` when any of it came from simulated GPUs."""

    id: int
    name: str
    owner: str
    state: str
    gpus: int
    attempts: int
    gpu_seconds: float
    gpu_hours: float
    wait_s: float | None
    energy_j: float | None
    energy_simulated: bool


@dataclass(frozen=True)
class UserUsage:
    """One person's usage within the window: `jobs` that held GPUs in it, their GPU-seconds and the
    `share` of the whole cluster's (0 to 1), the mean wait of those that first started in it."""

    user: str
    jobs: int
    gpu_seconds: float
    gpu_hours: float
    share: float
    mean_wait_s: float | None
    energy_j: float | None
    energy_simulated: bool


@dataclass(frozen=True)
class UsageView:
    """`gpudeck usage --json`: GPU time from `since` (None: ever) to `until` (epoch seconds), in all
    and per user (most GPU-seconds first) and per job (at most `MAX_USAGE_JOBS`, most GPU-seconds
    first; `jobs_left_out` counts the rest). `user` is the user it was asked for (None: everyone)."""

    since: float | None
    until: float
    user: str | None
    jobs: int
    gpu_seconds: float
    gpu_hours: float
    mean_wait_s: float | None
    energy_j: float | None
    energy_simulated: bool
    users: list[UserUsage]
    by_job: list[JobUsage]
    jobs_left_out: int = 0

    def to_json(self) -> dict[str, Any]:
        return plain(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "UsageView":
        return typed(data, cls, "usage")


MAX_USAGE_JOBS = 1000  # jobs one usage reply lists, well under the frame limit
