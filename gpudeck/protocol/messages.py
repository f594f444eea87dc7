"""Every message on the wire, as one frozen dataclass per kind, with the one place that encodes and
decodes them. The messages between agents and the coordinator are in `node_messages`, which registers
them here when it is imported: a client never receives them, and they and their payloads were a
seventh of a command's start.

A frame is a map `{"kind": NAME, ...fields}`. Decoding checks the kind is known, every field is
present with the declared type and no field is unknown, so the code that handles a message can trust
its shape. Anything else is a `ProtocolError`, answered to the peer, never a crash.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import TYPE_CHECKING, Any, Callable, ClassVar

if TYPE_CHECKING:
    from typing_extensions import dataclass_transform
else:
    def dataclass_transform(**_: Any) -> Callable[[Any], Any]:
        """At run time a no-op: the marker only tells type checkers that `message` makes dataclasses."""
        return lambda decorator: decorator

from gpudeck.protocol.values import ShapeError, plain, typed_fields

PROTOCOL_VERSION = 8  # 8: a job's run (`RunSpec`) nested whole in its spec and its launches (issue 26)
# 7: GPU health and cordons, foreign processes' first sighting, doctor, stragglers (issue 14)
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


@dataclass_transform(frozen_default=True)
def message(kind: str) -> Callable[[_M], _M]:
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
    try:
        return cls(**typed_fields(cls, {k: v for k, v in body.items() if k != "kind"}, ""))
    except ShapeError as exc:
        raise ProtocolError(f"{kind}: {exc}") from None


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
