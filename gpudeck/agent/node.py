"""The node agent: finds the coordinator, connects out, heartbeats with telemetry, runs what it is told.

It never listens for commands, so a node has no port that could run code. Its loop never blocks: NVML
reads run in a worker thread, children are awaited by tasks, and a lost coordinator only means
reconnecting with backoff while the jobs keep running.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Awaitable

from gpudeck import config
from gpudeck.agent.gpus import GpuBackend
from gpudeck.agent.outputs import OutputKeeper
from gpudeck.agent.procs import marker_of, of_cluster, session_of
from gpudeck.agent.projects import ContentFetcher
from gpudeck.agent.runner import JobRunner
from gpudeck.agent.traffic_sink import TrafficSink
from gpudeck.agent.warm import WarmPool
from gpudeck.discovery import Discovery
from gpudeck.protocol import auth
from gpudeck.protocol.framing import FrameError
from gpudeck.protocol.messages import Error, Message, ProtocolError
from gpudeck.protocol.node_messages import (
    ContentChunk, Forget, Kill, Launch, SendOutput, LogOffsets, Register, Telemetry,
)
from gpudeck.protocol.payloads import GpuReading
from gpudeck.protocol.handshake import Refused
from gpudeck.protocol.session import Connection, open_session

log = logging.getLogger(__name__)
TELEMETRY_INTERVAL = 1.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 5.0
MDNS_WAIT = 5.0


@dataclass
class AgentConfig:
    name: str
    token: auth.JoinToken
    state_dir: Path
    coordinator: tuple[str, int] | None = None  # None: find it over mDNS
    mdns_interfaces: list[str] | None = None
    use_mdns: bool = True
    keep_outputs_for: float = config.KEEP_OUTPUTS_FOR
    outputs_space: int = config.OUTPUTS_SPACE
    cache_space: int = config.NODE_CACHE_LIMIT
    environments: int = config.ENVIRONMENTS_KEPT
    warm: int = config.WARM_INTERPRETERS
    run_as_owner: bool = False  # run each job as its owner's local account (the agent runs as root; see accounts)


class Agent:
    def __init__(self, config: AgentConfig, backend: GpuBackend) -> None:
        self.config = config
        self.backend = backend
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.sink = TrafficSink.reusing(config.state_dir / "traffic.port")
        self.fetcher = ContentFetcher(self.send)
        keeper = OutputKeeper(config.state_dir.resolve() / "outputs", config.keep_outputs_for, config.outputs_space)
        self.warm = WarmPool(config.warm, f"{config.token.cluster}/{config.name}", config.state_dir.resolve())
        self.discovery = Discovery(config.mdns_interfaces) if config.use_mdns else None
        self.runner = JobRunner(config.state_dir, config.token.cluster, config.name, self.sink, backend, self.send,
                                self.fetcher, keeper, config.cache_space, config.environments,
                                self.warm if config.warm else None, config.run_as_owner,
                                self._mdns_view if self.discovery else None)
        self.conn: Connection | None = None
        self.latest: list[GpuReading] = []
        self._first_seen: dict[tuple[str, int], float] = {}  # (GPU uuid, pid) -> when first seen there
        self._orders: set[asyncio.Task[None]] = set()  # launches (they may fetch and build) and kills

    async def run(self) -> None:
        """Run until cancelled; the jobs this node runs are left running (see `stop`)."""
        self.sink.start(asyncio.get_running_loop())
        self.runner.prune()
        self.runner.adopt()
        await self.warm.start()
        self.latest = await asyncio.to_thread(self.backend.read)
        if self.discovery:
            await self.discovery.start()
            await self.discovery.advertise("agent", self.config.name, port=9, gpus=self.backend.count())
        tasks = [asyncio.create_task(self._connect_forever()), asyncio.create_task(self._telemetry_loop())]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await self.stop()

    def _mdns_view(self) -> dict[str, list[str]]:
        """The adverts this node sees, as node names by role (gpudeck doctor shows who sees whom)."""
        adverts = self.discovery.adverts() if self.discovery else []
        return {role: sorted({a.node for a in adverts if a.role == role}) for role in ("agent", "coordinator")}

    async def stop(self, kill_jobs: bool = False) -> None:
        await self.runner.shutdown(kill_jobs)
        await self.warm.close()
        if self.conn:
            await self.conn.close()
        if self.discovery:
            await self.discovery.close()
        self.sink.close(asyncio.get_running_loop())
        self.backend.close()

    async def send(self, message: Message) -> bool:
        """Send if connected; a message lost while disconnected is recovered by the next register."""
        conn = self.conn
        if conn is None:
            return False
        try:
            await conn.send(message)
            return True
        except (OSError, ConnectionError, RuntimeError):
            return False

    # --- connection ----------------------------------------------------------------------------

    async def _connect_forever(self) -> None:
        delay = BACKOFF_FIRST
        while True:
            try:
                await self._session()
                delay = BACKOFF_FIRST
            except Refused as exc:
                log.error("the coordinator refused this agent: %s", exc)
            except auth.PinMismatch as exc:
                log.error("%s", exc)
            except (OSError, ConnectionError, asyncio.TimeoutError, FrameError, ProtocolError) as exc:
                log.info("no coordinator connection (%s); retrying in %.1f s", exc or type(exc).__name__, delay)
            self.conn = None
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, BACKOFF_MAX)

    async def _candidates(self) -> list[tuple[str, int]]:
        if self.config.coordinator:
            return [self.config.coordinator]
        if not self.discovery:
            raise ConnectionError("no --coordinator given and mDNS is off")
        found = await self.discovery.wait_for("coordinator", MDNS_WAIT)
        if not found:
            raise ConnectionError("no coordinator found over mDNS yet")
        return [(a.host, a.port) for a in found]

    async def _open(self) -> Connection:
        """The first candidate that proves to be this cluster's coordinator: a stale advert (a
        coordinator killed without a goodbye stays in mDNS caches for minutes) must not stop the rest."""
        failures = []
        for host, port in await self._candidates():
            try:
                conn, _ = await open_session(host, port, self.config.token, "agent", self.config.name)
                return conn
            except auth.PinMismatch:
                failures.append(f"{host}:{port} is another cluster's coordinator")
            except (OSError, asyncio.TimeoutError) as exc:
                failures.append(f"{host}:{port}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}")
        raise ConnectionError("; ".join(failures))

    async def _session(self) -> None:
        conn = await self._open()
        self.conn = conn
        self.runner.reconnected()
        address = conn.writer.get_extra_info("sockname")[0]
        await conn.send(Register(hostname=socket.gethostname(), address=address,
                                 simulated=getattr(self.backend, "simulated", False),
                                 gpus=self._readings(), jobs=self.runner.report()))
        for job in list(self.runner.jobs.values()):
            # Totals of attempts that ended while the coordinator was away go right behind the report.
            await self.runner.shipper.ship_traffic(job)
        await self.runner.shipper.report_outputs()
        log.info("joined the coordinator at %s as %s", conn.peer_host, self.config.name)
        try:
            while (message := await conn.recv()) is not None:
                await self._handle(message)
        finally:
            self.fetcher.disconnected()
        raise ConnectionError("the coordinator closed the connection")

    async def _handle(self, message: Message) -> None:
        # A launch may fetch the project and build its environment, and stopping takes up to the kill
        # grace: both go on while the connection is served (a launch is in `runner.jobs` at once, so a
        # kill that follows it finds it).
        if isinstance(message, Launch):
            self._in_background(self.runner.launch(message))
        elif isinstance(message, Kill):
            self._in_background(self.runner.kill(message.job, message.attempt, message.reason, message.grace))
        elif isinstance(message, ContentChunk):
            self.fetcher.arrived(message)
        elif isinstance(message, SendOutput):
            self._in_background(self.runner.shipper.send_output(message))
        elif isinstance(message, Forget):
            self.runner.forget(message.job, message.attempt)
        elif isinstance(message, LogOffsets):
            self.runner.resume_logs(message.sizes)
        elif isinstance(message, Error):
            raise Refused(message.message, message.code)
        else:
            log.warning("ignored an unexpected %s message from the coordinator", message.kind)

    def _in_background(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._orders.add(task)
        task.add_done_callback(self._orders.discard)

    # --- telemetry -----------------------------------------------------------------------------

    async def _telemetry_loop(self) -> None:
        while True:
            try:
                self.latest = await asyncio.to_thread(self.backend.read)
            except Exception:  # noqa: BLE001 - a broken reading must not stop the heartbeat
                log.exception("reading the GPUs failed")
            await self.send(Telemetry(gpus=self._readings(), warm=self.warm.status()))
            await self.runner.ship_all()
            await asyncio.sleep(TELEMETRY_INTERVAL)

    def _readings(self) -> list[GpuReading]:
        """The latest readings, each process marked foreign unless it is one of this cluster's ranks,
        and with the time this agent first saw it on that GPU (how long a forgotten notebook has held it)."""
        cluster = self.config.token.cluster
        sessions = self.runner.sessions()
        now = time.time()
        seen = {(reading.uuid, p.pid): self._first_seen.get((reading.uuid, p.pid), now)
                for reading in self.latest for p in reading.processes}
        self._first_seen = seen
        return [replace(reading, processes=tuple(
                    replace(p, since=seen[(reading.uuid, p.pid)],
                            foreign=not (of_cluster(marker_of(p.pid), cluster) or session_of(p.pid) in sessions))
                    for p in reading.processes))
                for reading in self.latest]
