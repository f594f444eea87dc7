"""The gang scheduler: which pending jobs start now, on which GPUs, and why the others wait.

It is pure (cluster state and queue in, placements and reasons out; no I/O, no clock, no randomness),
so the same input always gives the same decision and the policy is tested exhaustively without
sockets. It imports only the standard library and the request checks it shares with clients
(`gpudeck.capacity`).

Policy, and why:

- A GPU is free only when no gpudeck job holds it and no process outside gpudeck uses it. A GPU with a
  foreign process is never offered: sharing memory with an unknown process causes out-of-memory
  failures that look like the job's fault.
- Jobs are taken by their priority score, higher first (`gpudeck.coordinator.priority`: fair share,
  age and `--priority`, computed by the caller), then in submit order (the order of `pending`).
- Per-person limits: a job whose owner's jobs would then hold more GPUs than the owner's `max_gpus`
  waits, and its reason names the limit. It takes nothing, not even a reservation, since it could not
  start even with every GPU free.
- Gang placement: a job gets every GPU it asked for at once, or nothing. A distributed job started on
  part of its GPUs would only wait in its rendezvous while holding them.
- EASY backfill: the first job (in that order) that cannot start gets a reservation: the GPUs it will
  get at the earliest time enough of them are free, planned from when the running jobs' time limits
  end them (for a job without one, the cluster's default time limit: a plan, not a stop; a job past
  its limit counts as ending now; a GPU that no known end frees, such as one an outside process
  uses, is never planned to be free). Later jobs still start on idle GPUs, but only where they
  cannot delay it: their own time limit stops them before the reservation starts, or they use GPUs
  the reservation does not need. Without the reservation a large job could wait forever while small
  jobs keep taking the GPUs it needs; with it, idle GPUs wait only as long as that job does, and it
  starts by its estimate when running jobs end by their limits. A job that cannot be planned gets
  no reservation and blocks nobody; the next job that cannot start gets it. A placeable job stays
  pending only behind a limit or the reservation.
- Only the reserved job gets an estimated start: every later one's depends on which backfilled jobs
  end early, which nothing here knows.
- `--gpus G` uses as few nodes as possible, since every extra node puts its traffic on the network:
  one node when one can hold all G (the best fit, the node with the fewest free GPUs that still fits,
  so that nodes with more free GPUs stay whole for bigger jobs); otherwise nodes by most free GPUs
  first, taking all free GPUs of each but the last, which gives the remainder.
- `--nodes N --gpus-per-node G` takes the N best-fit nodes (fewest free GPUs that still have G) and the
  G lowest free indices on each; hosts are listed by node name, and that order is the node rank.
- `gpudeck doctor`'s check names its nodes and takes no GPU: it starts as soon as those nodes are up
  (and not draining), beside whatever runs there, since it measures the network and holds nothing.
- Ties are broken by node name and GPU indices are chosen lowest first, so placements do not depend on
  the order in which nodes or GPUs are given. Node names and job ids are expected to be unique.
- Thousands of pending jobs cost little: within a round placements only take GPUs, so a request of
  a shape (GPUs, nodes, GPUs per node) that did not fit cannot fit later in the round and is not
  tried again; the same holds for the GPUs outside the reservation once it is made, and for a shape
  that could not be planned (no placement adds to the GPUs that are free once every planned end has
  passed). Reasons are computed once per shape.
- A reason says who or what the job waits for: its owner's limit, the reserved job it would delay, or
  the free capacity after this round's placements (what a person then sees in the dashboard), naming
  the nearest fit; the reserved job's also names the running jobs it waits for. Whether a request
  could ever fit on the cluster is a separate question, answered by `impossible_reason` (used to
  refuse a submit).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from gpudeck import capacity
from gpudeck.capacity import be as _be
from gpudeck.text import counted as _count
from gpudeck.capacity import have as _have
from gpudeck.capacity import spread_need as _spread_need

Hosts = tuple[tuple[str, tuple[int, ...]], ...]
FreeMap = dict[str, tuple[int, ...]]
"""Node name -> its free GPU indices, lowest first."""
_Shape = tuple[int | None, int | None, int | None]
"""What a request asks for (gpus, nodes, gpus_per_node): requests of one shape fit or wait alike."""
_Gpu = tuple[str, int]
"""A GPU by node name and index."""


@dataclass(frozen=True)
class GpuSlot:
    """One GPU of a node as the scheduler sees it."""

    index: int
    busy_job: int | None = None
    """Id of the gpudeck job holding it, if any."""
    foreign: str | None = None
    """A process not started by gpudeck ("python pid 4121, 3.2 GiB"), if any."""
    cordoned: str | None = None
    """Why it is kept out of the schedule (a GPU fault, or an admin's word; coordinator.health), if it is."""


@dataclass(frozen=True)
class NodeSlots:
    """A node that is up, with its GPUs. The caller passes only nodes in state "up"."""

    name: str
    gpus: tuple[GpuSlot, ...]


@dataclass(frozen=True)
class JobRequest:
    """What a pending job asks for: `gpus` alone, or `nodes` with `gpus_per_node`."""

    job_id: int
    priority: float = 0
    """Its priority score (`gpudeck.coordinator.priority`); higher runs first."""
    gpus: int | None = None
    """--gpus G: G GPUs on any nodes."""
    nodes: int | None = None
    """--nodes N (with --gpus-per-node G)."""
    gpus_per_node: int | None = None
    owner: str = ""
    """Whose job it is: the per-person limits count its GPUs as theirs."""
    time_limit: float | None = None
    """Its --time-limit in seconds, after which it is stopped; None: nothing stops it, so it may
    backfill only on GPUs the reservation does not need."""
    on_nodes: tuple[str, ...] = ()
    """gpudeck doctor's check: one rank on each of these nodes and no GPU. It starts once they are
    all up, takes nothing from anyone, and so neither waits for nor delays any other job."""


@dataclass(frozen=True)
class RunningJob:
    """A job that holds GPUs: the reservation is planned from when they end, limits count them."""

    job_id: int
    hosts: tuple[tuple[str, tuple[int, ...]], ...]
    ends_at: float | None = None
    """When it gives its GPUs back at the latest (its time limit; past it, it counts as ending now);
    None: unknown, so its GPUs are never planned to be free."""
    owner: str = ""


@dataclass(frozen=True)
class Placement:
    """The GPUs granted to one job; the order of `hosts` is the node rank."""

    job_id: int
    hosts: tuple[tuple[str, tuple[int, ...]], ...]


@dataclass(frozen=True)
class Reservation:
    """The GPUs kept for the first job that cannot start, from `start` on (EASY backfill)."""

    job_id: int
    start: float
    hosts: tuple[tuple[str, tuple[int, ...]], ...]
    waits_for: tuple[int, ...]
    """The jobs that hold some of those GPUs now, by id."""


@dataclass(frozen=True)
class Decision:
    """One scheduling round: the jobs to start now, a reason for every job left pending, and when
    the jobs whose start can be planned will start (epoch seconds)."""

    placements: tuple[Placement, ...]
    reasons: dict[int, str]
    estimated_start: dict[int, float] = field(default_factory=dict)
    reservation: Reservation | None = None
    free_after: FreeMap = field(default_factory=dict)
    """The GPUs still free once the placements took theirs (what preemption may add to)."""
    over_limit: frozenset[int] = frozenset()
    """Waiting jobs their owner's limit keeps out, counted with the placements' GPUs held."""


def validate_request(req: JobRequest) -> str | None:
    """None if the request is well formed, else a sentence saying what is wrong with it."""
    return capacity.validate_request(req.gpus, req.nodes, req.gpus_per_node)


def impossible_reason(req: JobRequest, cluster: Sequence[NodeSlots]) -> str | None:
    """A sentence when the request could never fit on these nodes, even with every GPU free (see
    `gpudeck.capacity.impossible_reason`)."""
    return capacity.impossible_reason(req.gpus, req.nodes, req.gpus_per_node,
                                      [(node.name, len(node.gpus)) for node in cluster])


def schedule(nodes: Sequence[NodeSlots], pending: Sequence[JobRequest], running: Sequence[RunningJob] = (),
             limits: Mapping[str, int] | None = None, now: float = 0.0,
             default_time_limit: float | None = None) -> Decision:
    """Place every job that may start, in priority then submit order, reserving GPUs for the first
    that cannot; give each other job a reason. `limits`: the most GPUs each owner's jobs may hold at
    once (owners not in it have none). `default_time_limit`: how long a job placed now without a time
    limit is planned to run (only planned: it does not let the job backfill before the reservation,
    since nothing stops it then)."""
    round_ = _Round(nodes, running, limits or {}, now, default_time_limit)
    for req in sorted(pending, key=lambda r: -r.priority):
        round_.consider(req)
    return round_.decision()


class _Round:
    """The state of one `schedule` call: what is free, who holds what until when, the reservation."""

    def __init__(self, nodes: Sequence[NodeSlots], running: Sequence[RunningJob], limits: Mapping[str, int],
                 now: float, default_time_limit: float | None) -> None:
        self.now, self.limits, self.default_time_limit = now, limits, default_time_limit
        self.free: FreeMap = {node.name: tuple(sorted(g.index for g in node.gpus if _is_free(g))) for node in nodes}
        idle = [g for node in nodes for g in node.gpus if g.busy_job is None]
        self.cordoned = sum(1 for g in idle if g.cordoned is not None)
        self.hidden = sum(1 for g in idle if g.foreign is not None and g.cordoned is None)
        free = {(name, i) for name, indices in self.free.items() for i in indices}
        # A GPU a job holds is planned free when the job ends, even if the driver lists an outside process
        # on it (most likely one of the job's own ranks as it exits; one still there then is seen then).
        plannable = {(node.name, g.index) for node in nodes for g in node.gpus
                     if (g.foreign is None or g.busy_job is not None) and g.cordoned is None} - free
        self.ends: dict[_Gpu, float] = {}  # busy GPUs a known time frees, and that time
        self.holder: dict[_Gpu, int] = {}
        self.held: dict[str, int] = {}  # GPUs each owner's jobs hold
        for job in running:
            end = math.inf if job.ends_at is None else max(job.ends_at, now)
            self._hold(job.job_id, job.owner, job.hosts, end, plannable)
        self.placements: list[Placement] = []
        self.waiting: list[tuple[JobRequest, str]] = []  # with why: invalid, limit, capacity, reserved, held
        self.unfit: set[_Shape] = set()  # did not fit the free GPUs: they only shrink within a round
        self.unfit_outside: set[_Shape] = set()  # did not fit the free GPUs the reservation does not need
        self.unplannable: set[_Shape] = set()
        self.reservation: Reservation | None = None
        self.outside: FreeMap = {}  # the free GPUs the reservation does not need

    def _hold(self, job_id: int, owner: str, hosts: Hosts, end: float, plannable: set[_Gpu]) -> None:
        """Count a job's GPUs as its owner's, and plan those of them in `plannable` free at `end`."""
        for name, indices in hosts:
            for i in indices:
                if (name, i) in plannable and end < math.inf:
                    self.ends[(name, i)] = end
                self.holder[(name, i)] = job_id
            self.held[owner] = self.held.get(owner, 0) + len(indices)

    def consider(self, req: JobRequest) -> None:
        shape = (req.gpus, req.nodes, req.gpus_per_node)
        if req.on_nodes:
            self._on_named_nodes(req)
        elif validate_request(req) is not None:
            self.waiting.append((req, "invalid"))
        elif self._over_limit(req):
            self.waiting.append((req, "limit"))
        elif self.reservation is None:
            self._first_come(req, shape)
        elif req.time_limit is not None and self.now + req.time_limit <= self.reservation.start:
            self._try(req, shape, self.free, self.unfit, "capacity")  # it ends before the reservation starts
        elif shape in self.unfit:
            self.waiting.append((req, "capacity"))
        else:
            self._try(req, shape, self.outside, self.unfit_outside, "held")

    def _on_named_nodes(self, req: JobRequest) -> None:
        hosts = place(req, self.free)
        if hosts is None:
            self.waiting.append((req, "named nodes"))
        else:
            self.placements.append(Placement(req.job_id, hosts))

    def _first_come(self, req: JobRequest, shape: _Shape) -> None:
        """Before any reservation: place the job, else try to reserve GPUs for it."""
        if self._try(req, shape, self.free, self.unfit, None):
            return
        if shape not in self.unplannable:
            self.reservation = self._reserve(req)
            if self.reservation is not None:
                self.waiting.append((req, "reserved"))
                return
            self.unplannable.add(shape)
        self.waiting.append((req, "capacity"))

    def _try(self, req: JobRequest, shape: _Shape, free: FreeMap, unfit: set[_Shape], why: str | None) -> bool:
        """Place the job on `free` if its shape still may fit there; else note it (and its reason, `why`)."""
        hosts = None if shape in unfit else place(req, free)
        if hosts is None:
            unfit.add(shape)
            if why is not None:
                self.waiting.append((req, why))
            return False
        self.placements.append(Placement(req.job_id, hosts))
        _claim(self.free, hosts)
        if self.reservation is not None:
            _claim(self.outside, hosts)
        planned = req.time_limit if req.time_limit is not None else self.default_time_limit
        end = self.now + planned if planned is not None else math.inf
        self._hold(req.job_id, req.owner, hosts, end, {(name, i) for name, indices in hosts for i in indices})
        return True

    def _over_limit(self, req: JobRequest) -> bool:
        limit = self.limits.get(req.owner)
        return limit is not None and self.held.get(req.owner, 0) + _total(req) > limit

    def _reserve(self, req: JobRequest) -> Reservation | None:
        """The GPUs the job gets at the earliest planned time enough are free, or None if no planned
        end frees enough."""
        future = dict(self.free)
        releases = sorted((end, gpu) for gpu, end in self.ends.items())
        at = 0
        while at < len(releases):
            start = releases[at][0]
            touched = set()
            while at < len(releases) and releases[at][0] == start:
                name, index = releases[at][1]
                future[name] = (*future[name], index)
                touched.add(name)
                at += 1
            for name in touched:
                future[name] = tuple(sorted(future[name]))
            hosts = place(req, future)
            if hosts is not None:
                return self._reserved(req.job_id, start, hosts)
        return None

    def _reserved(self, job_id: int, start: float, hosts: Hosts) -> Reservation:
        kept = {(name, i) for name, indices in hosts for i in indices}
        self.outside = {name: tuple(i for i in indices if (name, i) not in kept) for name, indices in self.free.items()}
        waits_for = tuple(sorted({self.holder[gpu] for gpu in kept if gpu in self.ends}))
        return Reservation(job_id, start, hosts, waits_for)

    def decision(self) -> Decision:
        by_shape: dict[tuple[_Shape, str], str] = {}  # a capacity reason depends only on the shape and what is free
        fits_free: dict[_Shape, bool] = {}
        reasons = {}
        for req, why in self.waiting:
            if why == "limit":
                reasons[req.job_id] = self._limit_reason(req)
                continue
            if why == "named nodes":
                away = [name for name in req.on_nodes if name not in self.free]
                reasons[req.job_id] = f"waits for {', '.join(away)} to be up and not draining"
                continue
            shape = (req.gpus, req.nodes, req.gpus_per_node)
            if why == "held":
                if shape not in fits_free:
                    fits_free[shape] = place(req, self.free) is not None
                why = "held" if fits_free[shape] else "capacity"  # or it does not fit what is free at all
            key = (shape, why)
            if key not in by_shape:
                by_shape[key] = self._reason(req, why)
            reasons[req.job_id] = by_shape[key]
        reserved = self.reservation
        estimated = {reserved.job_id: reserved.start} if reserved else {}
        over_limit = frozenset(req.job_id for req, _ in self.waiting if self._over_limit(req))
        return Decision(tuple(self.placements), reasons, estimated, reserved, dict(self.free), over_limit)

    def _reason(self, req: JobRequest, why: str) -> str:
        reserved = self.reservation
        if why == "held" and reserved is not None:
            return (f"waits for job {reserved.job_id}, which is next in line and starts when "
                    f"{_ending(reserved.waits_for)}: the GPUs this job could take now are kept for it (a "
                    "--time-limit that ends before then would let this job run first)")
        reason = _reason(req, self.free, self.hidden) + _cordon_note(self.cordoned)
        if why == "reserved" and reserved is not None:
            reason += f"; it is next in line and starts when {_ending(reserved.waits_for)}"
        return reason

    def _limit_reason(self, req: JobRequest) -> str:
        return limit_reason(req.owner, self.limits[req.owner], _total(req), self.held.get(req.owner, 0))


def limit_reason(owner: str, limit: int, need: int, held: int) -> str:
    """Why a job of `need` GPUs waits for its owner's limit while the owner's jobs hold `held`."""
    if need > limit:
        return f"needs {_count(need, 'GPU')} but {owner}'s limit is {_count(limit, 'GPU')} at once"
    return f"{owner}'s limit is {_count(limit, 'GPU')} at once; {owner}'s jobs hold {held}"


def _total(req: JobRequest) -> int:
    """How many GPUs a well-formed request takes in all."""
    return req.gpus if req.gpus is not None else (req.nodes or 0) * (req.gpus_per_node or 0)


def _ending(job_ids: tuple[int, ...], most: int = 3) -> str:
    """'job 4 ends', 'jobs 4 and 7 end', 'jobs 4, 7, 9 and 5 others end'."""
    if len(job_ids) == 1:
        return f"job {job_ids[0]} ends"
    if len(job_ids) <= most:
        return f"jobs {', '.join(map(str, job_ids[:-1]))} and {job_ids[-1]} end"
    return f"jobs {', '.join(map(str, job_ids[:most]))} and {len(job_ids) - most} others end"


def _is_free(gpu: GpuSlot) -> bool:
    """Offerable to a job: held by no gpudeck job, used by no outside process, and not cordoned."""
    return gpu.busy_job is None and gpu.foreign is None and gpu.cordoned is None


def place(req: JobRequest, free: FreeMap) -> Hosts | None:
    """The hosts for a well-formed request on the free GPUs, or None if it does not fit."""
    if req.on_nodes:
        return tuple((name, ()) for name in sorted(req.on_nodes)) if all(n in free for n in req.on_nodes) else None
    if req.gpus is not None:
        return _place_any(req.gpus, free)
    assert req.nodes is not None and req.gpus_per_node is not None
    return _place_spread(req.nodes, req.gpus_per_node, free)


def _place_any(count: int, free: FreeMap) -> Hosts | None:
    """`--gpus count`: one best-fit node if one can hold them all, else the fewest nodes."""
    fitting = [name for name, indices in free.items() if len(indices) >= count]
    if fitting:
        best = min(fitting, key=lambda name: (len(free[name]), name))
        return ((best, free[best][:count]),)
    hosts: list[tuple[str, tuple[int, ...]]] = []
    left = count
    for name in sorted(free, key=lambda name: (-len(free[name]), name)):
        take = free[name][:left]
        if not take:
            break
        hosts.append((name, take))
        left -= len(take)
    return tuple(hosts) if left == 0 else None


def _place_spread(nodes: int, per_node: int, free: FreeMap) -> Hosts | None:
    """`--nodes nodes --gpus-per-node per_node`: the best-fit nodes, ranked by name."""
    fitting = sorted((n for n in free if len(free[n]) >= per_node), key=lambda n: (len(free[n]), n))
    if len(fitting) < nodes:
        return None
    return tuple((name, free[name][:per_node]) for name in sorted(fitting[:nodes]))


def _claim(free: FreeMap, hosts: Hosts) -> None:
    """Remove granted GPUs from the free map, so later jobs in the round cannot take them."""
    for name, indices in hosts:
        free[name] = tuple(i for i in free[name] if i not in indices)


def _reason(req: JobRequest, free: FreeMap, hidden: int) -> str:
    """Why a job waits, naming the nearest fit; `hidden` counts idle GPUs used by outside processes."""
    problem = validate_request(req)
    if problem is not None:
        return problem
    if not free:
        return "no nodes are up"
    if req.gpus is not None:
        return _any_reason(req.gpus, free, hidden)
    assert req.nodes is not None and req.gpus_per_node is not None
    return _spread_reason(req.nodes, req.gpus_per_node, free) + _outside_note(
        _count(hidden, "GPU"), hidden
    )


def _any_reason(count: int, free: FreeMap, hidden: int) -> str:
    """'needs 6 GPUs; 4 are free across 2 nodes (node-a 3, node-b 1)' and outside processes."""
    have = {name: len(indices) for name, indices in sorted(free.items()) if indices}
    total = sum(have.values())
    head = f"needs {_count(count, 'GPU')}; "
    if total == 0:
        return head + "none are free" + _outside_note(str(hidden), hidden)
    where = "on 1 node" if len(have) == 1 else f"across {len(have)} nodes"
    listing = ", ".join(f"{name} {n}" for name, n in have.items())
    return head + f"{total} {_be(total)} free {where} ({listing})" + _outside_note(
        f"{hidden} more", hidden
    )


def _spread_reason(nodes: int, per_node: int, free: FreeMap) -> str:
    """'needs 2 nodes with 4 free GPUs each; the most free on one node is 3, on node-b' and kin."""
    need = _spread_need(nodes, per_node, "free ")
    fitting = sorted(name for name, indices in free.items() if len(indices) >= per_node)
    if fitting:
        names = ", ".join(fitting)
        return f"{need}; only {_count(len(fitting), 'node')} {_have(len(fitting))} that ({names})"
    most = min(free, key=lambda name: (-len(free[name]), name))
    if not free[most]:
        return f"{need}; no node has a free GPU"
    return f"{need}; the most free on one node is {len(free[most])}, on {most}"


def _cordon_note(cordoned: int) -> str:
    """'; 1 GPU is cordoned for a fault (gpudeck nodes says which)', or nothing."""
    if cordoned == 0:
        return ""
    return f"; {_count(cordoned, 'GPU')} {_be(cordoned)} cordoned for a fault (gpudeck nodes says which)"


def _outside_note(subject: str, hidden: int) -> str:
    """'; 2 more are held by processes outside gpudeck', or nothing when no GPU is hidden."""
    if hidden == 0:
        return ""
    holders = "a process" if hidden == 1 else "processes"
    return f"; {subject} {_be(hidden)} held by {holders} outside gpudeck"
