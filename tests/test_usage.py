"""Accounting (coordinator.usage): GPU time clipped to windows, waits, shares and energy, as pure
functions over held-GPU records, plus the energy meter over a real store file."""

from __future__ import annotations

import math
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from gpudeck.coordinator.store import HeldGpus, JobRow, Store
from gpudeck.coordinator.usage import EnergyMeter, usage_view
from gpudeck.model import JobSpec, JobState, RunSpec
from gpudeck.protocol.payloads import GpuReading, UsageView

NOW = 100_000.0


def row(job_id: int, owner: str, submitted_at: float, state: JobState = JobState.SUCCEEDED) -> JobRow:
    return JobRow(id=job_id, spec=JobSpec(name=f"job{job_id}", gpus=1, run=RunSpec(workload="w")), state=state,
                  reason="",
                  submitted_at=submitted_at, started_at=None, ended_at=None, attempt=1, exit_code=None, restarts=0,
                  requeued_because="", failed_at=None, hosts=[], owner=owner)


def example() -> tuple[list[HeldGpus], dict[int, JobRow]]:
    """ada's 2-GPU job from 1000 to 4600 s and its 2nd attempt (after a requeue) from 5000 to 5600;
    bob's 4-GPU job from 2000 s, still running."""
    held = [HeldGpus(1, 1, "ada", 2, 1000.0, 4600.0), HeldGpus(2, 1, "bob", 4, 2000.0, None),
            HeldGpus(1, 2, "ada", 2, 5000.0, 5600.0)]
    return held, {1: row(1, "ada", 400.0), 2: row(2, "bob", 1900.0, JobState.RUNNING)}


def test_gpu_time_waits_and_shares_per_user_and_job():
    held, jobs = example()
    view = usage_view(held, jobs, {}, None, now=6000.0)
    assert view.gpu_seconds == 2 * 3600 + 2 * 600 + 4 * 4000
    assert view.jobs == 2 and view.mean_wait_s == (600 + 100) / 2
    ada, bob = sorted(view.users, key=lambda u: u.user)
    assert (ada.gpu_seconds, ada.jobs, ada.mean_wait_s) == (8400.0, 1, 600.0)
    assert bob.gpu_seconds == 16000.0 and math.isclose(ada.share + bob.share, 1.0)
    assert [u.user for u in view.users] == ["bob", "ada"], "most GPU time first"
    job_1 = next(j for j in view.by_job if j.id == 1)
    assert (job_1.attempts, job_1.gpus, job_1.gpu_hours, job_1.name, job_1.state) == (2, 2, 8400 / 3600, "job1",
                                                                                       "succeeded")
    assert view.energy_j is None and not view.energy_simulated


def test_a_window_counts_only_its_part_and_a_first_start_before_it_is_no_wait():
    held, jobs = example()
    view = usage_view(held, jobs, {}, since=4000.0, now=6000.0)
    assert view.gpu_seconds == 2 * 600 + 2 * 600 + 4 * 2000
    assert view.mean_wait_s is None, "both jobs first started before the window"


def test_one_user_keeps_a_share_of_the_whole_cluster():
    held, jobs = example()
    view = usage_view(held, jobs, {}, None, now=6000.0, user="ada")
    assert [u.user for u in view.users] == ["ada"] and [j.id for j in view.by_job] == [1]
    assert view.gpu_seconds == 8400.0 and view.users[0].share == 8400.0 / 24400.0
    assert usage_view(held, jobs, {}, None, now=6000.0, user="carol").jobs == 0


def test_energy_of_an_attempt_partly_in_the_window_is_charged_in_proportion():
    held, jobs = example()
    energy = {(1, 1): (3_600_000, False), (2, 1): (8_000_000, True)}
    whole = usage_view(held, jobs, energy, None, now=6000.0)
    assert whole.energy_j == 3600 + 8000 and whole.energy_simulated
    later = usage_view(held, jobs, energy, since=3700.0, now=6000.0, user="ada")
    assert later.energy_j == 3600 * 900 / 3600 and not later.energy_simulated


def test_the_view_survives_json():
    held, jobs = example()
    view = usage_view(held, jobs, {(1, 1): (5, True)}, 10.0, now=6000.0)
    assert UsageView.from_json(view.to_json()) == view


# --- properties ----------------------------------------------------------------------------------

times = st.integers(min_value=0, max_value=10_000).map(float)


@st.composite
def histories(draw: st.DrawFn) -> list[HeldGpus]:
    """Attempts of a few jobs by a few owners, some still holding their GPUs (whole seconds, so sums are exact)."""
    held = []
    for job in range(1, draw(st.integers(min_value=0, max_value=12)) + 1):
        start = draw(times)
        length = draw(st.one_of(st.none(), st.integers(min_value=0, max_value=5_000).map(float)))
        held.append(HeldGpus(job, 1, draw(st.sampled_from(["ada", "bob", ""])), draw(st.integers(1, 8)), start,
                             None if length is None else start + length))
    return held


def jobs_of(held: list[HeldGpus]) -> dict[int, JobRow]:
    return {h.job: row(h.job, h.owner, max(0.0, h.started_at - 7)) for h in held}


@given(histories(), st.lists(times, min_size=3, max_size=3).map(sorted))
def test_the_gpu_time_of_a_split_window_adds_up_to_the_whole(held, cuts):
    first, middle, last = cuts
    now = last
    energy = {(h.job, 1): (h.gpus * 1000, False) for h in held if h.ended_at is not None}
    whole = usage_view(held, jobs_of(held), energy, first, now)
    before = usage_view(held, jobs_of(held), energy, first, now, until=middle)
    after = usage_view(held, jobs_of(held), energy, middle, now)
    assert before.gpu_seconds + after.gpu_seconds == whole.gpu_seconds
    for name in {"ada", "bob", ""}:
        def of(view: UsageView, name: str = name) -> float:
            return next((u.gpu_seconds for u in view.users if u.user == name), 0.0)
        assert of(before) + of(after) == of(whole)
    assert math.isclose((before.energy_j or 0) + (after.energy_j or 0), whole.energy_j or 0, abs_tol=1e-6)


@given(histories(), times)
def test_every_job_counts_what_its_gpus_held_and_shares_sum_to_one(held, since):
    view = usage_view(held, jobs_of(held), {}, since, NOW)
    expected = math.fsum(h.gpus * max(0.0, (NOW if h.ended_at is None else h.ended_at) - max(h.started_at, since))
                         for h in held)
    assert view.gpu_seconds == expected
    assert all(j.gpu_seconds >= 0 for j in view.by_job)
    if view.gpu_seconds > 0:
        assert math.isclose(sum(u.share for u in view.users), 1.0)
    assert sum(u.jobs for u in view.users) == view.jobs == len(view.by_job)


# --- the energy meter ----------------------------------------------------------------------------


def reading(index: int, energy_mj: int | None) -> GpuReading:
    return GpuReading(index=index, name="g", uuid=f"u{index}", memory_total=None, memory_used=None, utilization=None,
                      temperature=None, power=None, power_limit=None, energy_mj=energy_mj)


def test_the_meter_charges_held_gpus_only_and_keeps_what_it_wrote(tmp_path: Path):
    store = Store(tmp_path / "db")
    try:
        meter = EnergyMeter(store)
        held = {0: (7, 1), 1: (8, 1)}
        meter.record([reading(0, 1000), reading(1, 500), reading(2, 0)],
                     [reading(0, 4000), reading(1, 400), reading(2, 900)], held, simulated=True)
        assert meter.energy([7, 8]) == {(7, 1): (3000, True)}, "a counter that went back charges nothing"
        meter.persist(now=10.0)
        meter.record([reading(0, 4000), reading(1, 400)], [reading(0, 4500), reading(1, None)], held, simulated=False)
        assert meter.energy([7]) == {(7, 1): (3500, True)}, "written plus not yet written"
        meter.flush()
        assert store.energy([7, 8]) == {(7, 1): (3500, True)}
    finally:
        store.close()
