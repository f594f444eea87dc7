"""Dependencies (--after, --after-any) and arrays (--array) end to end: a real coordinator and agents
with simulated GPUs on loopback, driven through the command line. Orders are checked from the
coordinator's states and timestamps, never from how long something took."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import Cluster, wait_until
from tests.conftest import SCRIPTS

pytestmark = pytest.mark.slow
TASK = str(SCRIPTS / "array_task.py")
ENDED = ("succeeded", "failed", "cancelled")


def _jobs(cluster: Cluster) -> list[dict[str, Any]]:
    return cluster.json("jobs")


def test_an_after_chain_runs_in_order_and_waits_saying_for_what(cluster: Cluster, tmp_path: Path):
    release = tmp_path / "release"
    release.mkdir()
    first = cluster.submit("--gpus", "1", TASK, "--until-dir", str(release))
    second = cluster.submit("--gpus", "1", "--after", str(first), TASK)
    third = cluster.submit("--gpus", "1", "--after", str(second), "--after-any", str(first), TASK)
    cluster.wait_job(first, ("running",))
    waiting = cluster.job(second)
    assert waiting["state"] == "pending" and waiting["reason"] == f"waits for job {first} to succeed", waiting
    assert waiting["after"] == [str(first)] and waiting["estimated_start"] is None
    assert cluster.job(third)["reason"] == f"waits for job {second} to succeed and for job {first} to end"
    (release / "none").touch()
    done = [cluster.wait_job(job_id, ENDED) for job_id in (first, second, third)]
    assert [job["state"] for job in done] == ["succeeded"] * 3, done
    assert done[0]["ended_at"] <= done[1]["started_at"] and done[1]["ended_at"] <= done[2]["started_at"], done


def test_a_failed_or_cancelled_dependency_fails_its_dependants_with_the_reason(cluster: Cluster):
    failing = cluster.submit("--gpus", "1", TASK, "--exit-code", "3")
    dependant = cluster.submit("--gpus", "1", "--after", str(failing), TASK)
    next_in_chain = cluster.submit("--gpus", "1", "--after", str(dependant), TASK)
    cleanup = cluster.submit("--gpus", "1", "--after-any", str(failing), TASK)
    assert cluster.wait_job(failing, ENDED)["state"] == "failed"
    job = cluster.wait_job(dependant, ENDED)
    assert job["state"] == "failed" and job["reason"] == (f"job {failing} failed, and this job was to run after it "
                                                          "succeeded"), job
    assert cluster.wait_job(next_in_chain, ENDED)["reason"] == (f"job {dependant} failed, and this job was to run "
                                                                "after it succeeded")
    assert cluster.wait_job(cleanup, ENDED)["state"] == "succeeded"
    for node in ("node-a", "node-b"):
        cluster.cli("drain", node)
    held = cluster.submit("--gpus", "1", TASK)
    waits = cluster.submit("--gpus", "1", "--after", str(held), TASK)
    cluster.cli("cancel", str(held))
    assert cluster.wait_job(waits, ENDED, timeout=20)["reason"] == (f"job {held} was cancelled, and this job was to "
                                                                   "run after it succeeded")


def test_an_array_runs_at_most_its_throttle_in_index_order_each_task_with_its_index(cluster: Cluster,
                                                                                     tmp_path: Path):
    release = tmp_path / "release"
    release.mkdir()
    array = cluster.submit_json("--gpus", "1", "--array", "0-5%2", TASK, "--until-dir", str(release))
    array_id = array["id"]
    assert (array["array_job"], array["array_index"], array["array"]) == (array_id, 0, "0-5%2"), array
    started: list[int] = []

    def advanced() -> bool:
        tasks = [job for job in _jobs(cluster) if job["array_job"] == array_id]
        assert sorted(job["array_index"] for job in tasks) == list(range(6))
        active = sorted(job["array_index"] for job in tasks if job["state"] in ("starting", "running"))
        assert len(active) <= 2, tasks  # 4 GPUs are free: only the throttle keeps the others waiting
        started.extend(index for index in active if index not in started)
        for job in tasks:
            if job["state"] == "running":
                (release / str(job["array_index"])).touch()  # each task ends only once it was seen running
        return all(job["state"] == "succeeded" for job in tasks)

    wait_until(advanced, 120, "every task to succeed")
    assert started == list(range(6)), "tasks start lowest index first"
    assert cluster.cli("logs", f"{array_id}.3").stdout == f"[rank 0] rank 0 is task 3 of array {array_id}\n"
    shown = cluster.cli("show", f"{array_id}.3").stdout
    assert shown.startswith(f"job {array_id}.3 array_task: succeeded"), shown
    assert f"task 3 of array {array_id} (--array 0-5%2)" in shown, shown


def test_cancel_of_an_array_cancels_every_task_and_of_a_task_only_it(cluster: Cluster):
    array_id = cluster.submit("--gpus", "1", "--array", "0,2,4-7", TASK, "--until-dir", "/nonexistent")
    wait_until(lambda: sum(job["state"] == "running" for job in _jobs(cluster)) == 4, 60, "4 tasks running")
    listed = cluster.cli("jobs").stdout
    assert f"{array_id}.[6-7]" in listed and f"{array_id}.4 " in listed, listed
    one = cluster.cli("cancel", f"{array_id}.7")
    assert one.stdout == f"job {array_id}.7 cancelled\n", one
    assert [job["state"] for job in _jobs(cluster)].count("cancelled") == 1
    everything = cluster.cli("cancel", str(array_id))
    assert everything.stdout == f"array {array_id}: every task that had not ended is cancelled\n", everything
    assert {job["state"] for job in _jobs(cluster)} == {"cancelled"}
    wait_until(lambda: not any(cluster.job_pids(node, job["id"]) for node in ("node-a", "node-b")
                               for job in _jobs(cluster)), 30, "every task's ranks to stop")
    again = cluster.cli("cancel", str(array_id), check=False)
    assert again.returncode == 1 and again.stderr == (f"gpudeck: every task of array {array_id} has already ended; "
                                                      "nothing to cancel\n"), again.stderr


def test_dependencies_on_jobs_that_do_not_exist_are_refused_at_submit(cluster: Cluster):
    array_id = cluster.submit("--gpus", "1", "--array", "0-1", TASK)
    flags = ["--coordinator", f"127.0.0.1:{cluster.port}", "--token", cluster.token]
    for ref, named in (("999", "999"), (f"{array_id}.5", f"{array_id}.5"), (f"7,{array_id}", "7")):
        result = cluster.cli("submit", *flags, "--after", ref, TASK, check=False, client=False)
        assert (result.returncode, result.stderr) == (1, f"gpudeck: there is no job {named} to run after\n"), result
    assert cluster.cli("show", f"{array_id}.9", check=False).stderr == f"gpudeck: there is no job {array_id}.9\n"
    assert len(_jobs(cluster)) == 2


@pytest.mark.parametrize("array, said", [
    ("5-2", "gpudeck submit: error: argument --array: the range 5-2 goes down: write 2-5"),
    ("0-99999", "gpudeck submit: error: argument --array: 0-99999 is 100000 tasks; an array has at most 10000"),
])
def test_a_wrong_array_is_a_usage_error_of_one_sentence(tmp_path: Path, array: str, said: str):
    result = subprocess.run([sys.executable, "-m", "gpudeck", "submit", "--coordinator", "127.0.0.1:1", "--array",
                             array, "--workload", "pipeline"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "GPUDECK_HOME": str(tmp_path)}, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == said, result.stderr
