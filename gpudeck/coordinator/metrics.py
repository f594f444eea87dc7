"""Prometheus metrics of the cluster, served at `/metrics` (`gpudeck coordinator --metrics HOST:PORT`).

Labs already run Prometheus and Grafana; this plugs gpudeck into them instead of asking for a new
dashboard. GPU series use the names, units and labels of NVIDIA's dcgm-exporter
(`DCGM_FI_DEV_GPU_UTIL` in %, `DCGM_FI_DEV_FB_USED`/`_FB_FREE` in MiB, `DCGM_FI_DEV_GPU_TEMP` in °C,
`DCGM_FI_DEV_POWER_USAGE` in W, `DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION` in mJ; labels `gpu`, `UUID`,
`modelName`, `Hostname`), so existing dashboards work unchanged, plus `job` and `owner` of the job
holding the GPU (the way dcgm-exporter's `hpc_job` label works; Prometheus stores a scraped `job`
label as `exported_job` unless the scrape sets `honor_labels: true`) and `simulated`, "true" on the
simulated backend's GPUs. The energy counter is exposed as a gauge, as dcgm-exporter's series is
read: prometheus-client would rename a counter to `…_total`, which no dashboard queries.

The endpoint is read-only and unauthenticated, like every exporter, and is off by default; given
only a port it listens on loopback. Since anyone who reaches it can ask, what a request may cost is
bounded: a few connections at a time, a request head of a few KiB read within seconds, and the text
built at most once a second whatever the number of requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from gpudeck.coordinator.jobs import JobControl
from gpudeck.coordinator.registry import Registry
from gpudeck.coordinator.store import JobRow, Store
from gpudeck.coordinator.traffic import TrafficBook
from gpudeck.model import JobState, NodeState
from gpudeck.protocol.payloads import GpuReading

log = logging.getLogger(__name__)
MIB = 1024 * 1024
MAX_CONNECTIONS = 16  # scrapers at once; more are closed unanswered
MAX_REQUEST_HEAD = 8192
READ_DEADLINE = 5.0  # seconds for the request head, and again for the answer to leave
BUILD_EVERY = 1.0  # the text is rebuilt at most this often (Prometheus scrapes every 15 s or so)
WAIT_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600, float("inf"))
PASS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, float("inf"))
GPU_LABELS = ("gpu", "UUID", "modelName", "Hostname", "node", "job", "owner", "simulated")  # dcgm-exporter's
OWN_GPU_LABELS = ("node", "gpu", "uuid")  # gpudeck's own series follow Prometheus' snake_case rule


class JobEvents:
    """What happens to jobs, counted as it happens: how long each waited before its first start,
    how each ended, and how long scheduling passes take. Counted from this coordinator's start, as
    Prometheus counters are (its `rate` and `increase` handle the reset at a restart)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.queue_wait = Histogram("gpudeck_queue_wait_seconds", "Seconds from submit to a job's first start.",
                                    buckets=WAIT_BUCKETS, registry=registry)
        self.exits = Counter("gpudeck_job_exits", "Jobs that ended, by outcome (requeued: lost a node or "
                             "was preempted and waits again).", ["outcome"], registry=registry)
        self.passes = Histogram("gpudeck_scheduling_pass_seconds", "Seconds one scheduling pass took, by kind "
                                "(full, new jobs, none).", ["kind"], buckets=PASS_BUCKETS, registry=registry)
        for outcome in ("succeeded", "failed", "cancelled", "requeued"):
            self.exits.labels(outcome)

    def moved(self, before: JobState, row: JobRow) -> None:
        """A job changed state (`Store.on_move`)."""
        if row.state is JobState.STARTING and row.attempt == 1 and row.started_at is not None:
            self.queue_wait.observe(max(0.0, row.started_at - row.submitted_at))
        elif row.state.finished:
            self.exits.labels(row.state.value).inc()
        elif before.active and row.state is JobState.PENDING:
            self.exits.labels("requeued").inc()

    def timed_pass(self, schedule: Callable[[], str]) -> str:
        started = time.perf_counter()
        kind = schedule()
        self.passes.labels(kind).observe(time.perf_counter() - started)
        return kind


@dataclass(eq=False)  # registered by identity
class ClusterCollector(Collector):
    """The cluster as it is at a scrape, read from the coordinator's memory (the registry's live
    readings, the store's cached rows) and one grouped count of the jobs table."""

    store: Store
    registry: Registry
    jobs: JobControl
    traffic: TrafficBook
    clock: Callable[[], float]

    def collect(self) -> Iterator[Metric]:
        holders = self._holders()
        yield from self._gpu_metrics(holders)
        yield from self._node_metrics()
        yield self._gpu_states(holders)
        yield from self._job_metrics()

    def _holders(self) -> dict[tuple[str, int], JobRow]:
        """The job holding each (node, GPU index)."""
        shares = self.jobs.holding()
        rows = self.store.jobs_by_id(sorted({share.job for share in shares}))
        return {(share.node, index): rows[share.job] for share in shares if share.job in rows for index in share.gpus}

    def _readings(self) -> Iterator[tuple[str, str, bool, GpuReading]]:
        """(node, hostname, simulated, reading) of every connected node's GPUs."""
        for name, link in sorted(self.registry.links.items()):
            for gpu in link.gpus:
                yield name, link.hostname, link.simulated, gpu

    def _gpu_metrics(self, holders: dict[tuple[str, int], JobRow]) -> Iterator[Metric]:
        families = {
            "util": GaugeMetricFamily("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", labels=GPU_LABELS),
            "used": GaugeMetricFamily("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", labels=GPU_LABELS),
            "free": GaugeMetricFamily("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", labels=GPU_LABELS),
            "temp": GaugeMetricFamily("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", labels=GPU_LABELS),
            "power": GaugeMetricFamily("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", labels=GPU_LABELS),
            "energy": GaugeMetricFamily("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
                                        "Total energy consumption since boot (in mJ).", labels=GPU_LABELS),
            "ecc": GaugeMetricFamily("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "Uncorrected (double-bit) ECC errors since "
                                     "the driver loaded.", labels=GPU_LABELS),
            "remapped": GaugeMetricFamily("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "Rows remapped for "
                                          "uncorrectable errors.", labels=GPU_LABELS),
        }
        cordoned = self.store.cordons()
        cordon = GaugeMetricFamily("gpudeck_gpu_cordoned", "1 for a GPU kept out of the schedule for a fault or by "
                                   "an admin (gpudeck nodes says why).", labels=OWN_GPU_LABELS)
        foreign = GaugeMetricFamily("gpudeck_gpu_foreign_processes", "Processes on a GPU that belong to no "
                                    "gpudeck job (a notebook or script run by hand).", labels=OWN_GPU_LABELS)
        for node, hostname, simulated, gpu in self._readings():
            holder = holders.get((node, gpu.index))
            labels = [str(gpu.index), gpu.uuid, gpu.name, hostname, node, str(holder.id) if holder else "",
                      holder.owner if holder else "", "true" if simulated else "false"]
            total, used = gpu.memory_total, gpu.memory_used
            free = total - used if total is not None and used is not None else None
            for key, value in (("util", gpu.utilization), ("temp", gpu.temperature), ("power", gpu.power),
                               ("energy", gpu.energy_mj), ("ecc", gpu.ecc_uncorrected), ("remapped", gpu.remapped_rows),
                               ("used", gpu.memory_used / MIB if gpu.memory_used is not None else None),
                               ("free", free / MIB if free is not None else None)):
                if value is not None:
                    families[key].add_metric(labels, value)
            record = cordoned.get((node, gpu.index))
            cordon.add_metric([node, str(gpu.index), gpu.uuid], 1 if record and record.cordoned else 0)
            foreign.add_metric([node, str(gpu.index), gpu.uuid], sum(1 for process in gpu.processes if process.foreign))
        yield from families.values()
        yield cordon
        yield foreign

    def _node_metrics(self) -> Iterator[Metric]:
        nodes = self.store.nodes()
        by_state = GaugeMetricFamily("gpudeck_nodes", "Nodes by state (up, suspect: missed heartbeats, down).",
                                     labels=["state"])
        for state in NodeState:
            by_state.add_metric([state.value], sum(
                1 for node in nodes if self.registry.states.get(node.name, node.state) is state))
        yield by_state
        yield GaugeMetricFamily("gpudeck_nodes_draining", "Nodes that take no new jobs (gpudeck drain).",
                                value=sum(1 for node in nodes if node.draining))

    def _gpu_states(self, holders: dict[tuple[str, int], JobRow]) -> Metric:
        counts = dict.fromkeys(("free", "busy", "foreign", "cordoned"), 0)
        cordoned = {(row.node, row.gpu) for rows in self.store.cordoned_by_node().values() for row in rows}
        for node, _, _, gpu in self._readings():
            if (node, gpu.index) in holders:
                counts["busy"] += 1
            elif (node, gpu.index) in cordoned:
                counts["cordoned"] += 1
            elif any(process.foreign for process in gpu.processes):
                counts["foreign"] += 1
            else:
                counts["free"] += 1
        family = GaugeMetricFamily("gpudeck_gpus", "GPUs of connected nodes: free, busy (held by a gpudeck "
                                   "job), cordoned (kept out for a fault) or foreign (used by a process outside "
                                   "gpudeck).", labels=["state"])
        for state, count in counts.items():
            family.add_metric([state], count)
        return family

    def _job_metrics(self) -> Iterator[Metric]:
        counts = self.store.count_by_state()
        by_state = GaugeMetricFamily("gpudeck_jobs", "Jobs by state.", labels=["state"])
        for state in JobState:
            by_state.add_metric([state.value], counts.get(state, 0))
        yield by_state
        pending = self.store.jobs((JobState.PENDING,))
        now = self.clock()
        yield GaugeMetricFamily("gpudeck_queue_oldest_wait_seconds", "Seconds the longest-waiting pending job "
                                "has waited since it was submitted (0 with none).",
                                value=max((now - row.submitted_at for row in pending), default=0.0))
        active = self.store.jobs((JobState.STARTING, JobState.RUNNING))
        traffic = CounterMetricFamily("gpudeck_job_traffic_bytes", "Parameter-sync payload bytes a running job's "
                                      "ranks handed to torch.distributed, by kind of operation.",
                                      labels=["job", "owner", "kind"])
        totals = self.traffic.totals([row.id for row in active])
        for row in active:
            kinds: dict[str, int] = {}
            for by_kind in totals[row.id].values():
                for kind, count in by_kind.items():
                    kinds[kind] = kinds.get(kind, 0) + count
            for kind, count in sorted(kinds.items()):
                traffic.add_metric([str(row.id), row.owner, kind], count)
        yield traffic


class MetricsEndpoint:
    """The bounded HTTP server of `/metrics`, on the coordinator's event loop."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        self.host, self.port = host, port
        self._server: asyncio.AbstractServer | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._built: tuple[float, bytes] = (-BUILD_EVERY, b"")

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_REQUEST_HEAD)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {self.host}:{self.port}: {exc.strerror or exc}") from None
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def stop(self) -> None:
        if self._server:
            self._server.close()
        for writer in self._open:  # their handlers see the stream end and finish
            writer.transport.abort()

    def _text(self) -> bytes:
        built_at, text = self._built
        now = time.monotonic()
        if now - built_at >= BUILD_EVERY:
            text = generate_latest(self.registry)
            self._built = (now, text)
        return text

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._open) >= MAX_CONNECTIONS:
            writer.close()
            return
        self._open.add(writer)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_DEADLINE)
            writer.write(self._answer(head))
            await asyncio.wait_for(writer.drain(), READ_DEADLINE)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            self._open.discard(writer)
            writer.close()

    def _answer(self, head: bytes) -> bytes:
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD"):
            return _response(405, "text/plain", b"Only GET /metrics is served here.\n")
        path = parts[1].split(b"?", 1)[0]
        if path != b"/metrics":
            return _response(404, "text/plain", b"gpudeck serves its Prometheus metrics at /metrics.\n")
        body = self._text()
        return _response(200, CONTENT_TYPE_LATEST, b"" if parts[0] == b"HEAD" else body, len(body))


def _response(status: int, content_type: str, body: bytes, length: int | None = None) -> bytes:
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}[status]
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n\r\n")
    return head.encode() + body
