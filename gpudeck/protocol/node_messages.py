"""The messages between agents and the coordinator, registered with `messages` (which decodes them)
when this module is imported. Clients (the CLI, the dashboard) never receive them and do not import
this module: these types and their payloads cost about 25 ms of every command's start.
"""

from __future__ import annotations

import dataclasses

from gpudeck.model import RunSpec
from gpudeck.protocol.messages import Message, message
from gpudeck.protocol.payloads import GpuReading, JobReport, OutputFile, TrafficByRank, WarmStatus

# --- agent to coordinator ----------------------------------------------------------------------


@message("register")
class Register(Message):
    """An agent's first frame after hello: what it is and which jobs it still holds."""

    hostname: str
    address: str
    simulated: bool
    gpus: list[GpuReading]
    jobs: list[JobReport]


@message("telemetry")
class Telemetry(Message):
    """GPU readings, once a second; also the agent's heartbeat."""

    gpus: list[GpuReading]
    warm: WarmStatus = dataclasses.field(default_factory=WarmStatus)


@message("job_started")
class JobStarted(Message):
    job: int
    attempt: int
    pid: int


@message("job_exited")
class JobExited(Message):
    """This node's ranks of an attempt ended. `retry`: they could not start for a reason of this
    moment (the rendezvous port was taken), so the job should be placed again, not failed."""

    job: int
    attempt: int
    exit_code: int
    detail: str
    retry: bool
    failed_at: float | None  # when the node's first failing rank ended (epoch seconds), if known


@message("job_preparing")
class JobPreparing(Message):
    """What this node is doing before an attempt's ranks can start (copying the project, building
    its environment); shown as the starting job's reason."""

    job: int
    attempt: int
    doing: str


@message("fetch_content")
class FetchContent(Message):
    """Ask for a chunk of a project content (a file or a manifest) at `offset`."""

    digest: str
    offset: int


@message("outputs")
class Outputs(Message):
    """What this node keeps of an attempt's outputs; an empty list once it removed them."""

    job: int
    attempt: int
    files: list[OutputFile]


@message("output_chunk")
class OutputChunk(Message):
    """The answer to `send_output`: bytes of a kept output file at the asked offset, and its size."""

    ticket: int
    data: bytes
    size: int
    error: str


@message("log_chunk")
class LogChunk(Message):
    """Bytes of one rank's log at an offset, so a repeated chunk rewrites the same place."""

    job: int
    attempt: int
    rank: int
    offset: int
    data: bytes


@message("traffic")
class Traffic(Message):
    """Cumulative payload bytes of one job attempt's ranks on this node, and their collective
    progress (gpudeck.protocol.traffic.SYNC_KEYS by rank; coordinator.progress)."""

    job: int
    attempt: int
    by_rank: TrafficByRank
    sync: TrafficByRank


# --- coordinator to agent ----------------------------------------------------------------------


@message("launch")
class Launch(Message):
    """Start this node's ranks of one job attempt; repeating it for the same attempt does nothing."""

    job: int
    attempt: int
    node_rank: int
    nnodes: int
    gpus: list[int]
    master_addr: str
    master_port: int
    run: RunSpec  # what runs, as submitted; its script's bytes included (the store keeps them apart)
    # This node's first global rank and the job's ranks in all: nodes may hold different numbers of
    # them (3 GPUs as 2 + 1). world_size 0: a coordinator from before, for which every node held as many.
    first_rank: int = 0
    world_size: int = 0
    # A task of an array: the array's id and the task's index ($GPUDECK_ARRAY_JOB, $GPUDECK_ARRAY_INDEX).
    array_job: int | None = None
    array_index: int | None = None
    # A preemptible job's seconds between SIGTERM and SIGKILL when it is preempted ($GPUDECK_PREEMPT_GRACE);
    # 0: not preemptible.
    preempt_grace: float = 0.0
    owner: str = ""  # the user who submitted the job (`gpudeck agent --run-as-owner` runs it as their account)


@message("content_chunk")
class ContentChunk(Message):
    """A chunk of a content at `offset` and the content's whole size; `error` when it is not held."""

    digest: str
    offset: int
    size: int
    data: bytes
    error: str


@message("send_output")
class SendOutput(Message):
    """Read a chunk of an output file this node keeps, for a client's download (see `OutputChunk`)."""

    ticket: int
    job: int
    attempt: int
    path: str
    offset: int


@message("kill")
class Kill(Message):
    """Stop an attempt's ranks: SIGTERM, then SIGKILL after `grace` seconds (0: the agent's own grace)."""

    job: int
    attempt: int
    reason: str
    grace: float = 0.0


@message("log_offsets")
class LogOffsets(Message):
    """After a register: how many bytes of each held attempt's logs the coordinator already has,
    keyed "job:attempt" then rank, so a reconnecting agent sends only the rest."""

    sizes: dict[str, dict[int, int]]


@message("forget")
class Forget(Message):
    """The coordinator has recorded this attempt's exit; the agent may drop what it kept of it."""

    job: int
    attempt: int
