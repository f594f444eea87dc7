"""The idle tracker (coordinator.idle): examples, then properties against a plain model."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gpudeck.coordinator.idle import IdleTracker, held_utilizations
from gpudeck.coordinator.store import JobRow
from gpudeck.model import JobSpec, JobState, RunSpec
from gpudeck.protocol.payloads import GpuReading


def test_a_job_is_flagged_once_its_gpus_read_zero_for_long_enough_and_until_one_computes():
    tracker = IdleTracker(after=60)
    tracker.update({1: (1, [0, 37])}, now=0)
    tracker.update({1: (1, [0, 0])}, now=10)
    tracker.update({1: (1, [0, 0])}, now=69)
    assert tracker.idle_since(1) is None and tracker.overdue() == [] and tracker.take_changed() == set()
    tracker.update({1: (1, [0, 0])}, now=70)
    assert tracker.idle_since(1) == 10 and tracker.overdue() == [(1, 10)] and tracker.take_changed() == {1}
    tracker.update({1: (1, [0, 0])}, now=71)
    assert tracker.take_changed() == set(), "nothing changed for its view"
    tracker.update({1: (1, [0, 5])}, now=80)
    assert tracker.idle_since(1) is None and tracker.take_changed() == {1}


def test_a_missing_reading_neither_starts_nor_resets_the_clock():
    tracker = IdleTracker(after=0)
    tracker.update({1: (1, [0, None])}, now=0)
    assert tracker.idle_since(1) is None, "a GPU that says nothing is not known to be idle"
    tracker.update({1: (1, [0, 0])}, now=5)
    tracker.update({1: (1, [None, None])}, now=6)
    assert tracker.idle_since(1) == 5


def test_a_new_attempt_and_a_job_that_stopped_running_start_afresh():
    tracker = IdleTracker(after=0)
    tracker.update({1: (1, [0]), 2: (1, [0])}, now=0)
    tracker.update({1: (2, [0])}, now=30)
    assert tracker.idle_since(1) == 30 and tracker.idle_since(2) is None
    assert tracker.take_changed() == {1, 2}
    tracker.update({}, now=31)
    assert tracker.idle_since(1) is None and tracker.take_changed() == {1}


def test_only_the_gpus_a_job_holds_count():
    def gpu(index: int, utilization: int | None) -> GpuReading:
        return GpuReading(index=index, name="g", uuid=f"u{index}", memory_total=None, memory_used=None,
                          utilization=utilization, temperature=None, power=None, power_limit=None)

    spec = JobSpec(name="j", nodes=2, gpus_per_node=1, run=RunSpec(workload="w"))
    job = JobRow(id=4, spec=spec, state=JobState.RUNNING, reason="", submitted_at=0, started_at=1, ended_at=None,
                 attempt=3, exit_code=None, restarts=0, requeued_because="", failed_at=None,
                 hosts=[("a", [1]), ("b", [0])])
    readings = {"a": [gpu(0, 99), gpu(1, 0)], "b": None}
    assert held_utilizations([job], readings.get) == {4: (3, [0, None])}


# --- properties ----------------------------------------------------------------------------------

samples = st.lists(st.lists(st.one_of(st.none(), st.integers(0, 3)), min_size=1, max_size=3), max_size=30)


@given(samples, st.integers(0, 10))
def test_a_job_is_flagged_from_the_start_of_its_run_of_all_zero_readings(history, after):
    """Against a model: the run starts at the first all-zero sample since the last sample with a GPU
    above zero (samples with a missing reading change nothing); the job is flagged once the run has
    lasted `after`, and its view is due exactly when the flag changes."""
    tracker = IdleTracker(after=after)
    start, shown = None, None
    for now, utilizations in enumerate(history):
        tracker.update({1: (1, utilizations)}, now=now)
        if any(u for u in utilizations if u is not None):
            start = None
        elif start is None and all(u == 0 for u in utilizations):
            start = now
        flagged = start if start is not None and now - start >= after else None
        assert tracker.idle_since(1) == flagged
        assert tracker.overdue() == ([(1, flagged)] if flagged is not None else [])
        assert tracker.take_changed() == ({1} if flagged != shown else set())
        shown = flagged
