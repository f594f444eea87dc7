"""Fair scheduling: priority factors, fair share from decayed usage, per-person limits and EASY
backfill with a reservation.

The pure parts (`gpudeck.coordinator.priority` and the scheduler) are checked with properties against
oracles written here; `JobControl` against a real store with a fake clock (the `Deck` of
test_job_control); and the whole path through real processes: a coordinator and an agent whose
4-GPU job waits behind 1-GPU jobs and starts by its estimate.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gpudeck.coordinator.jobs import DEFAULT_TIME_LIMIT, RESCORE_EVERY, JobControl
from gpudeck.coordinator.priority import (
    WEEK, Policy, Weights, age_factor, decayed_usage, fair_shares, priority_factor,
)
from gpudeck.coordinator.scheduler import (
    Decision, GpuSlot, JobRequest, NodeSlots, RunningJob, schedule, validate_request,
)
from gpudeck.cli import build_parser
from gpudeck.cli.services import coordinator_config
from gpudeck.coordinator.store import UserRow
from gpudeck.model import JobSpec, JobState, RunSpec
from gpudeck.output import job_detail, jobs_table, starts_text
from gpudeck.protocol.payloads import FactorView, JobView
from tests.cluster import Cluster
from tests.test_job_control import PORTS, Deck
from tests.test_scheduler import fits, node

Gpu = tuple[str, int]


@dataclass(frozen=True)
class Held:
    """What `Store.held_gpus` gives: the GPUs one attempt held, from when to when."""

    owner: str
    gpus: int
    started_at: float
    ended_at: float | None


# --- priority factors ---------------------------------------------------------------------------


def test_priority_factor_maps_the_range_onto_0_to_1() -> None:
    assert (priority_factor(-1000), priority_factor(0), priority_factor(1000)) == (0.0, 0.5, 1.0)
    assert priority_factor(5000) == 1.0 and priority_factor(-5000) == 0.0


def test_age_grows_to_the_cap_and_stays() -> None:
    assert age_factor(100.0, 100.0, WEEK) == 0.0
    assert age_factor(0.0, WEEK / 2, WEEK) == 0.5
    assert age_factor(0.0, 3 * WEEK, WEEK) == 1.0
    assert age_factor(100.0, 50.0, WEEK) == 0.0, "a clock that went back gives no negative age"


def test_fair_share_is_slurms_classic_formula() -> None:
    assert fair_shares({}, {"ada"}) == {"ada": 1.0}, "nobody used anything: everyone is owed everything"
    shares = fair_shares({"ada": 30.0, "bo": 10.0, "cy": 0.0}, {"cy", "dee"})
    # four people, so each is due 1/4: ada used 3/4 (3 shares), bo 1/4 (exactly one), cy and dee none
    assert shares == {"ada": 2.0 ** -3, "bo": 0.5, "cy": 1.0, "dee": 1.0}


def test_the_total_is_the_sum_of_the_weighted_factors_it_explains() -> None:
    policy = Policy(Weights(fair_share=100.0, age=10.0, priority=1.0), age_cap=1000.0)
    factors = policy.explain(500, 0.0, 0.25, 100.0)
    assert [(f.name, f.value, f.weight) for f in factors] == [
        ("fair_share", 0.25, 100.0), ("age", 0.1, 10.0), ("priority", 0.75, 1.0)]
    assert sum(f.contribution for f in factors) == policy.total(500, 0.0, 0.25, 100.0) == 25.0 + 1.0 + 0.75


def test_a_gpu_second_one_half_life_ago_counts_half() -> None:
    usage = decayed_usage([Held("ada", 2, 0.0, 1.0), Held("bo", 1, 99.0, None)], now=101.0, half_life=100.0)
    assert usage["ada"] == pytest.approx(2 * 0.5, rel=0.01)
    assert usage["bo"] == pytest.approx(2 * 2 ** (-1 / 100), rel=0.01), "a job still holding counts up to now"


HELD = st.lists(st.builds(
    lambda owner, gpus, start, length, open_: Held(owner, gpus, start, None if open_ else start + length),
    st.sampled_from(["ada", "bo", "cy"]), st.integers(0, 8), st.integers(0, 10_000), st.integers(0, 5_000),
    st.booleans()), max_size=12)


@settings(max_examples=200, deadline=None)
@given(HELD, st.integers(0, 20_000), st.integers(0, 20_000), st.integers(100, 50_000))
def test_decayed_usage_carried_over_equals_counting_from_the_start(
        held: list[Held], first: int, second: int, half_life: int) -> None:
    since, now = min(first, second), max(first, second)
    whole = decayed_usage(held, now, half_life)
    carried = decayed_usage(held, now, half_life, since, decayed_usage(held, since, half_life))
    assert set(carried) <= set(whole) | {r.owner for r in held}
    for owner in set(whole) | set(carried):
        assert carried.get(owner, 0.0) == pytest.approx(whole.get(owner, 0.0), rel=1e-9, abs=1e-6)


@settings(max_examples=200, deadline=None)
@given(HELD, HELD, st.integers(10_000, 30_000))
def test_of_two_equal_jobs_the_owner_with_less_decayed_usage_goes_first(
        ada: list[Held], bo: list[Held], now: int) -> None:
    held = [Held("ada", r.gpus, r.started_at, r.ended_at) for r in ada] + [
        Held("bo", r.gpus, r.started_at, r.ended_at) for r in bo]
    usage = decayed_usage(held, now, WEEK)
    assume(abs(usage.get("ada", 0.0) - usage.get("bo", 0.0)) > 1.0)
    shares, policy = fair_shares(usage, {"ada", "bo"}), Policy()
    jobs = [JobRequest(job_id, policy.total(0, now - 60.0, shares[owner], now), gpus=1, owner=owner)
            for job_id, owner in ((1, "ada"), (2, "bo"))]
    (placed,) = schedule([node("n", 1)], jobs).placements
    lighter = min(("ada", "bo"), key=lambda owner: usage.get(owner, 0.0))
    assert placed.job_id == {"ada": 1, "bo": 2}[lighter]


# --- limits and reservations, by example -------------------------------------------------------


def running(job_id: int, node_name: str, gpus: tuple[int, ...], ends_at: float | None, owner: str = "bo") -> RunningJob:
    return RunningJob(job_id, ((node_name, gpus),), ends_at, owner)


def busy_node(name: str, count: int, busy: dict[int, int]) -> NodeSlots:
    """A node whose GPU index -> job id in `busy` are held."""
    return NodeSlots(name, tuple(GpuSlot(i, busy_job=busy.get(i)) for i in range(count)))


def test_a_job_over_its_owners_limit_waits_and_says_whose_limit() -> None:
    cluster = [busy_node("a", 8, {0: 10, 1: 10, 2: 10})]
    queue = [JobRequest(1, 0, gpus=2, owner="ada"), JobRequest(2, 0, gpus=5, owner="ada"),
             JobRequest(3, 0, gpus=1, owner="ada"), JobRequest(4, 0, gpus=2, owner="bo")]
    decision = schedule(cluster, queue, [running(10, "a", (0, 1, 2), None, owner="ada")], {"ada": 4})
    assert [p.job_id for p in decision.placements] == [3, 4]
    assert decision.reasons == {1: "ada's limit is 4 GPUs at once; ada's jobs hold 4",
                                2: "needs 5 GPUs but ada's limit is 4 GPUs at once"}


def test_the_first_job_that_cannot_start_gets_gpus_when_the_running_jobs_end() -> None:
    cluster = [busy_node("a", 4, {0: 10, 1: 11, 2: 12})]
    run = [running(10, "a", (0,), 100.0), running(11, "a", (1,), 130.0), running(12, "a", (2,), 120.0)]
    queue = [JobRequest(1, 9, gpus=4), JobRequest(2, 5, gpus=1), JobRequest(3, 4, gpus=1, time_limit=200),
             JobRequest(4, 3, gpus=1, time_limit=80)]
    decision = schedule(cluster, queue, run, now=50.0)
    assert decision.reservation is not None and decision.reservation.hosts == (("a", (0, 1, 2, 3)),)
    assert decision.estimated_start == {1: 130.0}
    assert [p.job_id for p in decision.placements] == [4], "only the job that ends by then may use the free GPU"
    assert decision.reasons[1] == ("needs 4 GPUs; none are free; it is next in line and starts when jobs 10, 11 "
                                   "and 12 end")
    assert decision.reasons[2] == decision.reasons[3] == "needs 1 GPU; none are free"


def test_later_jobs_may_use_gpus_the_reservation_does_not_need() -> None:
    cluster = [busy_node("a", 4, {0: 10, 1: 10}), busy_node("b", 2, {})]
    queue = [JobRequest(1, 9, nodes=1, gpus_per_node=4), JobRequest(2, 0, gpus=2), JobRequest(3, 0, gpus=1)]
    decision = schedule(cluster, queue, [running(10, "a", (0, 1), 500.0)], now=0.0)
    assert decision.reservation is not None and decision.reservation.hosts == (("a", (0, 1, 2, 3)),)
    assert [(p.job_id, p.hosts) for p in decision.placements] == [(2, (("b", (0, 1)),))]
    assert decision.reasons[3] == ("waits for job 1, which is next in line and starts when job 10 ends: the GPUs this "
                                   "job could take now are kept for it (a --time-limit that ends before then would let "
                                   "this job run first)")


def test_a_job_past_its_time_limit_counts_as_ending_now() -> None:
    cluster = [busy_node("a", 2, {0: 10})]
    decision = schedule(cluster, [JobRequest(1, 0, gpus=2), JobRequest(2, 0, gpus=1, time_limit=5)],
                        [running(10, "a", (0,), 40.0)], now=100.0)
    assert decision.estimated_start == {1: 100.0}
    assert decision.placements == (), "nothing ends before a reservation that starts now"


def test_a_job_no_known_time_can_start_gets_no_reservation_and_the_next_one_does() -> None:
    cluster = [busy_node("a", 2, {0: 10, 1: 11}), NodeSlots("b", (GpuSlot(0, foreign="python pid 7"), GpuSlot(1)))]
    queue = [JobRequest(1, 9, gpus=4), JobRequest(2, 5, gpus=2), JobRequest(3, 0, gpus=1)]
    decision = schedule(cluster, queue, [running(10, "a", (0,), None), running(11, "a", (1,), 60.0)], now=0.0)
    assert decision.reservation is not None and decision.reservation.job_id == 2
    assert decision.estimated_start == {2: 60.0}
    assert decision.reservation.hosts == (("a", (1,)), ("b", (1,)))
    assert 1 in decision.reasons and "next in line" not in decision.reasons[1]
    assert decision.placements == (), "job 3 would take a GPU kept for job 2"


def test_jobs_placed_in_the_round_are_planned_by_their_limit_or_the_default() -> None:
    queue = [JobRequest(1, 9, gpus=1), JobRequest(2, 8, gpus=2)]
    assert schedule([busy_node("a", 2, {})], queue, now=10.0).reservation is None, "no limit, no plan"
    decision = schedule([busy_node("a", 2, {})], queue, now=10.0, default_time_limit=60.0)
    assert decision.estimated_start == {2: 70.0}
    assert decision.reservation is not None and decision.reservation.waits_for == (1,)


# --- properties over clusters with running jobs, limits and time limits ------------------------

OWNERS = ("ada", "bo", "cy")


@dataclass(frozen=True)
class Scene:
    nodes: list[NodeSlots]
    running: list[RunningJob]
    queue: list[JobRequest]
    limits: dict[str, int]
    now: float
    default: float | None


@st.composite
def scenes(draw: st.DrawFn) -> Scene:
    """1-4 nodes of 0-6 GPUs, some held by up to 5 running jobs that end at various times (or never
    known), some used by outside processes (also some held ones); a queue of 0-8 jobs of three owners
    with time limits."""
    now = float(draw(st.integers(0, 100)))
    ends = {job: None if draw(st.integers(0, 4)) == 0 else float(draw(st.integers(0, 300)))
            for job in range(1000, 1005)}
    owners = {job: draw(st.sampled_from(OWNERS)) for job in ends}
    names = draw(st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=4, unique=True))
    nodes: list[NodeSlots] = []
    held: dict[int, dict[str, list[int]]] = {}
    for name in names:
        slots = []
        for index in range(draw(st.integers(0, 6))):
            state = draw(st.sampled_from(["free", "free", "busy", "busy", "foreign", "both"]))
            holder = draw(st.sampled_from(sorted(ends))) if state in ("busy", "both") else None
            if holder is not None:
                held.setdefault(holder, {}).setdefault(name, []).append(index)
            slots.append(GpuSlot(index, busy_job=holder, foreign="pid 9" if state in ("foreign", "both") else None))
        nodes.append(NodeSlots(name, tuple(slots)))
    run = [RunningJob(job, tuple((n, tuple(i)) for n, i in sorted(hosts.items())), ends[job], owners[job])
           for job, hosts in sorted(held.items())]
    queue = []
    for job_id in draw(st.lists(st.integers(1, 60), max_size=8, unique=True)):
        priority = float(draw(st.integers(0, 3)))
        owner, limit = draw(st.sampled_from(OWNERS)), draw(st.one_of(st.none(), st.integers(1, 300).map(float)))
        if draw(st.booleans()):
            queue.append(JobRequest(job_id, priority, gpus=draw(st.integers(1, 10)), owner=owner, time_limit=limit))
        else:
            queue.append(JobRequest(job_id, priority, nodes=draw(st.integers(1, 3)),
                                    gpus_per_node=draw(st.integers(1, 4)), owner=owner, time_limit=limit))
    limits = {owner: draw(st.integers(0, 8)) for owner in OWNERS if draw(st.booleans())}
    default = draw(st.one_of(st.none(), st.integers(1, 300).map(float)))
    return Scene(nodes, run, queue, limits, now, default)


def decide(scene: Scene) -> Decision:
    return schedule(scene.nodes, scene.queue, scene.running, scene.limits, scene.now, scene.default)


def total(req: JobRequest) -> int:
    if req.gpus is not None:
        return req.gpus
    assert req.nodes is not None and req.gpus_per_node is not None, "gpus, or nodes with gpus_per_node"
    return req.nodes * req.gpus_per_node


def initially_free(scene: Scene) -> dict[str, set[int]]:
    return {n.name: {g.index for g in n.gpus if g.busy_job is None and g.foreign is None} for n in scene.nodes}


def held_by_owner(scene: Scene) -> dict[str, int]:
    held: dict[str, int] = {}
    for job in scene.running:
        held[job.owner] = held.get(job.owner, 0) + sum(len(i) for _, i in job.hosts)
    return held


def gpus_of(hosts: tuple[tuple[str, tuple[int, ...]], ...]) -> set[Gpu]:
    return {(name, i) for name, indices in hosts for i in indices}


def planned_end(req: JobRequest, scene: Scene) -> float:
    limit = req.time_limit if req.time_limit is not None else scene.default
    return math.inf if limit is None else scene.now + limit


def running_end(scene: Scene) -> dict[Gpu, float]:
    """When each busy GPU is planned to be given back (past ends count as now; never known: inf), an
    outside process listed on it or not."""
    busy = {(n.name, g.index) for n in scene.nodes for g in n.gpus if g.busy_job is not None}
    return {gpu: math.inf if job.ends_at is None else max(job.ends_at, scene.now)
            for job in scene.running for gpu in gpus_of(job.hosts) if gpu in busy}


def order(scene: Scene) -> list[JobRequest]:
    return sorted(scene.queue, key=lambda r: -r.priority)


@settings(max_examples=400, deadline=None)
@given(scenes())
def test_limits_are_never_exceeded(scene: Scene) -> None:
    decision = decide(scene)
    by_id = {r.job_id: r for r in scene.queue}
    placed: dict[str, int] = {}
    for p in decision.placements:
        placed[by_id[p.job_id].owner] = placed.get(by_id[p.job_id].owner, 0) + total(by_id[p.job_id])
    held = held_by_owner(scene)
    for owner, limit in scene.limits.items():
        assert placed.get(owner, 0) == 0 or held.get(owner, 0) + placed[owner] <= limit


@settings(max_examples=400, deadline=None)
@given(scenes())
def test_no_backfilled_job_delays_the_reservation(scene: Scene) -> None:
    decision = decide(scene)
    reserved = decision.reservation
    assume(reserved is not None)
    assert reserved is not None
    by_id = {r.job_id: r for r in scene.queue}
    position = {r.job_id: k for k, r in enumerate(order(scene))}
    kept = gpus_of(reserved.hosts)
    ends = running_end(scene)
    free = initially_free(scene)
    for p in decision.placements:
        req = by_id[p.job_id]
        if position[p.job_id] > position[reserved.job_id] and gpus_of(p.hosts) & kept:
            assert req.time_limit is not None and scene.now + req.time_limit <= reserved.start, \
                "a later job on kept GPUs must be stopped by its own limit before the reservation starts"
        for gpu in gpus_of(p.hosts) & kept:
            ends[gpu] = planned_end(req, scene)
    for name, index in kept:
        assert index in free[name] or ends.get((name, index), math.inf) <= reserved.start, \
            "every kept GPU is free when the reservation starts"


@settings(max_examples=400, deadline=None)
@given(scenes())
def test_the_estimated_start_is_the_end_of_the_jobs_it_waits_for_and_none_is_sooner(scene: Scene) -> None:
    decision = decide(scene)
    reserved = decision.reservation
    assume(reserved is not None)
    assert reserved is not None
    assert decision.estimated_start == {reserved.job_id: reserved.start}
    assert reserved.start >= scene.now
    by_id = {r.job_id: r for r in scene.queue}
    position = {r.job_id: k for k, r in enumerate(order(scene))}
    ends, free = running_end(scene), initially_free(scene)
    for p in decision.placements:
        if position[p.job_id] < position[reserved.job_id]:  # placed before the reservation was made
            for name, index in gpus_of(p.hosts):
                free[name].discard(index)
                ends[(name, index)] = planned_end(by_id[p.job_id], scene)
    waited = [ends[gpu] for gpu in gpus_of(reserved.hosts) if gpu[1] not in free[gpu[0]]]
    assert waited and reserved.start == max(waited)
    sooner = {name: indices | {i for (n, i), end in ends.items() if n == name and end < reserved.start}
              for name, indices in free.items()}
    assert not fits(by_id[reserved.job_id], sooner), "it could have been planned for an earlier end"


@settings(max_examples=400, deadline=None)
@given(scenes())
def test_a_placeable_job_waits_only_behind_a_limit_or_the_reservation(scene: Scene) -> None:
    decision = decide(scene)
    placed = {p.job_id: p.hosts for p in decision.placements}
    assert set(placed) | set(decision.reasons) == {r.job_id for r in scene.queue}
    assert not set(placed) & set(decision.reasons)
    reserved = decision.reservation
    kept = gpus_of(reserved.hosts) if reserved else set()
    free, held = initially_free(scene), held_by_owner(scene)
    eventually = {name: indices | {i for (n, i), end in running_end(scene).items() if n == name and end < math.inf}
                  for name, indices in free.items()}
    seen_reservation = False
    for req in order(scene):
        if req.job_id in placed:
            for name, index in gpus_of(placed[req.job_id]):
                free[name].discard(index)
                if planned_end(req, scene) == math.inf:
                    eventually[name].discard(index)
            held[req.owner] = held.get(req.owner, 0) + total(req)
            continue
        limit = scene.limits.get(req.owner)
        if validate_request(req) is not None or (limit is not None and held.get(req.owner, 0) + total(req) > limit):
            assert reserved is None or req.job_id != reserved.job_id
        elif not seen_reservation:
            assert not fits(req, free), "a job that fitted before any reservation waited"
            seen_reservation = reserved is not None and req.job_id == reserved.job_id
            if not seen_reservation:
                assert not fits(req, eventually), "a job that could be planned got no reservation"
        else:
            assert reserved is not None, "seen_reservation is only set once the reservation is seen"
            if req.time_limit is not None and scene.now + req.time_limit <= reserved.start:
                assert not fits(req, free), "a job that ends before the reservation and fitted waited"
            else:
                outside = {name: {i for i in indices if (name, i) not in kept} for name, indices in free.items()}
                assert not fits(req, outside), "a job that fitted outside the kept GPUs waited"
    assert seen_reservation == (reserved is not None)


# --- JobControl: scores, limits and estimates with a real store --------------------------------


def _run_for(deck: Deck, job_id: int, seconds: float) -> None:
    """Place the job, let it run for `seconds` of the fake clock, and end it."""
    deck.control.schedule()
    deck.start_all(job_id)
    deck.clock.now += seconds
    for node_name, _ in deck.job(job_id).hosts:
        deck.control.lifecycle.exited(node_name, job_id, 1, 0, "")


def test_fair_share_serves_the_person_who_used_less_first(tmp_path: Path) -> None:
    deck = Deck(tmp_path / "gpudeck.db", {"node-a": 1})
    _run_for(deck, deck.submit(owner="ada", gpus=1), 3600)
    ada = deck.submit(owner="ada", gpus=1)
    bo = deck.submit(owner="bo", gpus=1)
    deck.clock.now += RESCORE_EVERY
    assert deck.control.schedule() == "full"
    assert deck.job(bo).state is JobState.STARTING and deck.job(ada).state is JobState.PENDING, \
        "bo has used nothing, so bo's later job goes first"
    factors, start = deck.control.standing(deck.job(ada))
    share = next(f for f in factors if f.name == "fair_share")
    assert share.value == 0.25 and share.weight == Weights().fair_share, "ada used all of the cluster: 2^-2"
    assert start == deck.clock.now + DEFAULT_TIME_LIMIT, "it is next: when bo's job has run for the default limit"
    assert deck.control.standing(deck.job(bo)) == ((), None)


def test_an_owners_limit_holds_their_next_job_and_refuses_one_that_never_fits(tmp_path: Path) -> None:
    deck = Deck(tmp_path / "gpudeck.db", {"node-a": 4})
    deck.store.add_user(UserRow("ada", "x" * 64, False, 2, deck.clock.now))
    first, second = deck.submit(owner="ada", gpus=2), deck.submit(owner="ada", gpus=1)
    other = deck.submit(owner="bo", gpus=2)
    deck.control.schedule()
    assert deck.job(first).state is JobState.STARTING and deck.job(other).state is JobState.STARTING
    assert deck.job(second).reason == "ada's limit is 2 GPUs at once; ada's jobs hold 2"
    with pytest.raises(ValueError, match="^needs 3 GPUs but ada's limit is 2 GPUs at once$"):
        deck.submit(owner="ada", gpus=3)


def test_the_reserved_job_has_an_estimate_and_only_short_jobs_pass_it(tmp_path: Path) -> None:
    deck = Deck(tmp_path / "gpudeck.db", {"node-a": 4})
    control = deck.control = JobControl(deck.store, deck.registry, deck.send, deck.clock, PORTS, default_time_limit=600)
    started = deck.clock.now
    for limit in (100, 300, None):
        deck.submit(gpus=1, time_limit=limit)
    control.schedule()
    big = deck.submit(gpus=4)
    long = deck.submit(gpus=1, time_limit=1000)
    deck.store.take_changed_ids()
    assert control.schedule() == "full"
    assert control.estimated_start == {big: started + 600}, "the job without a limit is planned at the default"
    assert deck.store.take_changed_ids() == [big, long], "watchers learn of the new estimate"
    assert control.standing(deck.job(big))[1] == started + 600
    assert deck.job(long).state is JobState.PENDING and deck.job(long).reason.startswith(f"waits for job {big}")
    short = deck.submit(gpus=1, time_limit=500)
    assert control.schedule() == "new jobs"
    assert deck.job(short).state is JobState.STARTING, "it ends before the reservation starts"


def test_a_new_job_that_takes_the_reservation_over_makes_the_pass_a_full_one(tmp_path: Path) -> None:
    deck = Deck(tmp_path / "gpudeck.db", {"node-a": 2})
    deck.submit(gpus=1, time_limit=100)
    deck.control.schedule()
    wide = deck.submit(gpus=2)
    deck.control.schedule()
    assert deck.control.estimated_start.keys() == {wide}
    urgent = deck.submit(gpus=2, priority=1000)
    assert deck.control.schedule() == "full"
    assert deck.control.estimated_start.keys() == {urgent}
    assert "next in line" in deck.job(urgent).reason and "next in line" not in deck.job(wide).reason


def test_a_cancelled_reserved_job_lets_the_jobs_it_held_back_start(tmp_path: Path) -> None:
    deck = Deck(tmp_path / "gpudeck.db", {"node-a": 2})
    deck.submit(gpus=1, time_limit=100)
    deck.control.schedule()
    wide = deck.submit(gpus=2)
    waiting = deck.submit(gpus=1)
    deck.control.schedule()
    assert deck.job(waiting).state is JobState.PENDING
    deck.control.lifecycle.cancel(wide)
    assert deck.control.schedule() == "full"
    assert deck.job(waiting).state is JobState.STARTING and deck.control.estimated_start == {}


# --- the command line ---------------------------------------------------------------------------


def test_show_explains_a_pending_jobs_factors_like_sprio_and_jobs_says_when_it_starts() -> None:
    view = JobView.build(7, JobSpec(name="big", gpus=4, run=RunSpec(command=["true"])), state="pending",
                         submitted_at=0.0,
                         reason="needs 4 GPUs; none are free", estimated_start=time.time() + 200,
                         priority_factors=[FactorView(f.name, f.value, f.weight, f.contribution)
                                           for f in Policy().explain(0, 0.0, 0.25, 3600.0)]).to_json()
    detail = job_detail(view)
    assert re.search(r"^  starts    in 3m(19|20)s, at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(planned", detail, re.M), detail
    assert "  score     3,006, the sum of each factor's value x weight" in detail, detail
    assert "              fair share  0.250 x 10,000 = 2,500\n" in detail
    assert "              age         0.006 x  1,000 =     6\n" in detail
    assert "              priority    0.500 x  1,000 =   500" in detail
    assert re.search(r"\n7 +big +- +pending +4 GPUs +- +- +in 3m(19|20)s ", jobs_table([view]))
    assert starts_text(None, 5.0) == "-" and starts_text(5.0, 5.0) == "now" and starts_text(4.0, 5.0) == "now"


def test_the_coordinators_priority_flags_make_its_policy() -> None:
    args = build_parser().parse_args(["coordinator", "--priority-weights", "age=5,fair_share=7",
                                      "--fair-share-half-life", "1d", "--priority-age-cap", "2d",
                                      "--default-time-limit", "2h", "--preempt-grace", "45s"])
    settings = coordinator_config(args)
    assert (settings.priority, settings.default_time_limit, settings.preempt_grace) == (
        Policy(Weights(fair_share=7.0, age=5.0), 86400.0, 172800.0), 7200.0, 45.0)
    with pytest.raises(SystemExit) as refused:
        build_parser().parse_args(["coordinator", "--priority-weights", "size=3"])
    assert refused.value.code == 2


# --- through real processes --------------------------------------------------------------------


@pytest.mark.slow
def test_a_whole_node_job_behind_one_gpu_jobs_starts_by_its_estimate(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    try:
        cluster.start_coordinator()
        cluster.start_agent("node-a", 4)
        cluster.wait_nodes("up", 1)
        go = tmp_path / "go"  # the running jobs end once the test has seen the queue wait
        hold = ["--", "sh", "-c", f"while [ ! -e {go} ]; do sleep 0.1; done"]
        running = [cluster.submit("--gpus", "1", "--time-limit", "40s", *hold) for _ in range(3)]
        started = [cluster.wait_job(job_id, ("running",)) for job_id in running]
        whole = cluster.submit("--gpus", "4", "--time-limit", "30s", "--", "true")
        stream = [cluster.submit("--gpus", "1", "--time-limit", "60s", "--", "true") for _ in range(2)]
        waiting = cluster.job(whole)
        assert waiting["state"] == "pending" and waiting["estimated_start"] == max(
            job["started_at"] + 40 for job in started), waiting
        assert "it is next in line and starts when jobs" in waiting["reason"]
        assert [f["name"] for f in waiting["priority_factors"]] == ["fair_share", "age", "priority"]
        for job_id in stream:
            job = cluster.job(job_id)
            assert job["state"] == "pending" and job["reason"].startswith(f"waits for job {whole}"), job
        short = cluster.submit("--gpus", "1", "--time-limit", "5s", "--", "true")
        assert cluster.wait_job(short, ("succeeded", "failed"))["state"] == "succeeded", \
            "a job that ends before the reservation uses the free GPU meanwhile"
        assert cluster.job(whole)["state"] == "pending"
        shown = cluster.cli("show", str(whole)).stdout
        assert "starts    in " in shown and "fair share" in shown, shown
        header, *rows = cluster.cli("jobs").stdout.splitlines()
        row = next(line for line in rows if line.startswith(f"{whole} "))
        assert row[header.index("STARTS"):].startswith("in "), "`gpudeck jobs` shows when it starts"
        go.touch()
        done = cluster.wait_job(whole, ("succeeded", "failed"), timeout=120)
        assert done["state"] == "succeeded" and done["started_at"] <= waiting["estimated_start"]
        later = [cluster.wait_job(job_id, ("succeeded", "failed")) for job_id in stream]
        assert all(job["started_at"] >= done["started_at"] for job in later), (done, later,
                                                                               cluster.logs_of("coordinator"))
    finally:
        cluster.stop()
