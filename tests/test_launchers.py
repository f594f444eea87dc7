"""The three ways a node starts a job's ranks keep every behaviour of a job: the agent starting each
rank cold (`python -m gpudeck.train.run`, what the rest of the suite runs), forked from a warm
interpreter (`gpudeck agent --warm 1`), and torchrun (`submit --torchrun`). Real coordinator,
agents, ranks and torch on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from gpudeck.agent.procs import pids_with_env
from gpudeck.protocol.auth import JoinToken
from tests.cluster import Cluster, wait_until
from tests.conftest import SCRIPTS

pytestmark = pytest.mark.slow
SLOW_DDP_GRAD_BYTES = (16 * 4 + 4) * 4  # slow_ddp.py's Linear(16, 4), float32
FRESH_TORCH_SEED = "import torch; print(torch.initial_seed())"


@dataclass
class Launched:
    """A cluster of two agents whose ranks start the way `how` says."""

    cluster: Cluster
    how: str  # "cold", "forked" or "torchrun"

    @property
    def agent_flags(self) -> list[str]:
        return ["--warm", "1"] if self.how == "forked" else []

    def submit(self, *args: str) -> int:
        return self.cluster.submit(*(["--torchrun"] if self.how == "torchrun" else []), *args)

    def start_agent(self, name: str) -> None:
        self.cluster.start_agent(name, 2, *self.agent_flags)
        if self.how == "forked":
            wait_warm(self.cluster, name)

    def record(self, node: str, job_id: int, attempt: int = 1) -> dict[str, Any]:
        return json.loads((self.cluster.root / node / "jobs" / f"{job_id}-{attempt}" / "job.json").read_text())

    def check_started_as_asked(self, node: str, job_id: int, attempt: int = 1) -> None:
        record = self.record(node, job_id, attempt)
        if self.how == "torchrun":
            assert record["ranks"] == [], "torchrun started the ranks, not the agent"
        else:
            assert record["ranks"] and record["forked"] == (len(record["ranks"]) if self.how == "forked" else 0), record


def wait_warm(cluster: Cluster, node: str) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        warm = next((n["warm"] for n in cluster.nodes() if n["name"] == node), None)
        return warm if warm and warm["ready"] else None

    return wait_until(ready, 120, f"{node}'s warm interpreter to be ready")


def _cluster(root: Path, how: str) -> Iterator[Launched]:
    launched = Launched(Cluster(root), how)
    launched.cluster.start_coordinator()
    try:
        for name in ("node-a", "node-b"):
            launched.cluster.start_agent(name, 2, *launched.agent_flags)
        launched.cluster.wait_nodes("up", 2)
        if how == "forked":
            for name in ("node-a", "node-b"):
                wait_warm(launched.cluster, name)
        yield launched
    finally:
        launched.cluster.stop()


@pytest.fixture(params=["forked", "torchrun"])
def launched(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Launched]:
    """The launchers the rest of the suite does not run (it runs the agent's cold start)."""
    yield from _cluster(tmp_path, request.param)


def _facts(cluster: Cluster, job_id: int) -> dict[int, dict[str, Any]]:
    lines = [line.split("FACTS ", 1)[1] for line in cluster.cli("logs", str(job_id)).stdout.splitlines()
             if "FACTS " in line]
    facts = [json.loads(line) for line in lines]
    return {int(f["rendezvous"]["RANK"]): f for f in facts}


def _comparable(rendezvous: dict[str, str], job_id: int) -> dict[str, str]:
    """A rank's rendezvous variables less what names its own job or launcher: the job's port and
    run id, the error file's path, whether a launcher hosts the store (there is none to host it when
    the agent starts the ranks) and which signals torchrun's own process handles."""
    same = {k: v for k, v in rendezvous.items()
            if k not in ("MASTER_PORT", "TORCHELASTIC_ERROR_FILE", "TORCHELASTIC_USE_AGENT_STORE",
                         "TORCHELASTIC_SIGNALS_TO_HANDLE")}
    assert same.pop("TORCHELASTIC_RUN_ID") == f"gpudeck-{job_id}-1"
    return same


def test_agent_started_ranks_get_torchruns_environment_and_forked_ones_start_clean(tmp_path: Path):
    for launched in _cluster(tmp_path, "forked"):
        cluster = launched.cluster
        fresh_seeds = {subprocess.run([sys.executable, "-c", FRESH_TORCH_SEED], capture_output=True, text=True,
                                      check=True).stdout for _ in range(2)}
        assert len(fresh_seeds) == 2, "a fresh interpreter seeds torch from the OS"
        facts = {}
        for how in ("torchrun", "forked"):
            job_id = Launched(cluster, how).submit("--nodes", "2", "--gpus-per-node", "2",
                                                   str(SCRIPTS / "rank_facts.py"), "--flag")
            job = cluster.wait_job(job_id, ("succeeded", "failed"))
            assert job["state"] == "succeeded", job
            for node in ("node-a", "node-b"):
                Launched(cluster, how).check_started_as_asked(node, job_id)
            facts[how] = _facts(cluster, job_id)
            assert sorted(facts[how]) == [0, 1, 2, 3]
            for rank in facts[how].values():
                assert rank["all_reduce"] == [4.0] * 4, "init_process_group('env://') joined all four ranks"
                rank["rendezvous"] = _comparable(rank["rendezvous"], job_id)
        for number in range(4):
            assert facts["forked"][number]["rendezvous"] == facts["torchrun"][number]["rendezvous"], number
            assert facts["forked"][number]["argv"][1:] == ["--flag"] and facts["forked"][number]["main"] == "__main__"
        forked = list(facts["forked"].values())
        assert len({rank["random"] for rank in forked}) == 4, "each forked rank seeds `random` afresh"
        assert len({rank["torch_seed"] for rank in forked}) == 4, "and torch's generator, as a fresh interpreter does"
        for rank in forked:
            assert rank["torch_loaded_before_first_line"], "forked from an interpreter that imported torch"
            assert not rank["cuda_initialized"]
            assert rank["os_threads"] == rank["python_threads"], "no thread of the warm interpreter survives the fork"
            assert rank["session_leader_is_parent"], "each rank runs in the session its recorder leads"
            assert rank["sigterm_default"] and rank["sigint_default"] and rank["sigchld_default"]
            assert rank["stdin_is_null"]
            assert rank["torch_threads"] == 1, "torchrun's OMP_NUM_THREADS=1 for 2 ranks a node reaches torch"


@pytest.mark.parametrize("shape", [["--gpus-per-node", "1"], ["--gpus-per-node", "2"],
                                   ["--gpus-per-node", "1", "--env", "OMP_NUM_THREADS=3"]],
                         ids=["one-rank-a-node", "two-ranks-a-node", "job-sets-omp"])
def test_a_default_agent_forks_ranks_whose_thread_pools_are_a_cold_ranks(tmp_path: Path, shape: list[str]):
    """With nothing in the environment but what a user's shell has (import torch then starts numpy's
    BLAS threads), a warm agent still forks its ranks, and a forked rank's pools and threads are those
    of the same job's rank started cold on the other node: the machine's default for one rank a node,
    torchrun's one thread for two, and the job's own OMP_NUM_THREADS."""
    cluster = Cluster(tmp_path)
    assert not {"OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"} & set(cluster.env)
    cluster.start_coordinator()
    try:
        cluster.start_agent("node-a", 2, "--warm", "1")
        cluster.start_agent("node-b", 2)
        cluster.wait_nodes("up", 2)
        wait_warm(cluster, "node-a")
        job_id = cluster.submit("--nodes", "2", *shape, str(SCRIPTS / "thread_facts.py"))
        assert cluster.wait_job(job_id, ("succeeded", "failed"))["state"] == "succeeded"
        record = json.loads((tmp_path / "node-a" / "jobs" / f"{job_id}-1" / "job.json").read_text())
        assert record["forked"] == len(record["ranks"]) > 0, "every rank on the warm node was forked"
        ranks = [json.loads(line.split("THREADS ", 1)[1])
                 for line in cluster.cli("logs", str(job_id)).stdout.splitlines() if "THREADS " in line]
        forked: list[dict[str, Any]] = []
        cold: list[dict[str, Any]] = []
        for rank in ranks:
            (forked if rank.pop("forked") else cold).append(rank)
        assert len(forked) == len(cold) == len(record["ranks"]), ranks
        assert forked == cold, "a forked rank has the pools and the threads of a cold one"
    finally:
        cluster.stop()


def test_a_cold_rank_gets_the_same_environment_and_runs_its_first_line_before_torch(cluster: Cluster):
    job_id = cluster.submit("--nodes", "2", "--gpus-per-node", "2", str(SCRIPTS / "rank_facts.py"))
    assert cluster.wait_job(job_id, ("succeeded", "failed"))["state"] == "succeeded"
    cold = _facts(cluster, job_id)
    reference = cluster.submit("--torchrun", "--nodes", "2", "--gpus-per-node", "2", str(SCRIPTS / "rank_facts.py"))
    assert cluster.wait_job(reference, ("succeeded", "failed"))["state"] == "succeeded"
    torchrun = _facts(cluster, reference)
    for rank in range(4):
        assert _comparable(cold[rank]["rendezvous"], job_id) == _comparable(torchrun[rank]["rendezvous"], reference)
        assert cold[rank]["rendezvous"]["OMP_NUM_THREADS"] == "1", ("one thread per rank unless the job says, "
                                                                    "as torchrun")
        assert not cold[rank]["torch_loaded_before_first_line"], "nothing imports torch before the script's first line"
        assert cold[rank]["session_leader_is_parent"] and cold[rank]["stdin_is_null"]
        assert cold[rank]["all_reduce"] == [4.0] * 4


def test_two_node_job_keeps_logs_per_rank_and_exact_traffic_across_an_agent_restart(launched: Launched):
    cluster, steps = launched.cluster, 30
    job_id = launched.submit("--nodes", "2", "--gpus-per-node", "1", str(SCRIPTS / "slow_ddp.py"),
                             "--steps", str(steps), "--sleep", "0.1")
    nodes = cluster.wait_job(job_id, ("running",))["nodes"]
    wait_until(lambda: cluster.job(job_id)["traffic"]["by_kind"].get("all_reduce"), 60, "the first traffic report")
    for node in nodes:
        launched.check_started_as_asked(node, job_id)
    cluster.kill("node-b", signal.SIGTERM)  # an agent that stops leaves its ranks running
    launched.start_agent("node-b")
    job = cluster.wait_job(job_id, ("succeeded", "failed", "cancelled"), timeout=120)
    assert job["state"] == "succeeded" and job["attempt"] == 1, job
    assert {r: k["all_reduce"] for r, k in job["traffic"]["by_rank"].items()} == {
        "0": steps * SLOW_DDP_GRAD_BYTES, "1": steps * SLOW_DDP_GRAD_BYTES}
    for rank in (0, 1):
        only = cluster.cli("logs", str(job_id), "--rank", str(rank)).stdout
        assert f"rank {rank} step 0 loss" in only and f"rank {rank} step {steps - 1} loss" in only
        assert f"rank {1 - rank} step" not in only


def test_cancel_stops_ranks_that_ignore_sigterm_and_frees_the_gpus(launched: Launched):
    cluster = launched.cluster
    job_id = launched.submit("--gpus", "2", str(SCRIPTS / "slow_ddp.py"), "--steps", "100000", "--ignore-sigterm")
    node = cluster.wait_job(job_id, ("running",))["nodes"][0]
    wait_until(lambda: "rank 1 step 1 " in cluster.cli("logs", str(job_id)).stdout, 60, "both ranks to train")
    pids = cluster.job_pids(node, job_id)
    assert len(pids) >= 3, "the ranks (and their recorders or torchrun) run"
    cluster.cli("cancel", str(job_id))
    wait_until(lambda: not cluster.job_pids(node, job_id), 30, "the stubborn ranks to be killed")
    assert cluster.wait_job(job_id, ("cancelled",))["state"] == "cancelled"
    after = launched.submit("--gpus", "4", str(SCRIPTS / "ddp_linear.py"), "--steps", "1")
    assert cluster.wait_job(after, ("succeeded", "failed"))["state"] == "succeeded", "every GPU was freed"


def test_a_lost_node_stops_the_other_ranks_and_the_job_runs_again(launched: Launched):
    cluster = launched.cluster
    job_id = launched.submit("--nodes", "2", "--gpus-per-node", "1", "--max-restarts", "1",
                             str(SCRIPTS / "slow_ddp.py"), "--steps", "100000")
    cluster.wait_job(job_id, ("running",))
    wait_until(lambda: cluster.job_pids("node-a", job_id) and cluster.job_pids("node-b", job_id), 30,
               "both nodes' ranks")
    doomed = cluster.job_pids("node-b", job_id)
    cluster.kill("node-b", signal.SIGKILL)
    for pid in doomed:  # the machine is gone: its ranks with it
        _kill(pid)
    wait_until(lambda: not cluster.job_pids("node-a", job_id), 30, "node-a's ranks to be stopped")
    job = cluster.wait_job(job_id, ("pending",))
    assert "node-b" in job["reason"], job
    launched.start_agent("node-b")
    assert cluster.wait_job(job_id, ("running",), timeout=60)["attempt"] == 2
    cluster.cli("cancel", str(job_id))


def test_a_rank_killed_by_a_signal_is_named_with_it(launched: Launched):
    cluster = launched.cluster
    job_id = launched.submit("--gpus", "2", str(SCRIPTS / "slow_ddp.py"), "--steps", "50", "--sleep", "0.05",
                             "--fail-at", "2", "--fail-rank", "0", "--fail-signal", str(int(signal.SIGKILL)))
    job = cluster.wait_job(job_id, ("succeeded", "failed"))
    assert job["state"] == "failed" and job["exit_code"] == 128 + signal.SIGKILL, job
    assert "rank 0 on" in job["reason"] and "killed by SIGKILL" in job["reason"], job["reason"]


def test_warm_interpreters_show_their_memory_and_a_killed_one_is_replaced(tmp_path: Path):
    cluster = Cluster(tmp_path)
    cluster.start_coordinator()
    try:
        cluster.start_agent("node-a", 2, "--warm", "1")
        cluster.start_agent("node-b", 2)
        cluster.wait_nodes("up", 2)
        cluster.cli("drain", "node-b")  # the job below goes to node-a while its interpreter is replaced
        warm = wait_warm(cluster, "node-a")
        assert warm["size"] == 1 and warm["memory_bytes"] > 50 * 2**20, warm  # torch imported: tens of MB at least
        assert next(n["warm"] for n in cluster.nodes() if n["name"] == "node-b") == {
            "size": 0, "ready": 0, "memory_bytes": 0}
        owner = f"{JoinToken.parse(cluster.token).cluster}/node-a"
        (interpreter,) = pids_with_env("GPUDECK_WARM", owner)
        _kill(interpreter)
        job_id = cluster.submit("--gpus", "1", "--name", "during", str(SCRIPTS / "ddp_linear.py"), "--steps", "1")
        assert cluster.wait_job(job_id, ("succeeded", "failed"))["state"] == "succeeded", "started cold meanwhile"
        wait_until(lambda: (pids := pids_with_env("GPUDECK_WARM", owner)) and pids != [interpreter], 60,
                   "another warm interpreter")
        wait_warm(cluster, "node-a")
    finally:
        cluster.stop()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
