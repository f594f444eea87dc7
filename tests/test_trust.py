"""What the cluster records is what happened: a job's exit code is its failing rank's, its traffic
totals survive agent and coordinator restarts, and two clusters on one machine never touch each
other's ranks. Real coordinators, agents and torchrun jobs on loopback."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.cluster import Cluster, wait_until
from tests.conftest import SCRIPTS, _start

pytestmark = pytest.mark.slow
SLOW_DDP_GRAD_BYTES = (16 * 4 + 4) * 4  # slow_ddp.py's Linear(16, 4), float32


def _two_node(cluster: Cluster, *args: str) -> int:
    return cluster.submit("--nodes", "2", "--gpus-per-node", "1", str(SCRIPTS / "slow_ddp.py"), *args)


def test_the_exit_code_is_the_failing_ranks_own_and_the_reason_names_it(cluster: Cluster):
    job_id = _two_node(cluster, "--steps", "50", "--sleep", "0.05", "--fail-at", "3", "--fail-rank", "1")
    job = cluster.wait_job(job_id, ("succeeded", "failed"))
    assert job["state"] == "failed" and job["exit_code"] == 3, job
    node = job["nodes"][1]
    assert job["reason"].startswith(f"rank 1 on {node} failed first: it exited with code 3"), job["reason"]


def test_a_rank_killed_by_a_signal_is_named_with_the_signal(cluster: Cluster):
    job_id = cluster.submit("--gpus", "2", str(SCRIPTS / "slow_ddp.py"), "--steps", "50", "--sleep", "0.05",
                            "--fail-at", "2", "--fail-rank", "0", "--fail-signal", str(int(signal.SIGKILL)))
    job = cluster.wait_job(job_id, ("succeeded", "failed"))
    assert job["state"] == "failed" and job["exit_code"] == 128 + signal.SIGKILL, job
    assert "rank 0 on" in job["reason"] and "killed by SIGKILL" in job["reason"], job["reason"]


def _exit_recorded(cluster: Cluster, node: str, job_id: int) -> bool:
    return (cluster.root / node / "jobs" / f"{job_id}-1" / "exit.json").exists()


def test_a_failure_while_the_coordinator_is_down_is_recorded_with_its_code(cluster: Cluster):
    job_id = cluster.submit("--gpus", "1", str(SCRIPTS / "slow_ddp.py"), "--steps", "1000", "--sleep", "0.05",
                            "--fail-at", "60")
    node = cluster.wait_job(job_id, ("running",))["nodes"][0]
    cluster.kill("coordinator", signal.SIGKILL)
    wait_until(lambda: _exit_recorded(cluster, node, job_id), 60, "the rank to fail while the coordinator is down")
    cluster.start_coordinator()
    job = cluster.wait_job(job_id, ("succeeded", "failed"))
    assert job["exit_code"] == 3 and f"rank 0 on {node} failed first" in job["reason"], job


@pytest.mark.parametrize("restarted", [("agent",), ("coordinator",), ("agent", "coordinator")],
                         ids=lambda r: "+".join(r))
def test_traffic_totals_are_exact_across_restarts(cluster: Cluster, restarted: tuple[str, ...]):
    steps = 60
    job_id = _two_node(cluster, "--steps", str(steps), "--sleep", "0.1")
    cluster.wait_job(job_id, ("running",))
    wait_until(lambda: cluster.job(job_id)["traffic"]["by_kind"].get("all_reduce"), 30, "the first traffic report")
    if "coordinator" in restarted:
        cluster.kill("coordinator", signal.SIGKILL)
    if "agent" in restarted:
        cluster.kill("node-b", signal.SIGTERM)  # an agent that stops leaves its ranks running
        cluster.start_agent("node-b")
    if "coordinator" in restarted:
        cluster.start_coordinator()
    job = cluster.wait_job(job_id, ("succeeded", "failed", "cancelled"), timeout=120)
    assert job["state"] == "succeeded" and job["attempt"] == 1, job
    by_rank = {rank: kinds["all_reduce"] for rank, kinds in job["traffic"]["by_rank"].items()}
    assert by_rank == {"0": steps * SLOW_DDP_GRAD_BYTES, "1": steps * SLOW_DDP_GRAD_BYTES}


def test_two_clusters_on_one_machine_never_touch_each_others_ranks(cluster: Cluster, tmp_path: Path):
    (tmp_path / "other").mkdir()
    other = _start(tmp_path / "other", ("node-a",))
    try:
        ours = cluster.submit("--nodes", "1", "--gpus-per-node", "1", str(SCRIPTS / "slow_ddp.py"), "--steps", "100000")
        theirs = other.submit("--gpus", "1", str(SCRIPTS / "slow_ddp.py"), "--steps", "100000")
        assert ours == theirs == 1, "both clusters have a job 1"
        node = cluster.wait_job(ours, ("running",))["nodes"][0]
        other.wait_job(theirs, ("running",))
        wait_until(lambda: other.job_pids("node-a", theirs), 30, "the other cluster's ranks")
        if node == "node-a":
            assert set(cluster.job_pids("node-a", ours)).isdisjoint(other.job_pids("node-a", theirs))
        cluster.cli("cancel", str(ours))
        cluster.wait_job(ours, ("cancelled",))
        wait_until(lambda: not cluster.job_pids(node, ours), 20, "our ranks to stop")
        assert other.job(theirs)["state"] == "running" and other.job_pids("node-a", theirs)
    finally:
        other.stop()


def test_a_lost_nodes_gpus_wait_until_it_confirms_its_ranks_are_gone(cluster: Cluster):
    """A node declared down may only have been unreachable: its GPUs go to no other job until its
    agent says the given-up ranks ended. The stale job's processes stay stopped after node-b's agent is
    back, so they live on until its kill grace runs out; no job may be placed on their GPUs meanwhile."""
    cluster.cli("drain", "node-a")
    first = cluster.submit("--gpus", "2", str(SCRIPTS / "slow_ddp.py"), "--steps", "100000")
    assert cluster.wait_job(first, ("running",))["nodes"] == ["node-b"]
    cluster.cli("drain", "node-a", "--off")
    second = cluster.submit("--gpus", "4", str(SCRIPTS / "slow_ddp.py"), "--steps", "100000")
    wait_until(lambda: _alive(cluster, "node-b", first) >= 4, 20, "node-b's ranks")
    agent = cluster.procs["node-b"].pid
    frozen = [agent, *cluster.job_pids("node-b", first)]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: cluster.job(first)["state"] == "failed", 30, "the job to fail with node-b lost")
        os.kill(agent, signal.SIGCONT)  # the agent is back; its stale job stays stuck until it kills it
        cluster.wait_job(second, ("starting", "running"), timeout=60)
        assert not _alive(cluster, "node-b", first), "the second job was placed while node-b still ran the first"
    finally:
        for pid in frozen:
            _continue(pid)
    cluster.cli("cancel", str(second))


def _continue(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def _alive(cluster: Cluster, node: str, job_id: int) -> int:
    return len(cluster.job_pids(node, job_id))
