"""Accounting and idle jobs through real processes: a coordinator and agents with simulated GPUs on
loopback, driven by the command line a user types."""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.cluster import Cluster, wait_until

pytestmark = pytest.mark.slow


def held_seconds(job: dict[str, Any], since: float | None = None) -> float:
    """What a finished job held, from `show --json`: its GPUs times how long, from `since` on."""
    start = job["started_at"] if since is None else max(job["started_at"], since)
    return job["gpus"] * max(0.0, job["ended_at"] - start)


def test_usage_is_the_gpu_seconds_the_jobs_held(cluster: Cluster):
    one = cluster.submit("--name", "one", "--gpus", "1", "--no-project", "--", "sleep", "3")
    two = cluster.submit("--name", "two", "--gpus", "2", "--no-project", "--", "sleep", "4")
    jobs = [cluster.wait_job(job_id, ("succeeded", "failed", "cancelled")) for job_id in (one, two)]
    assert [job["state"] for job in jobs] == ["succeeded", "succeeded"], jobs

    usage = cluster.json("usage")
    assert usage["gpu_seconds"] == math.fsum(held_seconds(job) for job in jobs)
    assert usage["gpu_hours"] == usage["gpu_seconds"] / 3600 and usage["jobs"] == 2
    by_job = {job["id"]: job for job in usage["by_job"]}
    assert {job_id: by_job[job_id]["gpu_seconds"] for job_id in (one, two)} == {
        job["id"]: held_seconds(job) for job in jobs}
    assert usage["mean_wait_s"] == math.fsum(job["started_at"] - job["submitted_at"] for job in jobs) / 2
    (admin,) = usage["users"]
    assert (admin["user"], admin["jobs"], admin["share"]) == ("admin", 2, 1.0)
    assert usage["energy_simulated"] and usage["energy_j"] > 0, "simulated GPUs count simulated energy"

    cut = jobs[1]["started_at"] + 1.5
    since = datetime.datetime.fromtimestamp(cut, datetime.timezone.utc).isoformat()
    later = cluster.json("usage", "--since", since)
    assert later["gpu_seconds"] == math.fsum(held_seconds(job, later["since"]) for job in jobs)

    text = cluster.cli("usage").stdout
    assert "GPU-hours in 2 jobs ever" in text and "SIM" in text and "admin" in text, text
    assert cluster.json("usage", "--user", "nobody")["jobs"] == 0


@pytest.fixture
def idle_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A coordinator that marks jobs idle after 3 s, and one agent with 2 simulated GPUs."""
    cluster = Cluster(tmp_path)
    cluster.start_coordinator("--idle-after", "3s")
    cluster.start_agent("node-a")
    cluster.wait_nodes("up", 1)
    yield cluster
    cluster.stop()


def test_an_idle_job_is_flagged_and_with_idle_cancel_cancelled_with_the_reason(idle_cluster: Cluster):
    cluster = idle_cluster
    job_id = cluster.submit("--name", "napper", "--gpus", "2", "--no-project", "--", "sleep", "600")
    cluster.wait_job(job_id, ("running",))
    flagged = wait_until(lambda: (job := cluster.job(job_id))["idle_since"] is not None and job, 60,
                         "the job to be marked idle")
    assert flagged["state"] == "running" and flagged["idle_since"] >= flagged["started_at"]
    row = next(line for line in cluster.cli("jobs").stdout.splitlines() if "napper" in line)
    assert "idle" in row and "its GPUs are at 0 %" in row, row
    assert "GPUs are at 0 %" in cluster.cli("show", str(job_id)).stdout

    cluster.kill("coordinator")
    cluster.start_coordinator("--idle-after", "3s", "--idle-cancel")
    cancelled = cluster.wait_job(job_id, ("cancelled", "failed", "succeeded"), timeout=60)
    assert cancelled["state"] == "cancelled", cancelled
    assert cancelled["reason"].startswith("its GPUs were idle for ") and cancelled["reason"].endswith(" s"), cancelled
    wait_until(lambda: not cluster.job_pids("node-a", job_id), 20, "the job's processes to stop")
    jobs = json.loads(cluster.cli("jobs", "--json").stdout)
    assert [job["state"] for job in jobs] == ["cancelled"]
