"""Every message on the wire, as one frozen dataclass per kind, with the one place that encodes and
decodes them.

A frame is a map `{"kind": NAME, ...fields}`. Decoding checks the kind is known, every field is
present with the declared type and no field is unknown, so the code that handles a message can trust
its shape. Anything else is a `ProtocolError`, answered to the peer, never a crash.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, ClassVar

from gpudeck.protocol.payloads import GpuReading, JobReport, OutputFile, TrafficByRank, WarmStatus
from gpudeck.protocol.values import ShapeError, plain, typed_fields

PROTOCOL_VERSION = 7  # 7: GPU health and cordons, foreign processes' first sighting, doctor, stragglers (issue 14)
# 6: users, owners, arrays, preemption, energy readings (issue 13)


class ProtocolError(Exception):
    """A well-framed message that does not match any message type; safe to send back to the peer."""


class Message:
    """Base of all message types; `kind` is the wire name."""

    kind: ClassVar[str]

    def to_wire(self) -> dict[str, Any]:
        body = plain(self)
        body["kind"] = self.kind
        return body


REGISTRY: dict[str, type[Message]] = {}
_M = typing.TypeVar("_M", bound=type[Message])


def message(kind: str):  # noqa: ANN201 - decorator
    """Register a frozen dataclass as the message type for `kind`."""

    def register(cls: _M) -> _M:
        cls.kind = kind
        REGISTRY[kind] = dataclasses.dataclass(frozen=True)(cls)
        return REGISTRY[kind]  # type: ignore[return-value]

    return register


def decode(body: dict[str, Any]) -> Message:
    """Turn a frame body into its typed message, or raise `ProtocolError` saying what is wrong.
    Nested payloads (GPU readings, job reports, traffic by rank) are built here too (see `values`)."""
    kind = body.get("kind")
    cls = REGISTRY.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message kind {kind!r}")
    fields = {**_defaults(cls), **{k: v for k, v in body.items() if k != "kind"}}
    try:
        return cls(**typed_fields(cls, fields, ""))
    except ShapeError as exc:
        raise ProtocolError(f"{kind}: {exc}") from None


@functools.lru_cache(maxsize=None)
def _defaults(cls: type[Message]) -> dict[str, Any]:
    """The plain values of a message's fields that have defaults: fields added to a message after it
    first shipped have one, so a peer of the version before still sends a valid message without them.
    Worked out once per kind (decoding is hot); `typed` builds fresh values from these."""
    found: dict[str, Any] = {}
    for spec in dataclasses.fields(cls):  # type: ignore[arg-type]
        if spec.default is not dataclasses.MISSING:
            found[spec.name] = plain(spec.default)
        elif spec.default_factory is not dataclasses.MISSING:
            found[spec.name] = plain(spec.default_factory())
    return found


# --- handshake -------------------------------------------------------------------------------


@message("hello")
class Hello(Message):
    """First frame of every connection, sent only after the client checked the certificate pin."""

    secret: str
    role: str  # "agent" or "client"
    name: str
    version: int


@message("welcome")
class Welcome(Message):
    """The handshake's answer, with the limits a client must keep to."""

    coordinator: str
    version: int
    project_cap: int  # the most bytes of project files one job may ship
    user: str = ""  # who the token proved the client to be
    admin: bool = False


@message("error")
class Error(Message):
    """A refusal. `req` names the request it answers, None when it ends the connection."""

    message: str
    code: str
    req: int | None


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
    script_name: str  # file name of the user's script, "" for a built-in workload
    script: bytes  # the script's contents, copied to every node of the job
    workload: str  # built-in workload name, "" for a script or a command
    args: list[str]
    workdir: str  # without a project: the submitter's directory, used when it exists on the node
    project: str = ""  # the project's manifest digest, "" for none
    subdir: str = ""  # the folder of the working copy to run in
    command: list[str] = dataclasses.field(default_factory=list)  # run once on the node instead of ranks
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    python: str = ""  # the interpreter to run ranks with, "" for the agent's
    venv: str = ""
    requirements: dict[str, bytes] = dataclasses.field(default_factory=dict)  # file name -> content
    image: str = ""  # a container image to run in, "" for none
    launcher: str = ""  # "torchrun": one torchrun per node starts the ranks; "": the agent starts them
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


# --- clients (CLI, TUI) ------------------------------------------------------------------------


@message("submit")
class Submit(Message):
    req: int
    spec: dict[str, Any]


@message("project_offer")
class ProjectOffer(Message):
    """A project's manifest (`gpudeck.project.Manifest.encode`); the reply names the contents the
    coordinator lacks, which this connection may then upload."""

    req: int
    manifest: bytes


@message("content_put")
class ContentPut(Message):
    """Bytes of one missing content at `offset`, in order; the last chunk completes it."""

    req: int
    digest: str
    offset: int
    data: bytes


@message("read_output")
class ReadOutput(Message):
    """A chunk of an output file a node keeps for a job, relayed from that node's agent."""

    req: int
    job: int
    node: str
    path: str
    offset: int


@message("list_nodes")
class ListNodes(Message):
    req: int


@message("list_jobs")
class ListJobs(Message):
    """One page of jobs in id order: those with an id above `after`, at most `limit` (a long
    history does not fit in one frame; the client asks until a page comes back short).

    The filters are done by the coordinator's store, so a client asking for a few jobs of a long
    history is not sent all of it: `states` keeps jobs in those states ([]: every state), `since`
    those unfinished or ended at or after that time (epoch seconds), `before` ids below it, and
    `newest` makes the page the highest matching ids instead of the lowest (still sent in id order;
    the next page is asked with `before` the lowest id of this one). Older clients send none of them."""

    req: int
    after: int
    limit: int
    states: list[str] = dataclasses.field(default_factory=list)
    since: float | None = None
    before: int | None = None
    newest: bool = False
    owner: str | None = None


@message("count_jobs")
class CountJobs(Message):
    """How many jobs `ListJobs` with these filters would list in all, so a client that shows some
    can say how many it left out."""

    req: int
    states: list[str] = dataclasses.field(default_factory=list)
    since: float | None = None
    owner: str | None = None


@message("show_job")
class ShowJob(Message):
    """One job; with `index`, the task of that index of the array `job` (`gpudeck show 12.3`)."""

    req: int
    job: int
    index: int | None = None


@message("cancel")
class Cancel(Message):
    """Cancel a job; an array's id cancels every task of it, and with `index` only that task."""

    req: int
    job: int
    index: int | None = None


@message("read_logs")
class ReadLogs(Message):
    """Log bytes of one attempt (None: the latest) from per-rank offsets."""

    req: int
    job: int
    attempt: int | None
    rank: int | None
    offsets: dict[int, int]
    index: int | None = None  # the task of that index of the array `job`


@message("watch")
class Watch(Message):
    """Ask for a snapshot of the cluster (the reply) and then `update` frames with what changed."""

    req: int


@message("drain")
class Drain(Message):
    """Stop (or, with on=False, resume) placing new jobs on a node; running jobs are left alone."""

    req: int
    node: str
    on: bool


@message("cordon")
class Cordon(Message):
    """Keep one GPU out of the schedule (admins only), or with on=False offer it again (`gpu uncordon`)."""

    req: int
    node: str
    gpu: int
    on: bool
    reason: str = ""


@message("add_user")
class AddUser(Message):
    """Make a user and their token (admins only); the reply holds the token, shown this once."""

    req: int
    name: str
    admin: bool
    max_gpus: int | None


@message("list_users")
class ListUsers(Message):
    req: int


@message("remove_user")
class RemoveUser(Message):
    """Remove a user (admins only): their token stops working and their open connections close."""

    req: int
    name: str


@message("usage")
class Usage(Message):
    """GPU time, waits and energy from `since` (epoch seconds; None: ever) to now, of everyone or of
    one `user`; the reply is a `UsageView`."""

    req: int
    since: float | None = None
    user: str | None = None


@message("update")
class Update(Message):
    """Pushed to watchers: changed nodes and jobs since the last update; keys absent = unchanged."""

    data: dict[str, Any]


@message("reply")
class Reply(Message):
    req: int
    data: Any
