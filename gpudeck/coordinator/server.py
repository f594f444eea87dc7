"""The coordinator process: accepts agents and clients over TLS, and runs the control loop.

Nothing is created or run for a peer before it proves the join token: the first frame of every
connection must be `Hello` with the secret, within a deadline; anything else ends that connection with
an error frame and touches nothing else.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any, Callable

from prometheus_client import CollectorRegistry

from gpudeck.arrays import ref_text
from gpudeck.coordinator.admission import (
    HELLO_FRAME_LIMIT, PROOF_DEADLINE, AdmissionGate, HeldConnection, give_freed_buffers_back, source_of, tls_streams,
)
from gpudeck.coordinator.health import GpuHealth
from gpudeck.coordinator.idle import IdleTracker, held_utilizations
from gpudeck.coordinator.jobs import DEFAULT_TIME_LIMIT, JOB_PORTS, PREEMPT_GRACE, JobControl
from gpudeck.coordinator.logs import LogStore, rank_problem
from gpudeck.coordinator.metrics import ClusterCollector, JobEvents, MetricsEndpoint
from gpudeck.coordinator.outputs import OutputRelay
from gpudeck.coordinator.priority import Policy
from gpudeck.coordinator.progress import ProgressBook
from gpudeck.coordinator.projects import ProjectStore
from gpudeck.coordinator.registry import SUSPECT_AFTER, AgentLink, Registry
from gpudeck.coordinator.store import JobFilter, JobRow, Store, StoreFull
from gpudeck.coordinator.traffic import TrafficBook
from gpudeck.coordinator.usage import EnergyMeter, usage_view
from gpudeck.coordinator.users import ADMIN, Caller, People, may_touch, need_admin, user_view
from gpudeck.coordinator.views import job_view, node_view, rank_nodes
from gpudeck.coordinator.watch import JOBS_PER_FRAME, Publisher, split_update
from gpudeck.config import ENDPOINT_FILE, HANG_AFTER, IDLE_AFTER, PROJECT_STORE_LIMIT
from gpudeck.discovery import Discovery
from gpudeck.model import JobSpec, JobState, NodeState
from gpudeck.project import DEFAULT_CAP, path_problem
from gpudeck.protocol import auth
from gpudeck.protocol.framing import FrameError
from gpudeck.protocol.messages import (
    PROTOCOL_VERSION, AddUser, Cancel, ContentPut, Cordon, CountJobs, Drain, Error, Hello, ListJobs, ListNodes,
    Message, ProjectOffer, ListUsers, ProtocolError, ReadLogs, ReadOutput, RemoveUser, Reply, ShowJob, Submit,
    Update, Usage, Watch, Welcome,
)
from gpudeck.protocol.node_messages import (
    ContentChunk, FetchContent, JobExited, JobPreparing, JobStarted, LogChunk, LogOffsets, OutputChunk, Outputs,
    Register, Telemetry, Traffic,
)
from gpudeck.protocol.payloads import GpuReading, JobReport
from gpudeck.protocol.handshake import HANDSHAKE_TIMEOUT
from gpudeck.protocol.session import Connection
from gpudeck.text import counted, spoken_duration

log = logging.getLogger(__name__)
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
TICK = 0.5
PUBLISH_EVERY = 1.0
WRONG_TOKEN_DELAY = 0.5
MAX_OUTPUTS_LISTED = 1000  # output files of one job on one node named in its view


@dataclasses.dataclass(frozen=True)
class CoordinatorConfig:
    """What a coordinator is run with: the command line's settings (made by `gpudeck.cli.services`), one
    record for `gpudeck coordinator` and `gpudeck up` alike, as AgentConfig is for the agent."""

    state_dir: Path
    host: str = "0.0.0.0"
    port: int = 7070
    mdns_interfaces: list[str] | None = None
    use_mdns: bool = True
    job_ports: tuple[int, int] = JOB_PORTS
    project_cap: int = DEFAULT_CAP
    project_store: int = PROJECT_STORE_LIMIT
    idle_after: float = IDLE_AFTER  # how long every GPU of a running job must read 0 % before it is marked idle
    idle_cancel: bool = False  # cancel a job once it is idle
    priority: Policy = Policy()  # the weights, fair-share half-life and age cap of pending jobs' priority
    default_time_limit: float = DEFAULT_TIME_LIMIT  # how long reservations plan a job without --time-limit to run
    preempt_grace: float = PREEMPT_GRACE  # a preempted job's seconds from SIGTERM to SIGKILL
    metrics: tuple[str, int] | None = None  # where to serve Prometheus metrics (None: nowhere)
    hang_after: float = HANG_AFTER  # how long a running job's ranks may complete no collective before it is hung


class Coordinator:
    def __init__(self, config: CoordinatorConfig, clock: Callable[[], float] = time.time) -> None:
        self.state_dir = config.state_dir
        self.scheduling = (config.priority, config.default_time_limit, config.preempt_grace)
        self.job_ports = config.job_ports
        self.project_limits = (config.project_cap, config.project_store)
        self.host, self.port = config.host, config.port
        self.identity = auth.CoordinatorIdentity(config.state_dir)
        self.clock = clock
        self.registry = Registry()
        self.discovery = Discovery(config.mdns_interfaces) if config.use_mdns else None
        # Why an agent seen over mDNS has not joined, by (address, node name), from refused handshakes.
        self.refused_agents: dict[tuple[str, str], str] = {}
        self.wake = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._connections: set[Connection] = set()
        self._callers: dict[Connection, Caller] = {}  # who each client connection proved to be
        self.gate = AdmissionGate()
        self._accepting: set[asyncio.Task[None]] = set()  # accepts, and closes of removed users' sessions
        self.publisher = Publisher()
        self.idle = IdleTracker(config.idle_after)
        self.progress = ProgressBook(config.hang_after, clock)
        self.idle_cancel = config.idle_cancel
        self.relay = OutputRelay(self.send)
        self._published_at = 0.0
        self.metrics_registry = CollectorRegistry(auto_describe=False)
        self.events = JobEvents(self.metrics_registry)
        self.metrics = MetricsEndpoint(self.metrics_registry, *config.metrics) if config.metrics else None

    async def start(self) -> tuple[str, int]:
        self.token = self.identity.ensure()
        self.store = Store(self.state_dir / "gpudeck.db")
        self.people = People(self.store, self.token)
        self.logs = LogStore(self.state_dir / "logs")
        self.projects = ProjectStore(self.state_dir / "projects", *self.project_limits)
        self.jobs = JobControl(self.store, self.registry, self.send, self.clock, self.job_ports, *self.scheduling)
        self.traffic = TrafficBook(self.store)
        self.energy = EnergyMeter(self.store)
        self.health = GpuHealth(self.store)
        self.store.on_move = self.events.moved
        self.metrics_registry.register(ClusterCollector(self.store, self.registry, self.jobs, self.traffic, self.clock))
        now = self.clock()
        for node in self.store.nodes():
            state = NodeState.DOWN if node.state is NodeState.DOWN else NodeState.SUSPECT
            self.registry.watch(node.name, state, since=now)
        self._tls = self.identity.server_context()
        give_freed_buffers_back()
        # Plain TCP: `_accept` starts TLS itself once the connection is admitted (see admission).
        self._server = await asyncio.get_running_loop().create_server(
            lambda: HeldConnection(self._accepted), self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        if self.metrics:
            await self.metrics.start()
        self._write_endpoint()
        if self.discovery:
            await self.discovery.start()
            await self.discovery.advertise("coordinator", socket.gethostname(), self.port)
        self._loop_task = asyncio.create_task(self._control_loop())
        log.info("coordinator listening on %s:%d (state in %s)", self.host, self.port, self.state_dir)
        return self.host, self.port

    def _write_endpoint(self) -> None:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        (self.state_dir / ENDPOINT_FILE).write_text(json.dumps({"host": host, "port": self.port, "pid": os.getpid()}))

    async def stop(self) -> None:
        """Stop serving; agents keep their jobs running and report them to the next coordinator."""
        if self._loop_task:
            self._loop_task.cancel()
        if self._server:
            self._server.close()
        if self.metrics:
            await self.metrics.stop()
        for conn in list(self._connections):
            await conn.close()
        if self.discovery:
            await self.discovery.close()
        (self.state_dir / ENDPOINT_FILE).unlink(missing_ok=True)
        self.energy.flush()
        self.store.close()

    # --- the control loop ----------------------------------------------------------------------

    async def _control_loop(self) -> None:
        while True:
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - one bad tick must not stop the cluster
                log.exception("control loop step failed")
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), TICK)
            except asyncio.TimeoutError:
                pass

    def _tick(self) -> None:
        for name, state in self.registry.tick(self.clock()):
            self.store.set_node_state(name, state, last_seen=self.registry.last_heard.get(name))
            log.info("node %s is %s", name, state.value)
            if state is NodeState.DOWN:
                self.jobs.lifecycle.node_down(name)
        self.jobs.lifecycle.enforce_time_limits()
        self._watch_idle()
        self._watch_progress()
        self.events.timed_pass(self.jobs.schedule)
        self.traffic.persist(self.clock())
        self.energy.persist(self.clock())
        self._publish()

    def _readings_of(self, node: str) -> list[GpuReading] | None:
        link = self.registry.link(node)
        return link.gpus if link else None

    def _watch_idle(self) -> None:
        """Mark running jobs whose GPUs all read 0 %, and with `idle_cancel` cancel those idle too long."""
        now = self.clock()
        self.idle.update(held_utilizations(self.store.jobs((JobState.RUNNING,)), self._readings_of), now)
        if not self.idle_cancel:
            return
        for job_id, since in self.idle.overdue():
            reason = f"its GPUs were idle for {spoken_duration(now - since)}"
            self.jobs.lifecycle.cancel(job_id, reason=reason)
            log.info("job %d cancelled: %s", job_id, reason)
            self.wake.set()

    def _watch_progress(self) -> None:
        """Forget jobs that stopped running; cancel those hung past their --hang-timeout."""
        running = self.store.jobs((JobState.RUNNING,))
        self.progress.keep_only({row.id for row in running})
        for row in running:
            timeout, stalled = row.spec.hang_timeout, self.progress.stalled_for(row.id)
            if timeout is not None and stalled is not None and stalled >= timeout:
                hang = self.progress.view(row.id, rank_nodes(row))
                reason = f"hung for {spoken_duration(stalled)}, past its --hang-timeout" + (
                    f": {hang.hung.sentence}" if hang and hang.hung else "")
                self.jobs.lifecycle.cancel(row.id, reason=reason)
                log.info("job %d cancelled: %s", row.id, reason)
                self.wake.set()

    def _publish(self) -> None:
        """Send watchers what changed, at most once a PUBLISH_EVERY; only the jobs the store wrote or
        that reported traffic since the last publish are looked at."""
        now = self.clock()
        if not self.publisher.watchers:
            self.store.take_changed_ids()  # nobody to tell; a new watcher starts from a snapshot
            self.traffic.take_changed()
            self.idle.take_changed()
            self.progress.take_changed()
            return
        if now - self._published_at < PUBLISH_EVERY:
            return
        self._published_at = now
        nodes = self._nodes()
        changed = {row.id: row for row in self.store.take_changed()}
        view_only = ((self.traffic.take_changed() | self.idle.take_changed() | self.progress.take_changed())
                     - set(changed))
        changed.update((job_id, row) for job_id in view_only if (row := self.store.job(job_id)) is not None)
        jobs = self._job_views(sorted(changed.values(), key=lambda row: row.id))
        update = self.publisher.publish_data(nodes["nodes"], nodes["unjoined"], jobs, now)
        if update:
            self.publisher.broadcast(update)

    def send(self, node: str, message: Message) -> bool:
        """Queue a message for a node's agent. A message that cannot be queued is not lost for good:
        the agent's next register is reconciled with the store (launches resent, stray ranks killed)."""
        link = self.registry.link(node)
        if link is None:
            return False
        if not link.conn.post(message):
            log.info("could not send %s to %s: %s", message.kind, node, link.conn.cut_off or "its connection closed")
            return False
        return True

    # --- connections ---------------------------------------------------------------------------

    def _accepted(self, tcp: asyncio.Transport) -> None:
        task = asyncio.get_running_loop().create_task(self._accept(tcp))
        self._accepting.add(task)
        task.add_done_callback(self._accepting.discard)

    async def _accept(self, tcp: asyncio.Transport) -> None:
        """Admit, start TLS, check the Hello within PROOF_DEADLINE of the accept, then serve."""
        self.gate.admit(tcp, source_of(tcp))
        deadline = asyncio.get_running_loop().time() + PROOF_DEADLINE
        try:
            conn = Connection(*await asyncio.wait_for(tls_streams(tcp, self._tls), PROOF_DEADLINE))
        except (OSError, asyncio.TimeoutError):
            self.gate.proven(tcp)
            tcp.abort()
            return
        self._connections.add(conn)
        try:
            proven = await self._handshake(conn, deadline - asyncio.get_running_loop().time())
            self.gate.proven(tcp)
            if proven is None:
                return
            hello, caller = proven
            conn.post(Welcome(coordinator=socket.gethostname(), version=PROTOCOL_VERSION,
                              project_cap=self.projects.cap, user=caller.name, admin=caller.admin))
            if hello.role == "agent":
                await self._serve_agent(conn, hello.name)
            else:
                await self._serve_client(conn, caller)
        except (FrameError, ProtocolError) as exc:
            self._refuse(conn, str(exc), "bad_frame")
        except (OSError, ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass
        except Exception:  # noqa: BLE001 - a bug met by one connection must not pass silently or spread
            log.exception("error while serving %s", conn.peer_host)
            self._refuse(conn, "internal error in the coordinator; see its log", "internal")
        finally:
            self.gate.proven(tcp)
            self._connections.discard(conn)
            await conn.close()

    @staticmethod
    def _refuse(conn: Connection, message: str, code: str) -> None:
        """Say why the connection ends; it is closed (after a bounded flush) by whoever serves it."""
        conn.post(Error(message=message, code=code, req=None))

    async def _handshake(self, conn: Connection, within: float) -> tuple[Hello, Caller] | None:
        """The peer's hello and who its token proves it to be; None (the peer told why) otherwise."""
        try:
            hello = await asyncio.wait_for(conn.recv(limit=HELLO_FRAME_LIMIT), max(within, 0.0))
        except asyncio.TimeoutError:
            self._refuse(conn, "no hello within the handshake deadline", "timeout")
            return None
        if not isinstance(hello, Hello):
            self._refuse(conn, "the first message must be hello", "bad_handshake")
            return None
        caller = self.people.caller(hello.secret)
        if caller is None:
            if hello.role == "agent":
                self.refused_agents[(conn.peer_host, hello.name)] = "it offered a wrong join token"
            log.warning("refused %s from %s: wrong join token", hello.role, conn.peer_host)
            await asyncio.sleep(WRONG_TOKEN_DELAY)
            self._refuse(conn, "the token is wrong: print the join token with `gpudeck token` on the "
                               "coordinator's machine, or ask its admin for yours (`gpudeck user add`)", "bad_token")
            return None
        if hello.role == "agent" and caller.name != ADMIN:
            self._refuse(conn, f"this is {caller.name}'s user token: a node joins only with the cluster's join "
                               "token (`gpudeck token` on the coordinator's machine)", "bad_token")
            return None
        problem = self._hello_problem(hello)
        if problem:
            self._refuse(conn, problem, "bad_hello")
            return None
        return hello, caller

    @staticmethod
    def _hello_problem(hello: Hello) -> str | None:
        if hello.version != PROTOCOL_VERSION:
            return (f"this coordinator speaks protocol {PROTOCOL_VERSION}, the peer {hello.version}: "
                    "install the same gpudeck version on both")
        if hello.role not in ("agent", "client"):
            return f"unknown role {hello.role!r}"
        if hello.role == "agent" and not NODE_NAME.match(hello.name):
            return (f"{hello.name!r} is not a usable node name (letters, digits, '.', '_' and '-', "
                    "at most 63, starting with a letter or digit)")
        return None

    # --- agents --------------------------------------------------------------------------------

    async def _serve_agent(self, conn: Connection, name: str) -> None:
        register = await asyncio.wait_for(conn.recv(), HANDSHAKE_TIMEOUT)
        if not isinstance(register, Register):
            self._refuse(conn, "an agent must register after hello", "bad_handshake")
            return
        previous = self.registry.link(name)
        if previous and self.clock() - previous.last_seen < SUSPECT_AFTER:
            # A restarted agent's old connection is closed by its kernel at once, and a crashed one's
            # goes silent: a live link under the same name is another agent, and replacing it would
            # make the two knock each other off for ever.
            self._refuse(conn, f"a node named {name} is already connected from {previous.hostname} "
                                     f"({previous.address}); give this agent another --name", "name_taken")
            return
        link = await self._join(conn, name, register)
        try:
            while (message := await conn.recv()) is not None:
                try:
                    await self._agent_message(link, message)
                except StoreFull as exc:
                    # What could not be stored comes again: exits and logs with the agent's next report.
                    log.error("%s", exc)
        finally:
            self.relay.node_left(name)
            if self.registry.detach(link):
                log.info("node %s disconnected", name)

    async def _join(self, conn: Connection, name: str, register: Register) -> AgentLink:
        now = self.clock()
        address = register.address or conn.peer_host
        link = AgentLink(name=name, hostname=register.hostname, address=address, simulated=register.simulated,
                         conn=conn, gpus=register.gpus, last_seen=now)
        previous = self.registry.attach(link)
        if previous:
            await previous.conn.close()
        self.store.upsert_node(name, register.hostname, address, register.simulated, register.gpus, now)
        self.store.forget_outputs(name)  # the agent reports what it keeps right after its register
        self.registry.states[name] = NodeState.UP
        self.health.observe(name, register.gpus, now)
        self.refused_agents.pop((conn.peer_host, name), None)
        log.info("node %s joined from %s with %d GPUs%s", name, address, len(register.gpus),
                 " (simulated)" if register.simulated else "")
        conn.post(LogOffsets(sizes=self._log_sizes(register.jobs)))
        self.jobs.lifecycle.reconcile(name, register.jobs)
        self.wake.set()
        return link

    def _log_sizes(self, held: list[JobReport]) -> dict[str, dict[int, int]]:
        return {f"{job.job}:{job.attempt}": self.logs.sizes(job.job, job.attempt) for job in held}

    async def _agent_message(self, link: AgentLink, message: Message) -> None:
        if self.registry.states.get(link.name) is NodeState.DOWN:
            # Back from a freeze or a partition on its old connection: its jobs were given up while it
            # was away. Closing makes it reconnect and register, which reconciles (and kills) them.
            log.info("node %s is back after being down; asking it to register again", link.name)
            await link.conn.close()
            return
        self.registry.heard(link.name, self.clock())
        if isinstance(message, Telemetry):
            held = {index: (share.job, share.attempt) for share in self.jobs.holding() if share.node == link.name
                    for index in share.gpus}
            self.energy.record(link.gpus, message.gpus, held, link.simulated)
            link.gpus, link.warm = message.gpus, message.warm
            if self.health.observe(link.name, link.gpus, self.clock()):
                self.wake.set()
        elif isinstance(message, JobStarted):
            self.jobs.lifecycle.started(link.name, message.job, message.attempt)
        elif isinstance(message, JobExited):
            self.jobs.lifecycle.exited(link.name, message.job, message.attempt, message.exit_code, message.detail,
                             message.retry, message.failed_at)
            row = self.store.job(message.job)
            self.traffic.persist_job(message.job, finished=row is None or row.state.finished)
            self.wake.set()
        elif isinstance(message, LogChunk):
            try:
                self.logs.write(message.job, message.attempt, message.rank, message.offset, message.data)
            except OSError as exc:
                log.warning("could not store a log chunk of job %d: %s", message.job, exc.strerror)
        elif isinstance(message, Traffic):
            self.traffic.record(message.job, message.attempt, message.by_rank)
            if message.sync:
                self.progress.record(message.job, message.attempt, message.sync)
        elif isinstance(message, FetchContent):
            link.conn.post(self._content_chunk(message))
        elif isinstance(message, JobPreparing):
            self.jobs.lifecycle.preparing(link.name, message.job, message.attempt, message.doing)
        elif isinstance(message, Outputs):
            self._kept_outputs(link.name, message)
        elif isinstance(message, OutputChunk):
            self.relay.answered(link.name, message)
        else:
            link.conn.post(Error(message=f"an agent may not send {message.kind}", code="bad_message", req=None))

    def _content_chunk(self, message: FetchContent) -> ContentChunk:
        try:
            data, size = self.projects.read(message.digest, message.offset)
        except LookupError as exc:
            return ContentChunk(digest=message.digest, offset=message.offset, size=0, data=b"", error=str(exc))
        return ContentChunk(digest=message.digest, offset=message.offset, size=size, data=data, error="")

    # --- clients -------------------------------------------------------------------------------

    async def _serve_client(self, conn: Connection, caller: Caller) -> None:
        self._callers[conn] = caller
        try:
            while (message := await conn.recv()) is not None:
                self._answer_one(conn, message, caller)
        finally:
            self._callers.pop(conn, None)
            self.publisher.unwatch(conn)
            self.projects.forget_client(id(conn))
            self.relay.client_left(conn)

    def _answer_one(self, conn: Connection, message: Message, caller: Caller) -> None:
        req = getattr(message, "req", None)
        if req is None:
            conn.post(Error(message=f"a client may not send {message.kind}", code="bad_message", req=None))
            return
        try:
            if isinstance(message, ReadOutput):
                self._relay_output(conn, message, caller)
                return
            data = self._answer(message, id(conn), caller)
        except PermissionError as exc:
            conn.post(Error(message=str(exc), code="forbidden", req=req))
            return
        except (ValueError, LookupError) as exc:
            conn.post(Error(message=str(exc), code="refused", req=req))
            return
        except StoreFull as exc:
            log.error("%s", exc)
            conn.post(Error(message=str(exc), code="disk_full", req=req))
            return
        if not isinstance(message, Watch):
            conn.post(Reply(req=req, data=data))
            return
        first, *rest = split_update(data)
        if conn.post(Reply(req=req, data=first)) and all(conn.post(Update(data=piece)) for piece in rest):
            self.publisher.watch(conn)

    def _answer(self, message: Message, client: int, caller: Caller) -> Any:
        if isinstance(message, Submit):
            row = self.jobs.submit(self._with_project(JobSpec.from_wire(message.spec), client), caller.name)
            self.wake.set()
            return self._job_views([row])[0]
        if isinstance(message, ProjectOffer):
            return self.projects.offer(client, message.manifest, self._projects_in_use())
        if isinstance(message, ContentPut):
            return {"received": self.projects.put(client, message.digest, message.offset, message.data)}
        if isinstance(message, ListJobs):
            if not 1 <= message.limit <= JOBS_PER_FRAME:
                raise ValueError(f"a page of jobs holds 1 to {JOBS_PER_FRAME} jobs")
            filters = _job_filter(message.states, message.since, message.before, message.owner)
            return self._job_views(self.store.jobs_page(message.after, message.limit, filters, message.newest))
        if isinstance(message, CountJobs):
            return self.store.count_jobs(_job_filter(message.states, message.since, None, message.owner))
        if isinstance(message, ShowJob):
            return self._job_views([self._job(message.job, message.index)])[0]
        if isinstance(message, Cancel):
            row = self._job(message.job, message.index)
            may_touch(caller, row, "cancel")
            whole = message.index is None and row.array_job == row.id  # `cancel 12`: every task of array 12
            row = self.jobs.lifecycle.cancel_array(row.id) if whole else self.jobs.lifecycle.cancel(row.id)
            self.wake.set()
            return self._job_views([row])[0]
        if isinstance(message, ListNodes):
            return self._nodes()
        if isinstance(message, ReadLogs):
            row = self._job(message.job, message.index)
            may_touch(caller, row, "read the logs of")
            return self._read_logs(message, row)
        if isinstance(message, Watch):
            nodes = self._nodes()
            jobs = self._job_views(self.store.jobs())
            return {"time": self.clock(), "nodes": nodes["nodes"], "unjoined": nodes["unjoined"], "jobs": jobs}
        if isinstance(message, Drain):
            need_admin(caller, "drain nodes")
            return self._drain(message)
        if isinstance(message, Cordon):
            need_admin(caller, "cordon or uncordon GPUs")
            return self._cordon(message)
        if isinstance(message, (AddUser, ListUsers, RemoveUser)):
            return self._users(message, caller)
        if isinstance(message, Usage):
            return self._usage(message)
        raise ValueError(f"a client may not send {message.kind}")

    def _usage(self, message: Usage) -> dict[str, Any]:
        """GPU time from `since` to now (see coordinator.usage); anyone may see everyone's, as `sreport`
        shows, and a removed user's past stays counted."""
        now = self.clock()
        held = self.store.held_gpus(message.since)
        job_ids = sorted({attempt.job for attempt in held})
        return usage_view(held, self.store.jobs_by_id(job_ids), self.energy.energy(job_ids), message.since, now,
                          message.user).to_json()

    def _with_project(self, spec: JobSpec, client: int) -> JobSpec:
        """The spec with its project's size from the stored manifest and what this client uploaded of
        it; refused while any of it is missing."""
        if not spec.run.project:
            return spec
        manifest = self.projects.complete(spec.run.project)
        return dataclasses.replace(spec, project_files=len(manifest.files), project_bytes=manifest.bytes,
                                   project_uploaded=self.projects.uploaded(client, spec.run.project))

    def _projects_in_use(self) -> set[str]:
        unfinished = self.store.jobs((JobState.PENDING, JobState.STARTING, JobState.RUNNING))
        return {row.spec.run.project for row in unfinished if row.spec.run.project}

    def _job_views(self, rows: list[JobRow]) -> list[dict[str, Any]]:
        traffic = self.traffic.totals([row.id for row in rows])
        outputs = self.store.outputs([row.id for row in rows])
        return [job_view(row, traffic[row.id], outputs[row.id], self.idle.idle_since(row.id),
                         *self.jobs.standing(row), progress=self.progress.view(row.id, rank_nodes(row))).to_json()
                for row in rows]

    def _kept_outputs(self, node: str, message: Outputs) -> None:
        """A node's word on what it keeps of a job's outputs: only of an attempt it had a share of."""
        if not any(share.node == node for share in self.store.attempt_nodes(message.job, message.attempt)):
            return
        files = [f for f in message.files[:MAX_OUTPUTS_LISTED] if path_problem(f.path) is None and f.size >= 0]
        self.store.set_outputs(message.job, node, message.attempt, files)

    def _users(self, message: AddUser | ListUsers | RemoveUser, caller: Caller) -> Any:
        if isinstance(message, AddUser):
            token = self.people.add(caller, message.name, message.admin, message.max_gpus, self.clock())
            log.info("%s added the user %s%s", caller.name, message.name, " (an admin)" if message.admin else "")
            return {**user_view(self.store.user(message.name)), "token": str(token)}  # type: ignore[arg-type]
        if isinstance(message, RemoveUser):
            self.people.remove(caller, message.name)
            log.info("%s removed the user %s", caller.name, message.name)
            self._close_sessions_of(message.name, f"the user {message.name} was removed by {caller.name}")
            return {"removed": message.name}
        return [user_view(user) for user in self.store.users()]

    def _close_sessions_of(self, name: str, why: str) -> None:
        """End every connection made with that user's token, telling it why (after a bounded flush)."""
        for conn, holder in list(self._callers.items()):
            if holder.name == name:
                conn.post(Error(message=why, code="user_removed", req=None))
                closing = asyncio.get_running_loop().create_task(conn.close())
                self._accepting.add(closing)  # held until done, like the accepts, so it is not collected
                closing.add_done_callback(self._accepting.discard)

    def _relay_output(self, conn: Connection, message: ReadOutput, caller: Caller) -> None:
        may_touch(caller, self._job(message.job), "read the outputs of")
        attempt, kept = self.store.kept_outputs(message.job, message.node)
        if not any(f.path == message.path for f in kept):
            conn.post(Error(message=f"{message.node} keeps no output {message.path!r} of job {message.job}",
                            code="refused", req=message.req))
            return
        self.relay.ask(conn, message.req, message.node, message.job, attempt, message.path, message.offset)

    def _job(self, job_id: int, index: int | None = None) -> JobRow:
        """The job, or with `index` that task of the array `job_id` (`12.3`)."""
        row = self.store.job(job_id) if index is None else self.store.task(job_id, index)
        if row is None:
            raise LookupError(f"there is no job {ref_text(job_id, index)}")
        return row

    def _nodes(self) -> dict[str, Any]:
        jobs_on: dict[str, list[int]] = {}
        for share in self.jobs.holding():
            jobs_on.setdefault(share.node, []).append(share.job)
        now = self.clock()
        cordons = self.store.cordoned_by_node()
        nodes = [node_view(n, self.registry, sorted(set(jobs_on.get(n.name, []))), now,
                           cordons.get(n.name, ())).to_json()
                 for n in self.store.nodes()]
        joined = {n["name"] for n in nodes}
        unjoined = []
        for advert in self.discovery.adverts("agent") if self.discovery else []:
            if advert.node not in joined:
                why = self.refused_agents.get((advert.host, advert.node),
                                              "it has not connected (is it given this coordinator's token?)")
                unjoined.append({"name": advert.node, "address": advert.host,
                                 "gpus": advert.gpus, "why": why})
        return {"nodes": nodes, "unjoined": unjoined}

    def _drain(self, message: Drain) -> dict[str, Any]:
        node = self.store.node(message.node)
        if node is None:
            raise LookupError(f"there is no node {message.node}")
        self.store.set_draining(message.node, message.on)
        log.info("node %s %s", message.node, "is draining: no new jobs" if message.on else "takes new jobs again")
        self.wake.set()
        return next(n for n in self._nodes()["nodes"] if n["name"] == message.node)

    def _cordon(self, message: Cordon) -> dict[str, Any]:
        node = self.store.node(message.node)
        if node is None:
            raise LookupError(f"there is no node {message.node}")
        link = self.registry.link(message.node)
        gpus = {gpu.index: gpu for gpu in (link.gpus if link else node.gpus)}
        if message.gpu not in gpus and message.on:
            have = f"GPUs 0 to {len(gpus) - 1}" if gpus else "no GPUs"
            raise LookupError(f"node {message.node} has no GPU {message.gpu} (it has {have})")
        if message.on:
            self.health.cordon(message.node, gpus[message.gpu],
                               f"cordoned by hand: {message.reason or 'no reason given'}", self.clock())
        else:
            self.health.uncordon(message.node, gpus.get(message.gpu), message.gpu)
        self.wake.set()
        return next(n for n in self._nodes()["nodes"] if n["name"] == message.node)

    def _read_logs(self, message: ReadLogs, row: JobRow) -> dict[str, Any]:
        """Log bytes of one attempt of the job `row`; refused, naming what there is, for an attempt the
        job has not had or a rank it does not have (a rank of a job still waiting has no log yet, and is
        no error)."""
        attempt = message.attempt if message.attempt is not None else row.attempt
        if message.attempt is not None and not 1 <= attempt <= row.attempt:
            had = f"it has had {counted(row.attempt, 'attempt')}" if row.attempt else "it has not started yet"
            raise LookupError(f"job {row.id} has no attempt {attempt}: {had}")
        if message.rank is not None and message.rank not in self.logs.ranks(row.id, attempt):
            spec = row.spec
            placed = len(self.store.attempt_nodes(row.id, attempt)) or None
            problem = rank_problem(row.id, message.rank, spec.ranks, placed, spec.nodes or spec.gpus or 1)
            if problem:
                raise LookupError(problem)
        chunks = self.logs.read(row.id, attempt, message.offsets, message.rank)
        return {"attempt": attempt, "state": row.state.value, "finished": row.state.finished, "reason": row.reason,
                "per_node": bool(row.spec.run.command),  # a command's output is each node's own channel
                "chunks": {str(rank): data for rank, data in chunks.items()}}


def _job_filter(states: list[str], since: float | None, before: int | None, owner: str | None) -> JobFilter:
    known = [state.value for state in JobState]
    unknown = [state for state in states if state not in known]
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not a job state (the states are {', '.join(known)})")
    return JobFilter(tuple(JobState(state) for state in states), since, before, owner)
