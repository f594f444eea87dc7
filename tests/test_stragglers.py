"""Stragglers and hangs of a real gloo DDP job on two agents: the job detail names the rank the
other waits for, and a rank that stops flags the job hung (only cancelled with --hang-timeout)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.cluster import Cluster, wait_until
from tests.conftest import SCRIPTS

pytestmark = pytest.mark.slow


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path)
    cluster.start_coordinator("--hang-after", "3s")
    for name in ("node-a", "node-b"):
        cluster.start_agent(name, 1)
    cluster.wait_nodes("up", 2)
    yield cluster
    cluster.stop()


def submit_ddp(cluster: Cluster, *extra: str) -> int:
    return cluster.submit("--nodes", "2", "--gpus-per-node", "1", "--no-project", *extra, str(SCRIPTS / "slow_ddp.py"),
                          "--steps", "100000", "--sleep", "0.05", "--slow-rank", "1", "--slow-sleep", "0.2",
                          "--hang-at", "60")


def progress_of(cluster: Cluster, job: int, key: str) -> dict[str, Any] | None:
    progress = cluster.job(job).get("progress") or {}
    return progress if progress.get(key) else None


def test_the_straggler_is_named_and_a_stopped_rank_flags_the_job_hung_but_leaves_it_running(two_nodes: Cluster):
    cluster = two_nodes
    job = submit_ddp(cluster)
    rank_1 = cluster.wait_job(job, ("running",))["placement"][1]["node"]
    progress = wait_until(lambda: progress_of(cluster, job, "straggler"), 120, "a straggler named", interval=1)
    assert (progress["straggler"].startswith(f"rank 1 on {rank_1} is ")
            and "slower than the median" in progress["straggler"])
    assert set(progress["wait"]) == {"0", "1"} and any(cell for cell in progress["wait"]["0"])
    detail = cluster.cli("show", str(job)).stdout
    assert f"straggler rank 1 on {rank_1}" in detail and "rank 0 |" in detail

    hung = wait_until(lambda: progress_of(cluster, job, "hung"), 120, "the job flagged hung", interval=1)["hung"]
    assert (hung["rank"], hung["node"]) == (1, rank_1) and "stopped first (outside any collective" in hung["sentence"]
    assert cluster.job(job)["state"] == "running"
    assert "running HUNG" in cluster.cli("jobs").stdout
    cluster.cli("cancel", str(job))


def test_with_a_hang_timeout_a_hung_job_is_cancelled_with_the_reason(two_nodes: Cluster):
    cluster = two_nodes
    job = submit_ddp(cluster, "--hang-timeout", "4s")
    ended = cluster.wait_job(job, ("cancelled", "failed", "succeeded"), timeout=180)
    assert ended["state"] == "cancelled", ended
    assert ended["reason"].startswith("hung for ") and "past its --hang-timeout" in ended["reason"], ended
    assert "rank 1 on" in ended["reason"]
