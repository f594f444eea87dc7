"""The built-in workloads through the cluster: `gpudeck submit --workload W --nodes 2 --gpus-per-node 1`
on a coordinator and two agents with simulated GPUs, exactly as a user checks a new cluster."""

from __future__ import annotations

import re

import pytest

from gpudeck.train.workloads import task
from gpudeck.train.workloads.checkpoint import KEPT_REPORTED
from tests.cluster import Cluster

pytestmark = pytest.mark.slow

DEFAULTS = task.Config()  # the workloads' defaults: 300 steps of 64 points, float32
STEPS = 300
PARAM_BYTES = task.parameter_count(DEFAULTS) * 4
ACTIVATION_BYTES = DEFAULTS.batch_size * DEFAULTS.hidden * 4  # one step across one stage boundary
AGREEMENT = KEPT_REPORTED * 8

# workload -> (rank that prints the loss, job-wide traffic by kind for 2 ranks)
EXPECTED = {
    "data-parallel": (0, {"all_reduce": 2 * STEPS * PARAM_BYTES, "broadcast": 2 * PARAM_BYTES,
                          "all_gather": 2 * AGREEMENT}),
    "parameter-server": (0, {"send": 2 * STEPS * PARAM_BYTES, "recv": 2 * STEPS * PARAM_BYTES,
                             "all_gather": 2 * AGREEMENT}),
    "pipeline": (1, {"send": 2 * STEPS * ACTIVATION_BYTES, "recv": 2 * STEPS * ACTIVATION_BYTES,
                     "all_gather": 2 * 2 * AGREEMENT}),
}


def test_each_workload_succeeds_on_two_nodes_with_falling_loss_and_exact_traffic(cluster: Cluster):
    jobs = {name: cluster.submit("--nodes", "2", "--gpus-per-node", "1", "--workload", name) for name in EXPECTED}
    for name, job_id in jobs.items():
        job = cluster.wait_job(job_id, ("succeeded", "failed", "cancelled"), timeout=150)
        logs = cluster.cli("logs", str(job_id)).stdout
        assert job["state"] == "succeeded", (job, logs[-3000:])
        assert sorted(job["nodes"]) == ["node-a", "node-b"]
        rank, traffic = EXPECTED[name]
        assert job["traffic"]["by_kind"] == traffic, name
        found = {int(step): float(loss) for step, loss in
                 re.findall(rf"\[rank {rank}\] rank {rank} step (\d+) (?:eval )?loss ([0-9.]+)", logs)}
        assert min(found) == 0 and max(found) == STEPS - 1, (name, found)
        assert found[STEPS - 1] < 0.6 * found[0], (name, found)
        checkpoints = [path.name for node in ("node-a", "node-b")
                       for path in (cluster.root / node / "checkpoints" / str(job_id)).glob("*.pt")]
        assert any(f"-{STEPS:08d}.pt" in path for path in checkpoints), (name, checkpoints)
