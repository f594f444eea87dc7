"""The dashboard's state, without Textual: the cluster as the coordinator streams it, and what the
screens derive from it (GPU history, traffic rates, the rank-to-rank matrix, request checks).

`Cluster.reset` takes the `watch` snapshot and `Cluster.apply` each pushed update (both read by the
link into a `ClusterUpdate` of typed views); both return a
`Changes` saying which rows changed, so a view repaints only those. Everything here is plain Python
so it is unit-tested without a terminal.

Traffic: a job's view carries cumulative payload bytes per rank and kind. Rates come from the
difference between two updates divided by the coordinator's time between them. An active job that
is absent from an update did not change, so it gets a sample with the same totals (rate 0): a job
that falls silent drops to zero instead of showing its last rate forever.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol, Sequence, runtime_checkable

from gpudeck.capacity import MAX_GPUS, MAX_GPUS_PER_NODE, MAX_NODES, impossible_reason
from gpudeck.model import format_duration
from gpudeck.protocol.views import CordonView, GpuProcess, GpuReading, JobView, NodeView, UsageView, UserUsage
from gpudeck.text import human_bytes

if TYPE_CHECKING:
    from gpudeck.tui.client import ClusterUpdate

HISTORY = 60  # samples kept per GPU and per job (about a minute at one update a second)
RATE_WINDOW = 3  # samples averaged for a displayed rate
ACTIVE_STATES = ("starting", "running")
FINISHED_STATES = ("succeeded", "failed", "cancelled")
GIB = 1 << 30


# --- what changed -----------------------------------------------------------------------------------


@dataclass
class Changes:
    """Which parts of the cluster changed; views repaint only these. Merged when updates queue up."""

    nodes: set[str] = field(default_factory=set)
    jobs: set[int] = field(default_factory=set)
    node_set: bool = False  # nodes joined or left (the row list changes)
    job_set: bool = False  # jobs added or changed state (the row order may change)
    unjoined: bool = False
    traffic: bool = False
    usage: bool = False  # new usage figures for the people view
    reset: bool = False  # a new snapshot: rebuild everything

    def merge(self, other: "Changes") -> "Changes":
        self.nodes |= other.nodes
        self.jobs |= other.jobs
        self.node_set |= other.node_set
        self.job_set |= other.job_set
        self.unjoined |= other.unjoined
        self.traffic |= other.traffic
        self.usage |= other.usage
        self.reset |= other.reset
        return self

    def __bool__(self) -> bool:
        return bool(self.nodes or self.jobs or self.node_set or self.job_set or self.unjoined or self.traffic
                    or self.usage or self.reset)


@runtime_checkable
class FollowsCluster(Protocol):
    """A screen that shows the cluster: after each batch of updates the app tells every such screen
    on its stack what changed (the views under the tabs it calls by name)."""

    def model_changed(self, changes: Changes) -> None: ...


@runtime_checkable
class Ticking(Protocol):
    """A screen whose text moves on with the clock alone (runtimes, planned starts): the app calls
    `tick` once a second while it is on top."""

    def tick(self) -> None: ...


# --- traffic ---------------------------------------------------------------------------------------


class JobTraffic:
    """Cumulative byte samples of one job attempt, and the rates between them.

    Each sample is (coordinator time, {rank: {kind: cumulative bytes}}).
    """

    def __init__(self, attempt: int) -> None:
        self.attempt = attempt
        self.samples: deque[tuple[float, dict[int, dict[str, int]]]] = deque(maxlen=HISTORY + 1)

    def add(self, at: float, by_rank: dict[str, dict[str, int]] | dict[int, dict[str, int]]) -> None:
        ranks = {int(rank): dict(kinds) for rank, kinds in by_rank.items()}
        if self.samples and at <= self.samples[-1][0]:
            self.samples[-1] = (self.samples[-1][0], ranks)  # same instant: keep the newest totals
            return
        self.samples.append((at, ranks))

    def repeat(self, at: float) -> None:
        """A sample with unchanged totals: the job sent nothing since the last one."""
        if self.samples and at > self.samples[-1][0]:
            self.samples.append((at, self.samples[-1][1]))

    @property
    def latest(self) -> dict[int, dict[str, int]]:
        return self.samples[-1][1] if self.samples else {}

    def _interval_rates(self, a: int, b: int) -> dict[int, dict[str, float]]:
        (t0, before), (t1, after) = self.samples[a], self.samples[b]
        dt = t1 - t0
        rates: dict[int, dict[str, float]] = {}
        for rank, kinds in after.items():
            old = before.get(rank, {})
            rates[rank] = {kind: max(0, count - old.get(kind, 0)) / dt for kind, count in kinds.items()}
        return rates

    def rank_rates(self, window: int = RATE_WINDOW) -> dict[int, dict[str, float]]:
        """Bytes per second by rank and kind over the last `window` intervals."""
        if len(self.samples) < 2:
            return {rank: {kind: 0.0 for kind in kinds} for rank, kinds in self.latest.items()}
        first = max(0, len(self.samples) - 1 - window)
        return self._interval_rates(first, len(self.samples) - 1)

    def kind_rates(self, window: int = RATE_WINDOW) -> dict[str, float]:
        return _sum_kinds(self.rank_rates(window).values())

    def total_rate(self, window: int = RATE_WINDOW) -> float:
        return sum(self.kind_rates(window).values())

    def series(self, kind: str | None = None, points: int = HISTORY) -> list[float]:
        """The rate of each interval, oldest first: of one kind, or of all kinds when None."""
        out = []
        for index in range(max(1, len(self.samples) - points), len(self.samples)):
            rates = _sum_kinds(self._interval_rates(index - 1, index).values())
            out.append(sum(rates.values()) if kind is None else rates.get(kind, 0.0))
        return out

    def kinds(self) -> list[str]:
        return sorted({kind for kinds in self.latest.values() for kind in kinds})


def _sum_kinds(per_rank: Iterable[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for kinds in per_rank:
        for kind, value in kinds.items():
            total[kind] = total.get(kind, 0.0) + value
    return dict(sorted(total.items()))


# --- ranks, placement and the sync matrix ----------------------------------------------------------


@dataclass(frozen=True)
class RankPlace:
    rank: int
    node: str
    node_rank: int
    local_rank: int
    gpu: int | None


def rank_places(job: JobView) -> list[RankPlace]:
    """Where each rank runs. torchrun's static rendezvous numbers ranks node by node in node-rank
    order, each node taking as many ranks as it has GPUs: node 0 gets ranks 0..g0-1, node 1 the
    next g1, and so on; local rank i uses the node's i-th granted GPU."""
    places = []
    rank = 0
    for place in sorted(job.placement, key=lambda p: p.node_rank):
        for local, gpu in enumerate(place.gpus):
            places.append(RankPlace(rank, place.node, place.node_rank, local, gpu))
            rank += 1
    return places


# Kinds whose bytes a rank receives rather than sends: the mirror of a peer's send, left out of the
# matrix so that each byte is counted once.
RECEIVED_KINDS = frozenset({"recv"})
POINT_TO_POINT_KINDS = frozenset({"send"})
ALL_TO_ALL_KINDS = frozenset({"all_to_all"})

MATRIX_HELP = (
    "The node matrix is derived, not measured: ranks count the bytes they hand to torch.distributed, "
    "not where the bytes go. Ranks are placed as torchrun numbers them (node 0 holds ranks 0..g0-1, "
    "node 1 the next, and so on). Collectives (all_reduce, broadcast, all_gather, reduce_scatter, ...) "
    "are taken to run as a ring, so rank r sends its bytes to rank r+1 (the last rank to rank 0); "
    "all_to_all spreads a rank's bytes evenly over the others; send goes to the next rank in a "
    "pipeline (the last stage sends back to the one before it); recv is the mirror of a peer's send "
    "and is left out so no byte counts twice. A row is what a node sends, a column what it receives."
)


def rank_flows(kind: str, rank: int, world: int) -> list[tuple[int, float]]:
    """(destination rank, share of the bytes) for `kind` sent by `rank` in a job of `world` ranks."""
    if world <= 1 or kind in RECEIVED_KINDS:
        return [(rank, 1.0)] if world == 1 and kind not in RECEIVED_KINDS else []
    if kind in ALL_TO_ALL_KINDS:
        others = [r for r in range(world) if r != rank]
        return [(r, 1.0 / len(others)) for r in others]
    if kind in POINT_TO_POINT_KINDS:
        return [(rank + 1 if rank + 1 < world else rank - 1, 1.0)]
    return [((rank + 1) % world, 1.0)]


def node_matrix(job: JobView, rank_rates: dict[int, dict[str, float]]) -> tuple[list[str], list[list[float]]]:
    """Nodes in node-rank order and matrix[from][to] of bytes per second between them (see MATRIX_HELP)."""
    places = rank_places(job)
    names: list[str] = []
    for place in places:
        if place.node not in names:
            names.append(place.node)
    index_of = {p.rank: names.index(p.node) for p in places}
    world = len(places)
    matrix = [[0.0] * len(names) for _ in names]
    for rank, kinds in rank_rates.items():
        if rank not in index_of:
            continue
        for kind, rate in kinds.items():
            for dest, share in rank_flows(kind, rank, world):
                if dest in index_of:
                    matrix[index_of[rank]][index_of[dest]] += rate * share
    return names, matrix


SLOW_FRACTION = 0.5


def rank_health(places: Sequence[RankPlace], rank_rates: dict[int, dict[str, float]], running: bool) -> dict[int, str]:
    """'silent' for a rank that sends nothing (or never reported) while others send, 'slow' for one
    below half the median of the others, '' otherwise. Only judged while the job runs."""
    totals = {p.rank: sum(rank_rates.get(p.rank, {}).values()) for p in places}
    flags = {rank: "" for rank in totals}
    if not running or len(totals) < 2:
        return flags
    for rank, value in totals.items():
        others = sorted(v for r, v in totals.items() if r != rank)
        median = (others[len(others) // 2] if len(others) % 2
                  else (others[len(others) // 2 - 1] + others[len(others) // 2]) / 2)
        if median <= 0:
            continue
        if value <= 0:
            flags[rank] = "silent"
        elif value < SLOW_FRACTION * median:
            flags[rank] = "slow"
    return flags


# --- the cluster -------------------------------------------------------------------------------------

USAGE_WINDOWS = {"day": 86400.0, "week": 7 * 86400.0}  # the people view's recent usage, in seconds back


@dataclass(frozen=True)
class Person:
    """One user in the people view: their jobs now, and their usage (a `UserUsage`'s fields) over the
    last day and week; None where they had none, or (`known` False) before the first figures came."""

    user: str
    running_gpus: int
    running_jobs: int
    pending_jobs: int
    day: UserUsage | None
    week: UserUsage | None
    known: bool



def job_sort_key(job: JobView) -> tuple[int, float, int]:
    """Running first, then the queue in the order it is served (priority score, or --priority from a
    coordinator that sends none, then submit order), then history, newest first."""
    state = job.state
    if state in ACTIVE_STATES:
        return (0, 0, -job.id)
    if state == "pending":
        score = job.priority_score
        return (1, -(job.priority if score is None else score), job.id)
    return (2, 0, -job.id)


class Cluster:
    """Nodes, GPUs and jobs as last reported, plus the history the views draw."""

    def __init__(self, wall: Callable[[], float] = time.time, mono: Callable[[], float] = time.monotonic) -> None:
        self.wall = wall
        self.mono = mono
        self._counter = 0  # never reset, so a version is never reused, even across snapshots
        self.placement_version = 0
        self.clear()

    def clear(self) -> None:
        self.nodes: dict[str, NodeView] = {}
        self.node_heard: dict[str, float] = {}  # local monotonic time each node view arrived
        self.unjoined: list[dict[str, Any]] = []
        self.jobs: dict[int, JobView] = {}
        self.gpu_util: dict[tuple[str, int], deque[float]] = {}
        self.node_util: dict[str, deque[float]] = {}
        self.traffic: dict[int, JobTraffic] = {}
        self.cluster_rate: deque[float] = deque(maxlen=HISTORY)
        self.gpu_jobs: dict[tuple[str, int], int] = {}
        # Counters that change when a row's data does, so views redraw only what changed.
        self.node_version: dict[str, int] = {}
        self.job_version: dict[int, int] = {}
        self.usage: dict[str, UsageView] = {}  # USAGE_WINDOWS name -> the coordinator's usage view
        self.clock_offset = 0.0  # coordinator time minus local wall time
        self.time = 0.0
        self.connected = False

    # --- input -----------------------------------------------------------------------------------

    def reset(self, snapshot: ClusterUpdate) -> Changes:
        """Replace everything with the `watch` snapshot."""
        self.clear()
        self.connected = True
        self._set_time(snapshot.time)
        for node in snapshot.nodes:
            self._put_node(node)
        self.unjoined = list(snapshot.unjoined or [])
        for job in snapshot.jobs:
            self._put_job(job)
        self._index_gpu_jobs()
        return Changes(reset=True, node_set=True, job_set=True, unjoined=True, traffic=True,
                       nodes=set(self.nodes), jobs=set(self.jobs))

    def apply(self, update: ClusterUpdate) -> Changes:
        """Merge one pushed update (it carries only what changed)."""
        changes = Changes()
        self._set_time(update.time)
        for node in update.nodes:
            changes.node_set |= node.name not in self.nodes
            changes.nodes.add(node.name)
            self._put_node(node)
        for name in update.removed_nodes:
            if self.nodes.pop(name, None) is not None:
                changes.node_set = True
                self.node_heard.pop(name, None)
                self.node_util.pop(name, None)
                for key in [k for k in self.gpu_util if k[0] == name]:
                    del self.gpu_util[key]
        if update.unjoined is not None:
            self.unjoined = list(update.unjoined)
            changes.unjoined = True
        seen = set()
        for job in update.jobs:
            old = self.jobs.get(job.id)
            changes.job_set |= old is None or old.state != job.state or old.priority != job.priority
            changes.jobs.add(job.id)
            seen.add(job.id)
            self._put_job(job)
        for job in self.active_jobs():
            if job.id not in seen and job.id in self.traffic:
                self.traffic[job.id].repeat(self.time)
        if changes.jobs:
            self._index_gpu_jobs()
            changes.nodes |= {node for job_id in changes.jobs for node in self.jobs[job_id].nodes}
        rates = [self.traffic[j.id].series(points=1) for j in self.active_jobs() if j.id in self.traffic]
        self.cluster_rate.append(sum(s[-1] for s in rates if s))
        changes.traffic = True
        return changes

    def upsert_job(self, job: JobView) -> Changes:
        """A job this client just submitted or cancelled, before the stream reports it."""
        self._put_job(job)
        self._index_gpu_jobs()
        return Changes(jobs={job.id}, job_set=True, nodes=set(job.nodes))

    def set_usage(self, views: dict[str, UsageView]) -> Changes:
        """The usage views of the USAGE_WINDOWS, as the coordinator last answered them."""
        self.usage = dict(views)
        return Changes(usage=True)

    def disconnected(self) -> Changes:
        self.connected = False
        return Changes(nodes=set(self.nodes), jobs=set())

    def _set_time(self, at: float | None) -> None:
        if at is not None:
            self.time = at
            self.clock_offset = self.time - self.wall()

    def _put_node(self, node: NodeView) -> None:
        name = node.name
        self.nodes[name] = node
        self._counter += 1
        self.node_version[name] = self._counter
        self.node_heard[name] = self.mono()
        utils = []
        for gpu in node.gpus:
            util = gpu.utilization
            history = self.gpu_util.get((name, gpu.index))
            if history is None:
                history = self.gpu_util[(name, gpu.index)] = deque(maxlen=HISTORY)
            history.append(float(util) if util is not None else 0.0)
            if util is not None:
                utils.append(util)
        history = self.node_util.get(name)
        if history is None:
            history = self.node_util[name] = deque(maxlen=HISTORY)
        history.append(sum(utils) / len(utils) if utils else 0.0)

    def _put_job(self, job: JobView) -> None:
        self.jobs[job.id] = job
        self._counter += 1
        self.job_version[job.id] = self._counter
        traffic = job.traffic.by_rank
        current = self.traffic.get(job.id)
        if current is None or current.attempt != job.attempt:
            if not traffic and job.state not in ACTIVE_STATES:
                self.traffic.pop(job.id, None)
                return
            current = self.traffic[job.id] = JobTraffic(job.attempt)
        current.add(self.time, traffic)

    def _index_gpu_jobs(self) -> None:
        self.placement_version += 1
        self.gpu_jobs = {(place.node, gpu): job.id for job in self.active_jobs()
                         for place in job.placement for gpu in place.gpus}

    # --- derived ---------------------------------------------------------------------------------

    def now(self) -> float:
        """The coordinator's clock, as well as this client can tell."""
        return self.wall() + self.clock_offset

    def heartbeat_age(self, name: str) -> float:
        node = self.nodes[name]
        return node.last_heartbeat_age + max(0.0, self.mono() - self.node_heard.get(name, self.mono()))

    def active_jobs(self) -> list[JobView]:
        return [job for job in self.jobs.values() if job.state in ACTIVE_STATES]

    def sorted_jobs(self) -> list[JobView]:
        return sorted(self.jobs.values(), key=job_sort_key)

    def node_names(self) -> list[str]:
        return sorted(self.nodes)

    def runtime(self, job: JobView) -> str:
        if not job.started_at:
            return "-"
        end = job.ended_at or self.now()
        return format_duration(max(0.0, end - job.started_at))

    def people(self) -> list[Person]:
        """One row per user with jobs now or GPU time in the last week: most GPUs now first."""
        now: dict[str, list[int]] = {}  # user -> [GPUs held, jobs running, jobs pending]
        for job in self.jobs.values():
            if job.state in ACTIVE_STATES or job.state == "pending":
                counts = now.setdefault(job.owner, [0, 0, 0])
                running = job.state in ACTIVE_STATES
                counts[0] += job.gpus if running else 0
                counts[1 if running else 2] += 1
        figures = {(window, user.user): user for window, view in self.usage.items() for user in view.users}
        names = set(now) | {name for _, name in figures}
        people = []
        for name in names:
            gpus, running_jobs, pending_jobs = now.get(name, [0, 0, 0])
            people.append(Person(name, gpus, running_jobs, pending_jobs, figures.get(("day", name)),
                                 figures.get(("week", name)), bool(self.usage)))
        return sorted(people, key=lambda p: (-p.running_gpus, -(p.week.gpu_seconds if p.week else 0.0), p.user))

    def totals(self) -> dict[str, int]:
        """Counts for the title bar."""
        nodes = list(self.nodes.values())
        return {
            "nodes": len(nodes),
            "up": sum(1 for n in nodes if n.state == "up"),
            "gpus": sum(len(n.gpus) for n in nodes),
            "simulated": sum(len(n.gpus) for n in nodes if n.simulated),
            "busy": len(self.gpu_jobs),
            "running": sum(1 for j in self.jobs.values() if j.state in ACTIVE_STATES),
            "pending": sum(1 for j in self.jobs.values() if j.state == "pending"),
        }


# --- checking a request against the cluster ----------------------------------------------------------

def request_problem(gpus: int | None, nodes: int | None, gpus_per_node: int | None,
                    cluster: Iterable[NodeView]) -> str | None:
    """Why a request could never run on these nodes (all GPUs free), in the coordinator's words, or None.

    The coordinator refuses such a submit anyway; checking here says why while the form is filled.
    The field checks speak of the form's fields; down nodes do not count; an empty cluster accepts
    anything, since nodes may still join.
    """
    if gpus is not None:
        if not 1 <= gpus <= MAX_GPUS:
            return f"a job takes from 1 to {MAX_GPUS} GPUs"
    else:
        if nodes is None or gpus_per_node is None:
            return "say how many GPUs: G, or N nodes x G GPUs per node (like 2x4)"
        if not 1 <= nodes <= MAX_NODES:
            return f"a job spans from 1 to {MAX_NODES} nodes"
        if not 1 <= gpus_per_node <= MAX_GPUS_PER_NODE:
            return f"a job takes from 1 to {MAX_GPUS_PER_NODE} GPUs on each node"
    alive = [(n.name, len(n.gpus)) for n in cluster if n.state != "down"]
    return impossible_reason(gpus, nodes, gpus_per_node, alive)


# --- filtering --------------------------------------------------------------------------------------


def _haystack(item: NodeView | JobView) -> str:
    if isinstance(item, JobView):
        return " ".join([str(item.id), item.name, item.owner, item.state, ",".join(item.nodes), item.reason,
                         " ".join(item.command)]).lower()
    extra = ["sim" if item.simulated else "", "draining" if item.draining else ""]
    return " ".join([item.name, item.state, item.address, item.hostname, *extra, *(str(j) for j in item.jobs)]).lower()


def matches(text: str, item: NodeView | JobView) -> bool:
    """Every word of `text` appears somewhere in the item (id, name, state, nodes, reason, command)."""
    words = text.lower().split()
    if not words:
        return True
    hay = _haystack(item)
    return all(word in hay for word in words)


# --- formatting ------------------------------------------------------------------------------------

SPARK = " ▁▂▃▄▅▆▇█"
BAR_FULL = "█"
BAR_PARTS = " ▏▎▍▌▋▊▉"


def sparkline(values: Sequence[float], width: int, top: float | None = None) -> str:
    """The last `width` values as block characters, scaled to `top` (default: their maximum)."""
    values = list(values)[-width:] if width > 0 else []
    peak = top if top is not None else max(values, default=0.0)
    if peak <= 0:
        return (" " * (width - len(values))) + ("▁" * len(values) if values else "")
    chars = []
    for value in values:
        level = 0 if value <= 0 else max(1, min(8, round(value / peak * 8)))
        chars.append(SPARK[level])
    return " " * (width - len(chars)) + "".join(chars)


def bar(fraction: float | None, width: int) -> str:
    """A horizontal bar of `width` cells filled to `fraction` in eighths; spaces when unknown."""
    if fraction is None or width <= 0:
        return " " * max(width, 0)
    eighths = round(max(0.0, min(1.0, fraction)) * width * 8)
    full, part = divmod(eighths, 8)
    text = BAR_FULL * full + (BAR_PARTS[part] if part and full < width else "")
    return text.ljust(width)


def gib(count: int | None) -> str:
    return "n/a" if count is None else f"{count / GIB:.0f}"


def age(seconds: float) -> str:
    """An age in at most four characters (the SEEN column): 42s, 7m, 5h, 12d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:.0f}s"


def known_steps(job: JobView) -> int | None:
    """How many steps a job that succeeded trained, where that is known: a built-in workload runs
    exactly its --steps. A script's arguments mean what the script says, so nothing is assumed."""
    command = job.command
    if job.state != "succeeded" or not command or not command[0].startswith("--workload "):
        return None
    args = command[1:]
    for number, arg in enumerate(args):
        value = arg.removeprefix("--steps=") if arg.startswith("--steps=") else (
            args[number + 1] if arg == "--steps" and number + 1 < len(args) else None)
        if value is not None:
            return int(value) if value.isdigit() and int(value) > 0 else None
    return None


def request_text(job: JobView) -> str:
    req = job.request
    if req.gpus is not None:
        return str(req.gpus)
    if req.nodes is not None:
        return f"{req.nodes}x{req.gpus_per_node}"
    return str(job.gpus)


def asked_text(job: JobView) -> str:
    """What a job asked for, with its noun: '1 GPU', '4 GPUs', '2x4 GPUs', or 'no GPU' (gpudeck doctor's check)."""
    if job.request.gpus is None and job.request.nodes is None:
        return "no GPU"
    asked = request_text(job)
    return f"{asked} GPU" if asked == "1" else f"{asked} GPUs"


def cordon_of(node: NodeView, index: int) -> CordonView | None:
    """The cordon of GPU `index` of `node` (its cause and since when), or None."""
    return next((c for c in node.cordoned if c.gpu == index), None)


def foreign_processes(gpu: GpuReading) -> list[GpuProcess]:
    return [p for p in gpu.processes if p.foreign]


def describe_process(process: GpuProcess) -> str:
    memory = process.memory_used
    size = f" {human_bytes(memory)}" if memory is not None else ""
    return f"{process.name or 'process'} pid {process.pid}{size}"
