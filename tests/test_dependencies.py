"""The pure dependency gate (coordinator.dependencies) and the array vocabulary (gpudeck.arrays):
examples of every reason, then properties over random queues, dependencies and arrays."""

from __future__ import annotations

import re
from typing import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpudeck.arrays import MAX_ARRAY_TASKS, compress, job_label, parse_array, parse_ref
from gpudeck.coordinator.dependencies import Upstream, Waiting, gate
from gpudeck.model import JobSpec, RunSpec

STATES = ("pending", "starting", "running", "succeeded", "failed", "cancelled")


# --- examples --------------------------------------------------------------------------------------


def test_a_job_waits_naming_what_it_waits_for_and_starts_once_it_succeeded():
    job = Waiting(8, after=("7",), after_any=("12",))
    upstream = {"7": Upstream("job 7", {"running": 1}), "12": Upstream("array 12", {"succeeded": 2, "pending": 1})}
    assert gate([job], upstream, {}).reasons == {8: "waits for job 7 to succeed and for array 12 to end"}
    done = {"7": Upstream("job 7", {"succeeded": 1}), "12": Upstream("array 12", {"succeeded": 2, "failed": 1})}
    assert gate([job], done, {}).offered == (8,)


@pytest.mark.parametrize("upstream, reason", [
    (Upstream("job 7", {"failed": 1}), "job 7 failed, and this job was to run after it succeeded"),
    (Upstream("job 7", {"cancelled": 1}), "job 7 was cancelled, and this job was to run after it succeeded"),
    (Upstream("array 7", {"succeeded": 3, "failed": 2, "cancelled": 1}, array=True),
     "array 7 had 2 failed tasks and 1 cancelled task, and this job was to run after it succeeded"),
])
def test_a_job_whose_dependency_failed_fails_naming_it(upstream: Upstream, reason: str):
    verdict = gate([Waiting(8, after=("7",))], {"7": upstream}, {})
    assert verdict.failed == {8: reason} and not verdict.offered and not verdict.reasons


def test_after_any_starts_however_the_job_ended():
    assert gate([Waiting(8, after_any=("7",))], {"7": Upstream("job 7", {"failed": 1})}, {}).offered == (8,)


def test_an_array_offers_only_its_throttle_lowest_index_first():
    tasks = [Waiting(20 + i, array_job=20, array_index=index, throttle=2) for i, index in enumerate((5, 1, 3, 0))]
    verdict = gate(tasks, {}, {20: 1})
    assert verdict.offered == (23,), "one runs, so one more, the lowest index (0, job 23)"
    assert set(verdict.reasons) == {20, 21, 22}
    assert verdict.reasons[20] == "waits its turn: array 20 runs at most 2 of its tasks at once (--array ...%2)"
    assert gate(tasks, {}, {}).offered == (23, 21), "in the first places the array's tasks had, by index"


# --- properties ------------------------------------------------------------------------------------

counts = st.dictionaries(st.sampled_from(STATES), st.integers(1, 3), min_size=1, max_size=3)
upstreams = st.dictionaries(st.sampled_from(["1", "2", "3", "4.0", "4.1"]), counts, max_size=5).map(
    lambda found: {ref: Upstream(("array " if ref == "3" else "job ") + ref, states, array=ref == "3")
                   for ref, states in found.items()})
refs = st.lists(st.sampled_from(["1", "2", "3", "4.0", "4.1"]), max_size=3, unique=True).map(tuple)


def _not_in(taken: set[int]) -> Callable[[int], bool]:
    return lambda i: i not in taken


def _index(job: Waiting) -> int:
    assert job.array_index is not None, "a task of an array has its index"
    return job.array_index


@st.composite
def queues(draw: st.DrawFn) -> list[Waiting]:
    """Pending jobs, some tasks of arrays 100 and 200 (each with its own throttle), each waiting
    for some of the references."""
    throttles = {100: draw(st.integers(0, 3)), 200: draw(st.integers(1, 2))}
    used: dict[int, set[int]] = {100: set(), 200: set()}
    jobs = []
    for job_id in range(1, draw(st.integers(0, 14)) + 1):
        array = draw(st.sampled_from([None, 100, 200]))
        index = None
        if array is not None:
            index = draw(st.integers(0, 30).filter(_not_in(used[array])))
            used[array].add(index)
        jobs.append(Waiting(job_id, draw(refs), draw(refs), array, index, throttles[array] if array else 0))
    return jobs


def _succeeded(upstream: Upstream | None) -> bool:
    return upstream is not None and set(upstream.states) == {"succeeded"}


def _ended(upstream: Upstream | None) -> bool:
    return upstream is None or set(upstream.states) <= {"succeeded", "failed", "cancelled"}


@settings(max_examples=400, deadline=None)
@given(queues(), upstreams, st.fixed_dictionaries({100: st.integers(0, 3), 200: st.integers(0, 2)}))
def test_every_job_is_offered_told_why_it_waits_or_failed_and_never_before_its_time(
        pending: list[Waiting], upstream: dict[str, Upstream], running: dict[int, int]):
    verdict = gate(pending, upstream, running)
    offered = set(verdict.offered)
    assert len(offered) == len(verdict.offered), "each job offered once"
    for job in pending:
        assert [job.job_id in offered, job.job_id in verdict.reasons, job.job_id in verdict.failed].count(True) == 1
        after = [upstream.get(ref) for ref in job.after]
        doomed = any(u is None or {"failed", "cancelled"} & set(u.states) for u in after)
        assert (job.job_id in verdict.failed) == doomed, job
        if job.job_id in offered:
            assert all(map(_succeeded, after)), "never before all its --after jobs succeeded"
            assert all(_ended(upstream.get(ref)) for ref in job.after_any), "never before its --after-any ended"


@settings(max_examples=400, deadline=None)
@given(queues(), upstreams, st.fixed_dictionaries({100: st.integers(0, 3), 200: st.integers(0, 2)}))
def test_an_array_never_passes_its_throttle_and_advances_by_index(
        pending: list[Waiting], upstream: dict[str, Upstream], running: dict[int, int]):
    verdict = gate(pending, upstream, running)
    by_id = {job.job_id: job for job in pending}
    for array in (100, 200):
        offered = [by_id[job_id] for job_id in verdict.offered if by_id[job_id].array_job == array]
        indices = [_index(task) for task in offered]
        assert indices == sorted(indices), "an array's tasks are offered in index order"
        ready = sorted(_index(job) for job in pending if job.array_job == array
                       and job.job_id in set(verdict.offered) | {j for j, r in verdict.reasons.items()
                                                                  if r.startswith("waits its turn")})
        throttle = next((job.throttle for job in pending if job.array_job == array), 0)
        room = len(ready) if not throttle else max(0, throttle - running[array])
        assert indices == ready[:room], "as many as its throttle allows, the lowest indices first"
        if throttle:
            assert len(offered) + running[array] <= max(throttle, running[array]), "throttle never exceeded"


# --- arrays and references ---------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 500), st.integers(0, 40)), min_size=1, max_size=6),
       st.integers(0, 9))
def test_an_array_reads_back_as_the_indices_it_names(ranges: list[tuple[int, int]], throttle: int):
    text = ",".join(str(first) if not extra else f"{first}-{first + extra}" for first, extra in ranges)
    text += f"%{throttle}" if throttle else ""
    parsed = parse_array(text)
    assert parsed.indices == tuple(sorted({i for first, extra in ranges for i in range(first, first + extra + 1)}))
    assert parsed.throttle == throttle
    assert parse_array(compress(parsed.indices)).indices == parsed.indices


@pytest.mark.parametrize("text, problem", [
    ("5-2", "the range 5-2 goes down: write 2-5"),
    ("0-99999", f"0-99999 is 100000 tasks; an array has at most {MAX_ARRAY_TASKS}"),
    ("0-999999999999999999999", "array indices go from 0 to 1000000, and 999999999999999999999 is above that"),
    ("0-3%0", "after % comes how many tasks may run at once, a whole number of at least 1, not '0'"),
    ("0-3,x", "'x' is not an index or a range of indices"),
])
def test_a_wrong_array_is_one_sentence_saying_what_is_wrong(text: str, problem: str):
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_array(text)


def test_references_and_labels():
    assert parse_ref("12") == (12, None) and parse_ref("12.3") == (12, 3)
    assert job_label(15, 12, 3) == "12.3" and job_label(7, None, None) == "7"
    for bad in ("0", "12.", "a", "12.3.4"):
        with pytest.raises(ValueError):
            parse_ref(bad)


def test_an_array_that_would_cost_the_coordinator_too_much_memory_is_refused():
    env = {f"V{i}": "x" * 250 for i in range(1000)}  # 250 KB, under --env's own limit
    JobSpec(name="a", gpus=1, run=RunSpec(workload="pipeline", env=env), array="0-9").check()
    with pytest.raises(ValueError, match=r"^an array of 1000 tasks of this job would keep \d+ MiB in the "):
        JobSpec(name="a", gpus=1, run=RunSpec(workload="pipeline", env=env), array="0-999").check()
