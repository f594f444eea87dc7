"""The gang scheduler: which pending jobs start now, on which GPUs, and why the others wait.

It is pure (cluster state and queue in, placements and reasons out; no I/O, no clock, no randomness),
so the same input always gives the same decision and the policy is tested exhaustively without
sockets. It imports only the standard library and the request checks it shares with clients
(`gpudeck.capacity`).

Policy, and why:

- A GPU is free only when no gpudeck job holds it and no process outside gpudeck uses it. A GPU with a
  foreign process is never offered: sharing memory with an unknown process causes out-of-memory
  failures that look like the job's fault.
- Jobs are taken by priority (higher first), then in submit order (the order of `pending`).
- Gang placement: a job gets every GPU it asked for at once, or nothing. A distributed job started on
  part of its GPUs would only wait in its rendezvous while holding them.
- Backfill without reservation: when a job does not fit, later jobs that fit in what remains are still
  placed, even if their priority is lower. Idle GPUs never wait behind a job that cannot start, so a
  placeable job never stays pending. The cost is that a large job can keep waiting while small jobs
  take the GPUs it needs; a person sees that in its reason and can cancel or reprioritise.
- `--gpus G` uses as few nodes as possible, since every extra node puts its traffic on the network:
  one node when one can hold all G (the best fit, the node with the fewest free GPUs that still fits,
  so that nodes with more free GPUs stay whole for bigger jobs); otherwise nodes by most free GPUs
  first, taking all free GPUs of each but the last, which gives the remainder.
- `--nodes N --gpus-per-node G` takes the N best-fit nodes (fewest free GPUs that still have G) and the
  G lowest free indices on each; hosts are listed by node name, and that order is the node rank.
- Ties are broken by node name and GPU indices are chosen lowest first, so placements do not depend on
  the order in which nodes or GPUs are given. Node names and job ids are expected to be unique.
- Thousands of pending jobs cost little: within a round placements only take GPUs, so a request of
  a shape (GPUs, nodes, GPUs per node) that did not fit cannot fit later in the round and is not
  tried again; reasons are computed once per shape.
- A reason describes what is free after this round's placements, which is what a person then sees in
  the dashboard, and names the nearest fit. Reasons always describe the free capacity; whether a
  request could ever fit on the cluster is a separate question, answered by `impossible_reason`
  (used to refuse a submit).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gpudeck import capacity
from gpudeck.capacity import be as _be
from gpudeck.text import counted as _count
from gpudeck.capacity import have as _have
from gpudeck.capacity import spread_need as _spread_need

_Hosts = tuple[tuple[str, tuple[int, ...]], ...]
_FreeMap = dict[str, tuple[int, ...]]
"""Node name -> its free GPU indices, lowest first."""
_Shape = tuple[int | None, int | None, int | None]
"""What a request asks for (gpus, nodes, gpus_per_node): requests of one shape fit or wait alike."""


@dataclass(frozen=True)
class GpuSlot:
    """One GPU of a node as the scheduler sees it."""

    index: int
    busy_job: int | None = None
    """Id of the gpudeck job holding it, if any."""
    foreign: str | None = None
    """A process not started by gpudeck ("python pid 4121, 3.2 GiB"), if any."""


@dataclass(frozen=True)
class NodeSlots:
    """A node that is up, with its GPUs. The caller passes only nodes in state "up"."""

    name: str
    gpus: tuple[GpuSlot, ...]


@dataclass(frozen=True)
class JobRequest:
    """What a pending job asks for: `gpus` alone, or `nodes` with `gpus_per_node`."""

    job_id: int
    priority: int = 0
    """Higher runs first."""
    gpus: int | None = None
    """--gpus G: G GPUs on any nodes."""
    nodes: int | None = None
    """--nodes N (with --gpus-per-node G)."""
    gpus_per_node: int | None = None


@dataclass(frozen=True)
class Placement:
    """The GPUs granted to one job; the order of `hosts` is the node rank."""

    job_id: int
    hosts: tuple[tuple[str, tuple[int, ...]], ...]


@dataclass(frozen=True)
class Decision:
    """One scheduling round: the jobs to start now, and a reason for every job left pending."""

    placements: tuple[Placement, ...]
    reasons: dict[int, str]


def validate_request(req: JobRequest) -> str | None:
    """None if the request is well formed, else a sentence saying what is wrong with it."""
    return capacity.validate_request(req.gpus, req.nodes, req.gpus_per_node)


def impossible_reason(req: JobRequest, cluster: Sequence[NodeSlots]) -> str | None:
    """A sentence when the request could never fit on these nodes, even with every GPU free (see
    `gpudeck.capacity.impossible_reason`)."""
    return capacity.impossible_reason(req.gpus, req.nodes, req.gpus_per_node,
                                      [(node.name, len(node.gpus)) for node in cluster])


def schedule(nodes: Sequence[NodeSlots], pending: Sequence[JobRequest]) -> Decision:
    """Place every job that fits, in priority then submit order; give each other job a reason."""
    free = {node.name: tuple(sorted(g.index for g in node.gpus if _is_free(g))) for node in nodes}
    placements: list[Placement] = []
    waiting: list[JobRequest] = []
    unfit: set[_Shape] = set()  # shapes that did not fit: free GPUs only shrink within a round
    for req in sorted(pending, key=lambda r: -r.priority):
        shape = (req.gpus, req.nodes, req.gpus_per_node)
        hosts = None if shape in unfit or validate_request(req) else _place(req, free)
        if hosts is None:
            waiting.append(req)
            unfit.add(shape)
        else:
            placements.append(Placement(req.job_id, hosts))
            _claim(free, hosts)
    hidden = sum(1 for node in nodes for g in node.gpus if g.busy_job is None and g.foreign is not None)
    by_shape: dict[_Shape, str] = {}  # a reason depends only on the request's shape and what is free
    reasons = {}
    for req in waiting:
        shape = (req.gpus, req.nodes, req.gpus_per_node)
        if shape not in by_shape:
            by_shape[shape] = _reason(req, free, hidden)
        reasons[req.job_id] = by_shape[shape]
    return Decision(tuple(placements), reasons)


def _is_free(gpu: GpuSlot) -> bool:
    """Offerable to a job: held by no gpudeck job and used by no outside process."""
    return gpu.busy_job is None and gpu.foreign is None




def _place(req: JobRequest, free: _FreeMap) -> _Hosts | None:
    """The hosts for a well-formed request on the free GPUs, or None if it does not fit."""
    if req.gpus is not None:
        return _place_any(req.gpus, free)
    assert req.nodes is not None and req.gpus_per_node is not None
    return _place_spread(req.nodes, req.gpus_per_node, free)


def _place_any(count: int, free: _FreeMap) -> _Hosts | None:
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


def _place_spread(nodes: int, per_node: int, free: _FreeMap) -> _Hosts | None:
    """`--nodes nodes --gpus-per-node per_node`: the best-fit nodes, ranked by name."""
    fitting = sorted((n for n in free if len(free[n]) >= per_node), key=lambda n: (len(free[n]), n))
    if len(fitting) < nodes:
        return None
    return tuple((name, free[name][:per_node]) for name in sorted(fitting[:nodes]))


def _claim(free: _FreeMap, hosts: _Hosts) -> None:
    """Remove granted GPUs from the free map, so later jobs in the round cannot take them."""
    for name, indices in hosts:
        free[name] = tuple(i for i in free[name] if i not in indices)


def _reason(req: JobRequest, free: _FreeMap, hidden: int) -> str:
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


def _any_reason(count: int, free: _FreeMap, hidden: int) -> str:
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


def _spread_reason(nodes: int, per_node: int, free: _FreeMap) -> str:
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








def _outside_note(subject: str, hidden: int) -> str:
    """'; 2 more are held by processes outside gpudeck', or nothing when no GPU is hidden."""
    if hidden == 0:
        return ""
    holders = "a process" if hidden == 1 else "processes"
    return f"; {subject} {_be(hidden)} held by {holders} outside gpudeck"
