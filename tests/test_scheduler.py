"""Tests of the pure gang scheduler: one example per rule and reason form, then properties.

The properties check the scheduler against independent oracles over random clusters and queues:
a `--gpus G` job fits iff G GPUs are free in all, and a `--nodes N --gpus-per-node G` job fits iff N
nodes each have G free.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from gpudeck.coordinator.scheduler import (
    Decision,
    GpuSlot,
    JobRequest,
    NodeSlots,
    Placement,
    RunningJob,
    impossible_reason,
    schedule,
    validate_request,
)

FreeSets = dict[str, set[int]]


def node(name: str, count: int, busy: Iterable[int] = (), foreign: Iterable[int] = ()) -> NodeSlots:
    """A node with GPUs 0..count-1; `busy` ones held by job 99, `foreign` ones used by a stranger."""
    busy, foreign = set(busy), set(foreign)
    return NodeSlots(
        name,
        tuple(
            GpuSlot(i, busy_job=99 if i in busy else None, foreign="python pid 7" if i in foreign else None)
            for i in range(count)
        ),
    )


def gpus(job_id: int, count: int, priority: int = 0) -> JobRequest:
    """A `--gpus count` request."""
    return JobRequest(job_id, priority=priority, gpus=count)


def spread(job_id: int, nodes: int, per_node: int, priority: int = 0) -> JobRequest:
    """A `--nodes nodes --gpus-per-node per_node` request."""
    return JobRequest(job_id, priority=priority, nodes=nodes, gpus_per_node=per_node)


def hosts_of(decision: Decision) -> dict[int, tuple[tuple[str, tuple[int, ...]], ...]]:
    """Job id -> its hosts, so examples compare whole placements at once."""
    return {p.job_id: p.hosts for p in decision.placements}


# --- validate_request -------------------------------------------------------------------------


def problem_of(req: JobRequest) -> str:
    """The sentence validate_request gives a malformed request (failing if it gives none)."""
    problem = validate_request(req)
    assert problem is not None, req
    return problem


def test_well_formed_requests_pass() -> None:
    assert validate_request(gpus(1, 1)) is None
    assert validate_request(gpus(1, 4096)) is None
    assert validate_request(spread(1, 1024, 64)) is None


def test_malformed_requests_get_a_sentence() -> None:
    assert "either" in problem_of(JobRequest(1, gpus=2, nodes=2, gpus_per_node=1))
    assert "either" in problem_of(JobRequest(1, gpus=2, gpus_per_node=1))
    assert "--gpus G" in problem_of(JobRequest(1))
    assert validate_request(JobRequest(1, nodes=2)) == "--nodes needs --gpus-per-node too"
    assert validate_request(JobRequest(1, gpus_per_node=2)) == "--gpus-per-node needs --nodes too"
    assert validate_request(gpus(1, 0)) == "--gpus must be at least 1, not 0"
    assert validate_request(gpus(1, 4097)) == "--gpus must be at most 4096, not 4097"
    assert validate_request(spread(1, 1025, 1)) == "--nodes must be at most 1024, not 1025"
    assert validate_request(spread(1, 2, 65)) == "--gpus-per-node must be at most 64, not 65"
    assert validate_request(spread(1, -1, 2)) == "--nodes must be at least 1, not -1"
    assert "whole number" in problem_of(JobRequest(1, gpus=True))


def test_a_malformed_job_waits_with_the_validation_sentence() -> None:
    decision = schedule([node("a", 8)], [JobRequest(5), gpus(6, 0)])
    assert decision.placements == ()
    assert decision.reasons == {5: validate_request(JobRequest(5)), 6: "--gpus must be at least 1, not 0"}


# --- placement rules --------------------------------------------------------------------------


def test_gpus_on_one_node_takes_the_best_fit() -> None:
    cluster = [node("a", 8), node("b", 4, busy=[0]), node("c", 4, busy=[0])]
    assert hosts_of(schedule(cluster, [gpus(1, 3)])) == {1: (("b", (1, 2, 3)),)}


def test_gpus_best_fit_ties_go_by_name() -> None:
    cluster = [node("b1", 2), node("a2", 2), node("c0", 4)]
    assert hosts_of(schedule(cluster, [gpus(1, 2)])) == {1: (("a2", (0, 1)),)}


def test_gpus_indices_are_the_lowest_free() -> None:
    cluster = [node("a", 8, busy=[0, 2], foreign=[1])]
    assert hosts_of(schedule(cluster, [gpus(1, 3)])) == {1: (("a", (3, 4, 5)),)}


def test_gpus_spread_uses_most_free_nodes_first_and_the_last_gives_the_remainder() -> None:
    cluster = [node("a", 4, busy=[0, 1]), node("b", 4), node("c", 4, busy=[0]), node("d", 4, busy=[0])]
    assert hosts_of(schedule(cluster, [gpus(1, 9)])) == {
        1: (("b", (0, 1, 2, 3)), ("c", (1, 2, 3)), ("d", (1, 2)))
    }


def test_gpus_spread_ties_go_by_name() -> None:
    cluster = [node("b1", 2), node("a2", 2), node("c0", 1)]
    assert hosts_of(schedule(cluster, [gpus(1, 3)])) == {1: (("a2", (0, 1)), ("b1", (0,)))}


def test_foreign_gpus_are_never_offered() -> None:
    cluster = [node("a", 2, foreign=[0, 1]), node("b", 2, busy=[1], foreign=[1])]
    decision = schedule(cluster, [gpus(1, 1), gpus(2, 2)])
    assert hosts_of(decision) == {1: (("b", (0,)),)}
    assert 2 in decision.reasons


def test_a_cordoned_gpu_is_never_offered_and_the_reason_counts_it() -> None:
    cordoned = NodeSlots("node-a", (GpuSlot(0, cordoned="Xid 79"), GpuSlot(1), GpuSlot(2, cordoned="ecc")))
    decision = schedule([cordoned], [gpus(1, 1), gpus(2, 2)])
    assert hosts_of(decision) == {1: (("node-a", (1,)),)}
    assert decision.reasons[2] == ("needs 2 GPUs; none are free; 2 GPUs are cordoned for a fault "
                                   "(gpudeck nodes says which)")


def test_a_cordoned_gpu_a_job_holds_is_not_planned_free_when_that_job_ends() -> None:
    """Only GPUs that will be offered count toward a waiting job's planned start."""
    held = NodeSlots("node-a", (GpuSlot(0, busy_job=7, cordoned="Xid 79"), GpuSlot(1, busy_job=7)))
    running = (RunningJob(7, (("node-a", (0, 1)),), ends_at=2000.0),)
    assert schedule([held], [gpus(1, 2)], running, now=1000.0).estimated_start == {}
    sound = NodeSlots("node-a", (GpuSlot(0, busy_job=7), GpuSlot(1, busy_job=7)))
    assert schedule([sound], [gpus(1, 2)], running, now=1000.0).estimated_start == {1: 2000.0}


def test_nodes_take_best_fit_nodes_ranked_by_name() -> None:
    cluster = [node("a", 8), node("c", 2), node("b", 3), node("d", 1)]
    assert hosts_of(schedule(cluster, [spread(1, 2, 2)])) == {1: (("b", (0, 1)), ("c", (0, 1)))}


def test_nodes_best_fit_ties_go_by_name_and_indices_are_lowest_free() -> None:
    cluster = [node("c", 4, busy=[1]), node("b", 4, busy=[0]), node("a", 4, busy=[3])]
    assert hosts_of(schedule(cluster, [spread(1, 2, 2)])) == {1: (("a", (0, 1)), ("b", (1, 2)))}


def test_gang_placement_is_all_or_nothing() -> None:
    cluster = [node("a", 4, busy=[0]), node("b", 2)]
    decision = schedule(cluster, [spread(1, 2, 3)])
    assert decision.placements == ()
    decision = schedule(cluster, [gpus(1, 6)])
    assert decision.placements == ()


def test_higher_priority_goes_first_even_when_submitted_later() -> None:
    decision = schedule([node("a", 4)], [gpus(1, 4), gpus(2, 4, priority=5)])
    assert hosts_of(decision) == {2: (("a", (0, 1, 2, 3)),)}
    assert set(decision.reasons) == {1}


def test_equal_priority_goes_in_submit_order() -> None:
    decision = schedule([node("a", 4)], [gpus(3, 3), gpus(1, 3)])
    assert [p.job_id for p in decision.placements] == [3]
    assert set(decision.reasons) == {1}


def test_backfill_places_a_lower_priority_job_that_fits() -> None:
    decision = schedule([node("a", 4, busy=[0])], [gpus(1, 4, priority=9), gpus(2, 2), gpus(3, 1)])
    assert hosts_of(decision) == {2: (("a", (1, 2)),), 3: (("a", (3,)),)}
    assert set(decision.reasons) == {1}


def test_schedule_is_deterministic() -> None:
    cluster = [node("a", 4, busy=[1]), node("b", 3, foreign=[0])]
    queue = [gpus(1, 2), spread(2, 2, 1, priority=1), gpus(3, 9)]
    assert schedule(cluster, queue) == schedule(list(cluster), list(queue))


# --- reason forms -----------------------------------------------------------------------------


def test_reason_when_no_nodes_are_up() -> None:
    assert schedule([], [gpus(1, 1), spread(2, 1, 1)]).reasons == {
        1: "no nodes are up",
        2: "no nodes are up",
    }


def test_reason_gpus_lists_free_gpus_per_node() -> None:
    cluster = [node("node-a", 4, busy=[0]), node("node-b", 2, busy=[0]), node("node-c", 2, busy=[0, 1])]
    assert schedule(cluster, [gpus(1, 6)]).reasons == {
        1: "needs 6 GPUs; 4 are free across 2 nodes (node-a 3, node-b 1)"
    }


def test_reason_gpus_counts_gpus_hidden_by_outside_processes() -> None:
    cluster = [node("node-a", 4, foreign=[0], busy=[3]), node("node-b", 2, foreign=[0], busy=[0])]
    assert schedule(cluster, [gpus(1, 6)]).reasons == {
        1: "needs 6 GPUs; 3 are free across 2 nodes (node-a 2, node-b 1); "
        "1 more is held by a process outside gpudeck"
    }
    cluster = [node("node-a", 4, foreign=[0, 1]), node("node-b", 2, foreign=[0])]
    assert schedule(cluster, [gpus(1, 6)]).reasons == {
        1: "needs 6 GPUs; 3 are free across 2 nodes (node-a 2, node-b 1); "
        "3 more are held by processes outside gpudeck"
    }


def test_reason_gpus_singular_and_none_free() -> None:
    assert schedule([node("node-a", 2, busy=[0])], [gpus(1, 2)]).reasons == {
        1: "needs 2 GPUs; 1 is free on 1 node (node-a 1)"
    }
    assert schedule([node("node-a", 2, busy=[0, 1])], [gpus(1, 1)]).reasons == {
        1: "needs 1 GPU; none are free"
    }
    assert schedule([node("node-a", 2, busy=[0], foreign=[1])], [gpus(1, 1)]).reasons == {
        1: "needs 1 GPU; none are free; 1 is held by a process outside gpudeck"
    }


def test_reason_one_node_names_the_nearest_fit() -> None:
    cluster = [node("node-a", 4, busy=[0, 1]), node("node-b", 4, busy=[0])]
    assert schedule(cluster, [spread(1, 1, 4)]).reasons == {
        1: "needs 4 GPUs on one node; the most free on one node is 3, on node-b"
    }


def test_reason_names_the_first_node_by_name_among_equals() -> None:
    cluster = [node("b1", 2), node("a2", 2)]
    assert schedule(cluster, [spread(1, 1, 3)]).reasons == {
        1: "needs 3 GPUs on one node; the most free on one node is 2, on a2"
    }


def test_reason_nodes_when_no_node_has_enough() -> None:
    cluster = [node("node-a", 4, busy=[0, 1]), node("node-b", 4, busy=[0]), node("node-c", 4, busy=[0])]
    assert schedule(cluster, [spread(1, 2, 4)]).reasons == {
        1: "needs 2 nodes with 4 free GPUs each; the most free on one node is 3, on node-b"
    }


def test_reason_nodes_when_too_few_nodes_have_enough() -> None:
    cluster = [node("node-b", 1), node("node-a", 2), node("node-c", 1, busy=[0])]
    assert schedule(cluster, [spread(1, 3, 1)]).reasons == {
        1: "needs 3 nodes with 1 free GPU each; only 2 nodes have that (node-a, node-b)"
    }
    assert schedule(cluster, [spread(1, 2, 2)]).reasons == {
        1: "needs 2 nodes with 2 free GPUs each; only 1 node has that (node-a)"
    }


def test_reason_nodes_when_no_gpu_is_free_and_some_are_hidden() -> None:
    cluster = [node("node-a", 2, busy=[0], foreign=[1]), node("node-b", 1, foreign=[0])]
    assert schedule(cluster, [spread(1, 2, 1)]).reasons == {
        1: "needs 2 nodes with 1 free GPU each; no node has a free GPU; "
        "2 GPUs are held by processes outside gpudeck"
    }


def test_reasons_describe_what_is_left_after_placements() -> None:
    decision = schedule([node("node-a", 4)], [gpus(1, 3), gpus(2, 2)])
    assert decision.reasons == {2: "needs 2 GPUs; 1 is free on 1 node (node-a 1)"}


# --- impossible_reason ------------------------------------------------------------------------


def test_impossible_reason_forms() -> None:
    cluster = [node("node-a", 4, busy=[0, 1, 2, 3]), node("node-b", 2, foreign=[0])]
    assert impossible_reason(gpus(1, 6), cluster) is None
    assert impossible_reason(gpus(1, 7), cluster) == "needs 7 GPUs but the 2 nodes have only 6 GPUs in all"
    assert impossible_reason(gpus(1, 5), cluster[:1]) == "needs 5 GPUs but the 1 node has only 4 GPUs in all"
    assert impossible_reason(spread(1, 3, 1), cluster) == (
        "needs 3 nodes with 1 GPU each but there are only 2 nodes"
    )
    assert impossible_reason(spread(1, 1, 5), cluster) == (
        "needs 5 GPUs on one node but the largest node, node-a, has 4 GPUs"
    )
    assert impossible_reason(spread(1, 2, 5), cluster) == (
        "needs 2 nodes with 5 GPUs each but the largest node, node-a, has 4 GPUs"
    )
    assert impossible_reason(spread(1, 2, 3), cluster) == (
        "needs 2 nodes with 3 GPUs each but only 1 node has that many (node-a)"
    )
    assert impossible_reason(spread(1, 2, 2), cluster) is None
    assert impossible_reason(spread(1, 1, 5), [node("b1", 4), node("a2", 4)]) == (
        "needs 5 GPUs on one node but the largest node, a2, has 4 GPUs"
    )


def test_impossible_reason_with_no_nodes_is_none_and_malformed_is_the_validation_sentence() -> None:
    assert impossible_reason(gpus(1, 4096), []) is None
    assert impossible_reason(spread(1, 1024, 64), []) is None
    assert impossible_reason(gpus(1, 0), [node("a", 1)]) == validate_request(gpus(1, 0))


# --- properties -------------------------------------------------------------------------------

NAMES = st.text(alphabet="ab-1", min_size=1, max_size=4)
GPU_STATE = st.sampled_from(["free", "free", "free", "busy", "foreign", "both"])


@st.composite
def clusters(draw: st.DrawFn) -> list[NodeSlots]:
    """0-8 nodes with unique names, 0-8 GPUs each in any order, some busy or foreign."""
    names = draw(st.lists(NAMES, max_size=8, unique=True))
    result = []
    for name in names:
        indices = draw(st.permutations(range(draw(st.integers(0, 8)))))
        slots = []
        for index in indices:
            state = draw(GPU_STATE)
            busy = 1000 + index if state in ("busy", "both") else None
            foreign = f"pid {index}" if state in ("foreign", "both") else None
            slots.append(GpuSlot(index, busy_job=busy, foreign=foreign))
        result.append(NodeSlots(name, tuple(slots)))
    return result


@st.composite
def requests(draw: st.DrawFn, job_id: int) -> JobRequest:
    """Mostly well-formed requests of both shapes, sometimes a malformed one."""
    priority = draw(st.integers(-2, 2))
    shape = draw(st.sampled_from(["gpus", "gpus", "nodes", "nodes", "odd"]))
    if shape == "gpus":
        return JobRequest(job_id, priority, gpus=draw(st.integers(1, 20)))
    if shape == "nodes":
        nodes, per_node = draw(st.integers(1, 5)), draw(st.integers(1, 9))
        return JobRequest(job_id, priority, nodes=nodes, gpus_per_node=per_node)
    maybe = st.one_of(st.none(), st.integers(-1, 5000))
    return JobRequest(job_id, priority, gpus=draw(maybe), nodes=draw(maybe), gpus_per_node=draw(maybe))


@st.composite
def queues(draw: st.DrawFn) -> list[JobRequest]:
    """0-8 jobs with unique ids, in submit order."""
    ids = draw(st.lists(st.integers(1, 50), max_size=8, unique=True))
    return [draw(requests(job_id)) for job_id in ids]


def free_sets(cluster: Sequence[NodeSlots]) -> FreeSets:
    """Node name -> free GPU indices, computed here independently of the scheduler."""
    return {
        n.name: {g.index for g in n.gpus if g.busy_job is None and g.foreign is None} for n in cluster
    }


def hidden_count(cluster: Sequence[NodeSlots]) -> int:
    """How many idle GPUs are used by outside processes, the number reasons must report."""
    return sum(1 for n in cluster for g in n.gpus if g.busy_job is None and g.foreign is not None)


def fits(req: JobRequest, free: FreeSets) -> bool:
    """The oracle: could this well-formed request be placed on these free GPUs?"""
    if req.gpus is not None:
        return sum(len(s) for s in free.values()) >= req.gpus
    assert req.nodes is not None and req.gpus_per_node is not None  # well formed: both given
    return sum(1 for s in free.values() if len(s) >= req.gpus_per_node) >= req.nodes


def consideration_order(queue: Sequence[JobRequest]) -> list[JobRequest]:
    """The documented order: priority, higher first, then submit order (sorted is stable)."""
    return sorted(queue, key=lambda r: -r.priority)


def leftover_cluster(cluster: Sequence[NodeSlots], decision: Decision) -> list[NodeSlots]:
    """The cluster with every placed GPU marked busy by the job that got it."""
    holder = {(name, i): p.job_id for p in decision.placements for name, idx in p.hosts for i in idx}
    return [
        NodeSlots(
            n.name,
            tuple(
                GpuSlot(g.index, busy_job=holder.get((n.name, g.index), g.busy_job), foreign=g.foreign)
                for g in n.gpus
            ),
        )
        for n in cluster
    ]


@settings(max_examples=300, deadline=None)
@given(clusters(), queues())
def test_placements_are_sound_and_gangs_are_whole(cluster: list[NodeSlots], queue: list[JobRequest]) -> None:
    decision = schedule(cluster, queue)
    free = free_sets(cluster)
    sizes = {n.name: len(n.gpus) for n in cluster}
    requests_by_id = {r.job_id: r for r in queue}
    given_out: set[tuple[str, int]] = set()
    per_node: dict[str, int] = {}
    for placement in decision.placements:
        req = requests_by_id[placement.job_id]
        assert validate_request(req) is None
        names = [name for name, _ in placement.hosts]
        assert len(names) == len(set(names))
        for name, indices in placement.hosts:
            assert indices and list(indices) == sorted(set(indices))
            for i in indices:
                assert i in free[name], "a busy or foreign GPU was offered"
                assert (name, i) not in given_out, "one GPU was given twice"
                given_out.add((name, i))
            per_node[name] = per_node.get(name, 0) + len(indices)
        if req.gpus is not None:
            assert sum(len(idx) for _, idx in placement.hosts) == req.gpus
        else:
            assert len(placement.hosts) == req.nodes
            assert names == sorted(names)
            assert all(len(idx) == req.gpus_per_node for _, idx in placement.hosts)
    assert all(count <= sizes[name] for name, count in per_node.items())


@settings(max_examples=300, deadline=None)
@given(clusters(), queues())
def test_every_job_is_placed_or_has_a_reason_and_waits_only_when_it_cannot_fit(
    cluster: list[NodeSlots], queue: list[JobRequest]
) -> None:
    decision = schedule(cluster, queue)
    placed = hosts_of(decision)
    assert len(placed) == len(decision.placements)
    assert set(placed) | set(decision.reasons) == {r.job_id for r in queue}
    assert not set(placed) & set(decision.reasons)
    free = free_sets(cluster)
    for req in consideration_order(queue):
        if req.job_id in placed:
            for name, indices in placed[req.job_id]:
                free[name] -= set(indices)
        elif validate_request(req) is None:
            assert not fits(req, free), "a job that fitted when its turn came was skipped"
    leftover = leftover_cluster(cluster, decision)
    for req in queue:
        if req.job_id in decision.reasons:
            assert schedule(leftover, [req]).placements == ()


@settings(max_examples=300, deadline=None)
@given(clusters(), queues())
def test_placements_follow_priority_then_submit_order(
    cluster: list[NodeSlots], queue: list[JobRequest]
) -> None:
    decision = schedule(cluster, queue)
    order = [r.job_id for r in consideration_order(queue)]
    placed = [p.job_id for p in decision.placements]
    assert placed == [job_id for job_id in order if job_id in placed]


@settings(max_examples=300, deadline=None)
@given(clusters(), queues())
def test_gpus_jobs_use_the_fewest_nodes(cluster: list[NodeSlots], queue: list[JobRequest]) -> None:
    decision = schedule(cluster, queue)
    placed = hosts_of(decision)
    free = free_sets(cluster)
    for req in consideration_order(queue):
        if req.job_id not in placed:
            continue
        hosts = placed[req.job_id]
        if req.gpus is not None:
            counts = sorted((len(s) for s in free.values()), reverse=True)
            fewest = next(k for k in range(1, len(counts) + 1) if sum(counts[:k]) >= req.gpus)
            assert len(hosts) == fewest
        for name, indices in hosts:
            free[name] -= set(indices)


GPUS_REASON = re.compile(
    r"needs (\d+) GPUs?; (?:none are free|(\d+) (?:is|are) free (?:on 1 node|across (\d+) nodes) \((.*)\))"
    r"(?:; (\d+)(?: more)? (?:is|are) held by (?:a process|processes) outside gpudeck)?"
)
NODES_REASON = re.compile(
    r"needs (?:(\d+) GPUs? on one node|(\d+) nodes with (\d+) free GPUs? each); "
    r"(?:the most free on one node is (\d+), on (.*?)|only (\d+) nodes? (?:has|have) that \((.*?)\)"
    r"|no node has a free GPU)"
    r"(?:; (\d+) GPUs? (?:is|are) held by (?:a process|processes) outside gpudeck)?"
)


def check_gpus_reason(reason: str, req: JobRequest, free: FreeSets, hidden: int) -> None:
    """The numbers in a `--gpus` reason match the free GPUs left and the hidden ones."""
    match = GPUS_REASON.fullmatch(reason)
    assert match, reason
    need, total, node_count, listing, held = match.groups()
    have = {name: len(s) for name, s in free.items() if s}
    assert int(need) == req.gpus
    assert int(total or 0) == sum(have.values()) < req.gpus
    if listing:
        listed = dict(item.rsplit(" ", 1) for item in listing.split(", "))
        assert {name: int(n) for name, n in listed.items()} == have
        assert list(listed) == sorted(listed)
        assert int(node_count or 1) == len(have)
    assert int(held or 0) == hidden


def check_nodes_reason(reason: str, req: JobRequest, free: FreeSets, hidden: int) -> None:
    """The numbers and names in a `--nodes` reason match the free GPUs left per node."""
    match = NODES_REASON.fullmatch(reason)
    assert match, reason
    one_per_node, nodes, per_node, most, most_name, only, only_names, held = match.groups()
    asked = (int(one_per_node), 1) if one_per_node else (int(per_node), int(nodes))
    assert asked == (req.gpus_per_node, req.nodes)
    assert req.gpus_per_node is not None and req.nodes is not None  # for the type checker: asked holds ints
    fitting = sorted(name for name, s in free.items() if len(s) >= req.gpus_per_node)
    best = max((len(s) for s in free.values()), default=0)
    if only:
        assert int(only) == len(fitting) < req.nodes
        assert only_names.split(", ") == fitting
    elif most:
        assert not fitting and int(most) == best == len(free[most_name]) > 0
        assert most_name == min(name for name, s in free.items() if len(s) == best)
    else:
        assert best == 0
    assert int(held or 0) == hidden


@settings(max_examples=300, deadline=None)
@given(clusters(), queues())
def test_reasons_agree_with_the_free_capacity_left(cluster: list[NodeSlots], queue: list[JobRequest]) -> None:
    decision = schedule(cluster, queue)
    free = free_sets(leftover_cluster(cluster, decision))
    hidden = hidden_count(cluster)
    for req in queue:
        reason = decision.reasons.get(req.job_id)
        if reason is None:
            continue
        if validate_request(req) is not None:
            assert reason == validate_request(req)
        elif not cluster:
            assert reason == "no nodes are up"
        elif req.gpus is not None:
            check_gpus_reason(reason, req, free, hidden)
        else:
            check_nodes_reason(reason, req, free, hidden)


@settings(max_examples=200, deadline=None)
@given(clusters(), queues(), st.randoms(use_true_random=False))
def test_decision_does_not_depend_on_node_or_gpu_order(
    cluster: list[NodeSlots], queue: list[JobRequest], rng: random.Random
) -> None:
    shuffled = [NodeSlots(n.name, tuple(rng.sample(n.gpus, len(n.gpus)))) for n in cluster]
    rng.shuffle(shuffled)
    assert schedule(shuffled, queue) == schedule(cluster, queue)


@settings(max_examples=300, deadline=None)
@given(clusters(), requests(1))
def test_impossible_reason_is_none_iff_the_request_fits_an_idle_cluster(
    cluster: list[NodeSlots], req: JobRequest
) -> None:
    reason = impossible_reason(req, cluster)
    if validate_request(req) is not None:
        assert reason == validate_request(req)
        return
    idle = [NodeSlots(n.name, tuple(GpuSlot(g.index) for g in n.gpus)) for n in cluster]
    if not cluster:
        assert reason is None
        return
    assert (reason is None) == fits(req, free_sets(idle))
    assert (reason is None) == (schedule(idle, [req]).placements != ())


@given(
    st.builds(
        JobRequest,
        job_id=st.just(1),
        gpus=st.one_of(st.none(), st.integers(-2, 5000)),
        nodes=st.one_of(st.none(), st.integers(-2, 1100)),
        gpus_per_node=st.one_of(st.none(), st.integers(-2, 70)),
    )
)
def test_validate_request_accepts_exactly_the_documented_shapes(req: JobRequest) -> None:
    if req.gpus is not None and req.nodes is None and req.gpus_per_node is None:  # by --gpus
        in_range = 1 <= req.gpus <= 4096
    elif req.gpus is None and req.nodes is not None and req.gpus_per_node is not None:  # by --nodes
        in_range = 1 <= req.nodes <= 1024 and 1 <= req.gpus_per_node <= 64
    else:
        in_range = False
    problem = validate_request(req)
    assert (problem is None) == in_range
    assert problem is None or problem.strip()


def test_placement_type_is_what_callers_read() -> None:
    decision = schedule([node("a", 2)], [gpus(1, 2)])
    assert decision.placements == (Placement(1, (("a", (0, 1)),)),)


def test_the_doctor_check_starts_on_its_named_nodes_beside_full_gpus_and_blocks_nobody() -> None:
    nodes = [node("a", 2, busy=[0, 1]), node("b", 2, busy=[0]), node("c", 1)]
    big = JobRequest(job_id=1, priority=5, gpus=4)  # cannot start: it takes the reservation
    check = JobRequest(job_id=2, on_nodes=("b", "a"))
    small = JobRequest(job_id=3, gpus=1, time_limit=10)
    decision = schedule(nodes, [big, check, small], [RunningJob(99, (("a", (0, 1)), ("b", (0,))), ends_at=100)])
    assert decision.placements == (Placement(2, (("a", ()), ("b", ()))), Placement(3, (("b", (1,)),)))
    assert decision.reservation is not None and decision.reservation.job_id == 1  # as if the check were not there
    assert decision.free_after == {"a": (), "b": (), "c": (0,)}


def test_the_doctor_check_waits_for_a_named_node_that_is_not_up() -> None:
    decision = schedule([node("a", 1)], [JobRequest(job_id=7, on_nodes=("a", "gone"))])
    assert decision.placements == ()
    assert decision.reasons == {7: "waits for gone to be up and not draining"}
