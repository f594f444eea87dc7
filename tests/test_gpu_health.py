"""GPU health end to end: a simulated agent reports injected faults (gpudeck.agent.health), the real
coordinator cordons that one GPU, keeps it cordoned across a restart, places jobs around it, and an
admin's `gpudeck gpu uncordon` offers it again; `gpudeck nodes --foreign` finds an outside process."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.cluster import Cluster, free_port, wait_until
from tests.test_metrics import scrape, value


@pytest.fixture
def one_node(tmp_path: Path) -> Iterator[tuple[Cluster, int]]:
    """A coordinator serving metrics (on the port given with it) and one agent with 2 simulated GPUs."""
    cluster, metrics = Cluster(tmp_path), free_port()
    cluster.start_coordinator("--metrics", str(metrics))
    cluster.start_agent("node-a", 2)
    cluster.wait_nodes("up", 1)
    yield cluster, metrics
    cluster.stop()


def inject(cluster: Cluster, *lines: str) -> None:
    (cluster.root / "node-a" / "simulated-gpus").write_text("".join(f"{line}\n" for line in lines))


def cordons(cluster: Cluster) -> dict[int, str]:
    return {c["gpu"]: c["cause"] for c in cluster.nodes()[0].get("cordoned", [])}


def wait_cordons(cluster: Cluster, what: str, check: Any) -> dict[int, str]:
    def reached() -> dict[int, str] | None:
        found = cordons(cluster)
        return found if check(found) else None

    return wait_until(reached, 30, what)


def sleeper(cluster: Cluster) -> int:
    return cluster.submit("--gpus", "1", "--no-project", "--", "sleep", "600")


def test_a_faulty_gpu_is_cordoned_alone_jobs_go_around_it_and_an_admin_uncordons_it(one_node):
    cluster, metrics = one_node
    inject(cluster, "0 xid 79")
    found = wait_cordons(cluster, "GPU 0 cordoned", lambda c: 0 in c)
    assert found[0].startswith("Xid 79 at ") and "fallen off the bus" in found[0] and 1 not in found
    assert "GPU 0 is cordoned (no new jobs) since" in cluster.cli("nodes").stdout
    _, samples = scrape(metrics)
    assert value(samples, "gpudeck_gpus", state="cordoned") == 1 and value(samples, "gpudeck_gpus", state="free") == 1
    assert value(samples, "gpudeck_gpu_cordoned", gpu="0") == 1 and value(samples, "gpudeck_gpu_cordoned", gpu="1") == 0

    first = sleeper(cluster)
    assert cluster.wait_job(first, ("running",))["placement"][0]["gpus"] == [1]
    second = sleeper(cluster)
    waiting = wait_until(lambda: cluster.job(second)["reason"] and cluster.job(second), 30, "the second job's reason")
    assert waiting["state"] == "pending" and "1 GPU is cordoned for a fault" in waiting["reason"], waiting

    bob = cluster.cli("user", "add", "bob").stdout.strip().splitlines()[-1]
    refused = cluster.cli("gpu", "uncordon", "node-a:0", check=False, token=bob)
    assert refused.returncode == 1 and "only an admin may cordon or uncordon GPUs" in refused.stderr
    assert cluster.cli("gpu", "uncordon", "node-a:0").stdout.strip() == "GPU 0 of node node-a is offered to jobs again"
    assert cluster.wait_job(second, ("running",))["placement"][0]["gpus"] == [0]
    assert cordons(cluster) == {}  # the Xid it showed was acknowledged: not cordoned again for it

    inject(cluster, "0 xid 79", "0 ecc 2")  # a new fault on the GPU a job now runs on
    found = wait_cordons(cluster, "GPU 0 cordoned again", lambda c: 0 in c)
    assert found[0] == "2 uncorrected ECC errors since the driver loaded"
    assert cluster.job(second)["state"] == "running"  # left to finish or fail by itself

    cluster.kill("coordinator")
    cluster.start_coordinator("--metrics", str(metrics))
    cluster.wait_nodes("up", 1)
    assert cordons(cluster) == found


def test_cordon_by_hand_and_refusals_say_what_is_wrong(one_node):
    cluster, _ = one_node
    done = cluster.cli("gpu", "cordon", "node-a:1", "--reason", "fans are loud", "--json")
    assert [c["cause"] for c in json.loads(done.stdout)["cordoned"]] == ["cordoned by hand: fans are loud"]
    again = cluster.cli("gpu", "cordon", "node-a:1", check=False)
    assert again.returncode == 1 and "GPU 1 of node node-a is already cordoned: cordoned by hand" in again.stderr
    for args, sentence in ((["uncordon", "node-a:0"], "GPU 0 of node node-a is not cordoned"),
                           (["cordon", "node-a:7"], "node node-a has no GPU 7 (it has GPUs 0 to 1)"),
                           (["uncordon", "nowhere:0"], "there is no node nowhere")):
        result = cluster.cli("gpu", *args, check=False)
        assert result.returncode == 1 and sentence in result.stderr and "Traceback" not in result.stderr, result
    usage = cluster.cli("gpu", "uncordon", "node-a", check=False)
    assert usage.returncode == 2 and "is not NODE:INDEX" in usage.stderr
    cluster.cli("gpu", "uncordon", "node-a:1")
    assert cordons(cluster) == {}


def test_nodes_foreign_lists_an_outside_process_with_how_long_it_has_held_the_gpu(one_node):
    cluster, metrics = one_node
    assert cluster.cli("nodes", "--foreign").stdout.strip() == "no process outside gpudeck holds a GPU"
    outside = subprocess.Popen(["sleep", "600"])
    try:
        inject(cluster, f"1 process {outside.pid}")
        held = wait_until(lambda: json.loads(cluster.cli("nodes", "--foreign", "--json").stdout), 30,
                          "the outside process listed")
        assert [(p["node"], p["gpu"], p["pid"], p["name"]) for p in held] == [("node-a", 1, outside.pid, "sleep")]
        assert held[0]["since"] is not None and held[0]["memory_used"] > 0
        text = cluster.cli("nodes", "--foreign").stdout
        assert f"node-a  1    {outside.pid}" in text and "HELD FOR" in text
        _, samples = scrape(metrics)
        assert value(samples, "gpudeck_gpu_foreign_processes", gpu="1") == 1
        assert value(samples, "gpudeck_gpus", state="foreign") == 1
        job = sleeper(cluster)  # the GPU an outside process holds is not offered
        assert cluster.wait_job(job, ("running",))["placement"][0]["gpus"] == [0]
    finally:
        outside.kill()
        outside.wait()
