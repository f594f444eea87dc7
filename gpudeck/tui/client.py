"""All of the dashboard's network I/O: finding the coordinator, watching it, reconnecting, and the
requests the screens make. It knows nothing of Textual; the app runs `events()` in a worker.

A `Link` is the interface the app is given (harlequin's adapter pattern): `CoordinatorLink` talks to
a real coordinator; `RecordedLink` replays recorded data for snapshot tests and benchmarks.

`events()` yields what happened to the connection, forever:

- `NotFound`: no coordinator or no token yet (the text says what was tried); it keeps looking.
- `Connected`: the `watch` snapshot; then `Changed` with every update that queued since the last
  one, so a dashboard that falls behind gets one batch instead of a backlog.

What the coordinator sends is read here, once, into typed values (`ClusterUpdate`, the views of
gpudeck.protocol.views), with every string a peer wrote made visible (`gpudeck.text.visible`).
- `Lost`: the connection broke; it reconnects with backoff and sends `Connected` again.
"""

from __future__ import annotations

import asyncio
import copy
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol

from gpudeck import config
from gpudeck.client import NoCoordinator, connect, find_endpoints
from gpudeck.config import Endpoint
from gpudeck.model import JobSpec
from gpudeck.protocol import auth
from gpudeck.protocol.handshake import Refused
from gpudeck.protocol.messages import Cancel, Drain, ListNodes, ReadLogs, Submit, Usage, Watch
from gpudeck.protocol.views import JobView, NodeView, UsageView
from gpudeck.text import visible_data
from gpudeck.protocol.session import ClientSession

BACKOFF = (0.5, 1.0, 2.0, 3.0, 5.0)
CHECK_EVERY = 1.0  # how often a quiet connection is checked for end of stream
PING_AFTER = 10.0  # a connection quiet this long is asked something, to notice a silent failure
PING_TIMEOUT = 10.0


# --- what the coordinator sends ----------------------------------------------------------------------


def job_view(data: dict[str, Any]) -> JobView:
    """A job as a peer sent it, its strings made visible."""
    return JobView.from_json(visible_data(data))


def node_view(data: dict[str, Any]) -> NodeView:
    """A node as a peer sent it, its strings made visible."""
    return NodeView.from_json(visible_data(data))


@dataclass(frozen=True)
class ClusterUpdate:
    """The `watch` snapshot, or one update pushed after it: an update carries only the nodes and jobs
    that changed, the nodes that left, and the machines seen but not joined when those changed
    (None: unchanged); `time` is the coordinator's clock (None where it sent none)."""

    time: float | None = None
    nodes: list[NodeView] = field(default_factory=list)
    jobs: list[JobView] = field(default_factory=list)
    removed_nodes: list[str] = field(default_factory=list)
    unjoined: list[dict[str, Any]] | None = None

    @classmethod
    def decode(cls, data: dict[str, Any]) -> "ClusterUpdate":
        data = visible_data(data)
        at = data.get("time")
        return cls(time=float(at) if isinstance(at, (int, float)) else None,
                   nodes=[NodeView.from_json(node) for node in data.get("nodes", [])],
                   jobs=[JobView.from_json(job) for job in data.get("jobs", [])],
                   removed_nodes=list(data.get("removed_nodes", [])),
                   unjoined=list(data["unjoined"]) if "unjoined" in data else None)


# --- events ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NotFound:
    reason: str
    retry_in: float


@dataclass(frozen=True)
class Connected:
    where: str
    snapshot: ClusterUpdate
    user: str = ""  # who the token proved this dashboard to be


@dataclass(frozen=True)
class Changed:
    updates: list[ClusterUpdate]


@dataclass(frozen=True)
class Lost:
    reason: str
    retry_in: float
    attempt: int


LinkEvent = NotFound | Connected | Changed | Lost


class NotConnected(ConnectionError):
    """A request while there is no connection to the coordinator."""


class Link(Protocol):
    """What the app needs from the cluster."""

    def events(self) -> AsyncIterator[LinkEvent]: ...

    async def submit(self, spec: JobSpec) -> JobView: ...

    async def cancel(self, job: int, index: int | None = None) -> JobView: ...

    async def drain(self, node: str, on: bool) -> NodeView: ...

    async def read_logs(self, job: int, attempt: int | None, offsets: dict[str, int]) -> dict[str, Any]: ...

    async def usage(self, since: float) -> UsageView: ...


# --- the real thing -----------------------------------------------------------------------------------


class CoordinatorLink:
    """A coordinator found as the CLI finds it (flag, environment, this machine's data dir, mDNS), or
    at `endpoints` with `join_token` when the caller already knows (as `gpudeck up` does)."""

    def __init__(self, coordinator: str | None = None, token: str | None = None, token_file: str | None = None,
                 endpoints: list[Endpoint] | None = None, join_token: auth.JoinToken | None = None,
                 mdns_interfaces: list[str] | None = None, name: str = "tui") -> None:
        self.coordinator = coordinator
        self.token_text, self.token_file = token, token_file
        self.endpoints = endpoints
        self.join_token = join_token
        self.mdns_interfaces = mdns_interfaces
        self.name = name
        self.session: ClientSession | None = None
        self.where = ""

    async def _find(self) -> tuple[list[Endpoint], auth.JoinToken]:
        endpoints = self.endpoints or await find_endpoints(self.coordinator, self.mdns_interfaces)
        token = self.join_token or config.find_token(self.token_text, self.token_file)
        return endpoints, token

    async def check_token(self, token: auth.JoinToken) -> None:
        """Prove a token typed on the prompt (`gpudeck web`) by connecting with it once, and keep it
        for `events()`; raises what the connection raised (`Refused` for a wrong secret)."""
        endpoints = self.endpoints or await find_endpoints(self.coordinator, self.mdns_interfaces)
        async with connect(endpoints, token, self.name):
            pass
        self.join_token = token

    async def events(self) -> AsyncIterator[LinkEvent]:
        failures = 0
        connected_once = False
        while True:
            reason = ""
            try:
                endpoints, token = await self._find()
                async with connect(endpoints, token, self.name) as session:
                    snapshot = await session.request(Watch)
                    self.session = session
                    peer = session.conn.writer.get_extra_info("peername")
                    match = [e for e in endpoints if peer and e.host == peer[0] and e.port == peer[1]]
                    self.where = (f"{peer[0]}:{peer[1]}" if peer else "the coordinator") + (
                        f" ({match[0].how})" if match else "")
                    failures = 0
                    connected_once = True
                    yield Connected(self.where, ClusterUpdate.decode(snapshot),
                                    session.welcome.user if session.welcome else "")
                    async for batch in self._updates(session):
                        yield Changed([ClusterUpdate.decode(update) for update in batch])
            except (NoCoordinator, auth.TokenError, auth.PinMismatch, ValueError) as exc:
                reason = str(exc)
            except Refused as exc:
                reason = f"the coordinator refused this client: {exc}"
            except (OSError, ConnectionError, asyncio.TimeoutError, EOFError) as exc:
                reason = str(exc) or type(exc).__name__
            finally:
                self.session = None
            delay = BACKOFF[min(failures, len(BACKOFF) - 1)]
            failures += 1
            if connected_once:
                yield Lost(reason or "the coordinator closed the connection", delay, failures)
            else:
                yield NotFound(reason, delay)
            await asyncio.sleep(delay)

    async def _updates(self, session: ClientSession) -> AsyncIterator[list[dict[str, Any]]]:
        quiet_since = time.monotonic()
        while True:
            try:
                first = await asyncio.wait_for(session.updates.get(), CHECK_EVERY)
            except asyncio.TimeoutError:
                if session.closed.is_set():
                    raise ConnectionError(str(session.failure or "the coordinator closed the connection")) from None
                if time.monotonic() - quiet_since > PING_AFTER:
                    await session.request(ListNodes, timeout=PING_TIMEOUT)
                    quiet_since = time.monotonic()
                continue
            batch = [first]
            while not session.updates.empty():
                batch.append(session.updates.get_nowait())
            quiet_since = time.monotonic()
            yield batch

    async def _request(self, kind: Any, **fields: Any) -> Any:
        if self.session is None:
            raise NotConnected("not connected to the coordinator")
        return await self.session.request(kind, **fields)

    async def submit(self, spec: JobSpec) -> JobView:
        return job_view(await self._request(Submit, spec=spec.to_wire()))

    async def cancel(self, job: int, index: int | None = None) -> JobView:
        """Cancel a job; with `index`, only that task of the array `job` (its id alone cancels it all)."""
        return job_view(await self._request(Cancel, job=job, index=index))

    async def drain(self, node: str, on: bool) -> NodeView:
        return node_view(await self._request(Drain, node=node, on=on))

    async def read_logs(self, job: int, attempt: int | None, offsets: dict[str, int]) -> dict[str, Any]:
        return await self._request(ReadLogs, job=job, attempt=attempt, rank=None, offsets=offsets)

    async def usage(self, since: float) -> UsageView:
        """Everyone's GPU time from `since` to now."""
        return UsageView.from_json(visible_data(await self._request(Usage, since=since)))


# --- recorded data ---------------------------------------------------------------------------------


class RecordedLink:
    """Replays a snapshot and then `updates` every `interval` seconds, with no network: for snapshot
    tests (deterministic screens) and benchmarks. Submit, cancel and drain change the recorded jobs
    and nodes as a coordinator would, minus scheduling. `usage` holds recorded usage views; a request
    gets the one whose window starts nearest the time asked for. `not_found` replays a failed search
    instead."""

    def __init__(self, snapshot: dict[str, Any] | None = None, updates: list[dict[str, Any]] | None = None,
                 interval: float = 1.0, logs: dict[int, dict[str, bytes]] | None = None,
                 not_found: str | None = None, where: str = "recorded data",
                 usage: list[dict[str, Any]] | None = None) -> None:
        self.snapshot = copy.deepcopy(snapshot or {"time": 0.0, "nodes": [], "unjoined": [], "jobs": []})
        self.updates = list(updates or [])
        self.interval = interval
        self.logs = logs or {}
        self.recorded_usage = list(usage or [])
        self.not_found = not_found
        self.where = where
        self.sent: list[JobSpec] = []
        self.pushed: asyncio.Queue[dict[str, Any]] | None = None

    async def events(self) -> AsyncIterator[LinkEvent]:
        if self.not_found is not None:
            yield NotFound(self.not_found, 3600.0)
            await asyncio.Event().wait()
        self.pushed = asyncio.Queue()
        yield Connected(self.where, ClusterUpdate.decode(self.snapshot))
        for update in self.updates:
            await asyncio.sleep(self.interval)
            yield Changed([ClusterUpdate.decode(update)])
        while True:
            yield Changed([ClusterUpdate.decode(await self.pushed.get())])

    def push(self, update: dict[str, Any]) -> None:
        """Send an update now (tests and benchmarks)."""
        assert self.pushed is not None, "not started"
        self.pushed.put_nowait(update)

    def _job(self, job: int) -> dict[str, Any]:
        for item in self.snapshot["jobs"]:
            if item["id"] == job:
                return item
        raise Refused(f"there is no job {job}")

    async def submit(self, spec: JobSpec) -> JobView:
        self.sent.append(spec)
        job_id = max((j["id"] for j in self.snapshot["jobs"]), default=0) + 1
        job = JobView.build(job_id, spec, state="pending", reason="waiting for the scheduler",
                            submitted_at=self.snapshot["time"]).to_json()
        self.snapshot["jobs"].append(job)
        return job_view(job)

    async def cancel(self, job: int, index: int | None = None) -> JobView:
        item = self._job(job) if index is None else next(
            j for j in self.snapshot["jobs"] if (j.get("array_job"), j.get("array_index")) == (job, index))
        if item["state"] in ("succeeded", "failed", "cancelled"):
            raise Refused(f"job {job} already finished ({item['state']})")
        item.update(state="cancelled", reason="cancelled by a user", ended_at=self.snapshot["time"])
        return job_view(item)

    async def drain(self, node: str, on: bool) -> NodeView:
        for item in self.snapshot["nodes"]:
            if item["name"] == node:
                item["draining"] = on
                return node_view(item)
        raise Refused(f"there is no node {node}")

    async def usage(self, since: float) -> UsageView:
        if not self.recorded_usage:
            return UsageView(since=since, until=self.snapshot["time"], user=None, jobs=0, gpu_seconds=0.0,
                             gpu_hours=0.0, mean_wait_s=None, energy_j=None, energy_simulated=False, users=[],
                             by_job=[])
        recorded = min(self.recorded_usage, key=lambda view: abs((view["since"] or 0.0) - since))
        return UsageView.from_json(visible_data(recorded))

    async def read_logs(self, job: int, attempt: int | None, offsets: dict[str, int]) -> dict[str, Any]:
        item = self._job(job)
        chunks = {rank: data[offsets.get(rank, 0):] for rank, data in self.logs.get(job, {}).items()}
        return {"attempt": attempt or item["attempt"], "state": item["state"],
                "finished": item["state"] in ("succeeded", "failed", "cancelled"), "chunks": chunks}
