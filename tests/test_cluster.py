"""The cluster end to end on loopback: a real coordinator, real agents, real torchrun jobs on CPU."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import struct

import msgpack
import pytest

from tests.cluster import Cluster, free_port, wait_until
from tests.conftest import SCRIPTS

pytestmark = pytest.mark.slow
GRAD_BYTES = 2080 * 4  # Linear(64, 32): 2,080 float32 parameters


def _ranks_alive(cluster: Cluster, node: str, job_id: int, attempt: int = 1) -> int:
    """How many processes of that job attempt on that node still run (ranks and their recorders)."""
    return len(cluster.job_pids(node, job_id, attempt))


def test_two_node_ddp_job_succeeds_with_logs_and_exact_all_reduce_bytes(cluster: Cluster):
    job_id = cluster.submit("--nodes", "2", "--gpus-per-node", "1", str(SCRIPTS / "ddp_linear.py"), "--steps", "5")
    job = cluster.wait_job(job_id, ("succeeded", "failed", "cancelled"))
    assert job["state"] == "succeeded", job
    assert job["exit_code"] == 0 and job["attempt"] == 1
    assert sorted(job["nodes"]) == ["node-a", "node-b"]
    assert job["traffic"]["by_kind"]["all_reduce"] == 2 * 5 * GRAD_BYTES
    assert ({r: k["all_reduce"] for r, k in job["traffic"]["by_rank"].items()}
            == {"0": 5 * GRAD_BYTES, "1": 5 * GRAD_BYTES})
    logs = cluster.cli("logs", str(job_id)).stdout
    assert logs.count("step 4 loss") == 2
    assert "[rank 0] rank 0 step 0" in logs and "[rank 1] rank 1 step 0" in logs
    only_rank_1 = cluster.cli("logs", str(job_id), "--rank", "1").stdout
    assert "rank 1 step 4" in only_rank_1 and "rank 0 step" not in only_rank_1


def test_cancel_stops_every_rank_and_frees_the_gpus(cluster: Cluster):
    job_id = cluster.submit("--gpus", "4", "--name", "long", str(SCRIPTS / "slow_ddp.py"), "--steps", "1000")
    cluster.wait_job(job_id, ("running",))
    wait_until(lambda: _ranks_alive(cluster, "node-a", job_id) >= 4, 20, "both ranks on node-a and their recorders")
    blocked = cluster.submit("--gpus", "1", str(SCRIPTS / "ddp_linear.py"), "--steps", "1")
    assert "needs 1 GPU" in cluster.job(blocked)["reason"] or cluster.job(blocked)["state"] == "pending"
    assert cluster.cli("cancel", str(job_id)).stdout.strip() == f"job {job_id} cancelled"
    wait_until(lambda: not _ranks_alive(cluster, "node-a", job_id) and not _ranks_alive(cluster, "node-b", job_id), 15,
               "every rank to stop")
    assert cluster.job(job_id)["state"] == "cancelled"
    assert cluster.wait_job(blocked, ("succeeded", "failed"))["state"] == "succeeded"
    again = cluster.cli("cancel", str(job_id), check=False)
    assert again.returncode == 1 and "already cancelled" in again.stderr


def test_cancel_kills_ranks_that_ignore_sigterm(cluster: Cluster):
    job_id = cluster.submit("--gpus", "2", str(SCRIPTS / "slow_ddp.py"), "--steps", "1000", "--ignore-sigterm")
    node = cluster.wait_job(job_id, ("running",))["nodes"][0]
    wait_until(lambda: _ranks_alive(cluster, node, job_id) >= 4, 20, "both ranks and their recorders")
    cluster.cli("cancel", str(job_id))
    wait_until(lambda: not _ranks_alive(cluster, node, job_id), 20, "the stubborn ranks to be killed")


def test_wrong_token_is_refused_and_creates_nothing(cluster: Cluster):
    before = cluster.json("jobs")
    wrong = "gd1." + "0" * 64 + "." + "A" * 43
    for args in (["jobs"], ["nodes"]):
        result = cluster.cli(*args, "--coordinator", f"127.0.0.1:{cluster.port}", "--token", wrong, check=False,
                             client=False)
        assert result.returncode == 1
    # The same fingerprint with a wrong secret reaches the coordinator's secret check.
    right_pin_wrong_secret = cluster.token.rsplit(".", 1)[0] + "." + "B" * 43
    submit = cluster.cli("submit", "--coordinator", f"127.0.0.1:{cluster.port}", "--token", right_pin_wrong_secret,
                         str(SCRIPTS / "ddp_linear.py"), check=False, client=False)
    assert submit.returncode == 1 and "the token is wrong" in submit.stderr
    assert "does not match the join token" in cluster.cli("jobs", "--coordinator", f"127.0.0.1:{cluster.port}",
                                                          "--token", wrong, check=False, client=False).stderr
    cluster.spawn("intruder", "agent", "--coordinator", f"127.0.0.1:{cluster.port}", "--token",
                  right_pin_wrong_secret, "--name", "intruder", "--simulate-gpus", "8", "--no-mdns",
                  "--state-dir", str(cluster.root / "intruder"))
    wait_until(lambda: "refused" in cluster.logs_of("intruder"), 20, "the intruder to be refused")
    assert cluster.json("jobs") == before
    assert sorted(n["name"] for n in cluster.nodes()) == ["node-a", "node-b"]


def _tls(port: int) -> ssl.SSLSocket:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10))


def _answer(sock: ssl.SSLSocket) -> dict | None:
    header = sock.recv(4)
    if len(header) < 4:
        return None
    (length,) = struct.unpack(">I", header)
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return msgpack.unpackb(body)


@pytest.mark.parametrize("garbage", [
    struct.pack(">I", 0xFFFFFFF0),
    struct.pack(">I", 3) + b"\xc1\xc1\xc1",
    (lambda b: struct.pack(">I", len(b)) + b)(msgpack.packb([1, 2])),
    (lambda b: struct.pack(">I", len(b)) + b)(msgpack.packb({"kind": "submit", "req": 1, "spec": {}})),
    (lambda b: struct.pack(">I", len(b)) + b)(msgpack.packb({"kind": "hello", "secret": 1, "role": "agent",
                                                              "name": "x", "version": 1})),
], ids=["huge-length", "bad-bytes", "not-a-map", "request-before-hello", "hello-wrong-type"])
def test_garbage_gets_an_error_frame_and_leaves_the_cluster_serving(cluster: Cluster, garbage: bytes):
    jobs_before = cluster.json("jobs")
    with _tls(cluster.port) as sock:
        sock.sendall(garbage)
        answer = _answer(sock)
    assert answer is not None and answer["kind"] == "error" and answer["req"] is None, answer
    with socket.create_connection(("127.0.0.1", cluster.port), timeout=10) as plain:
        plain.sendall(b"GET / HTTP/1.0\r\n\r\n" + os.urandom(256))
    assert [n["state"] for n in cluster.nodes()] == ["up", "up"]
    assert cluster.json("jobs") == jobs_before


def test_impossible_and_malformed_requests_are_refused_with_a_reason(cluster: Cluster):
    script = str(SCRIPTS / "ddp_linear.py")
    cases = [  # refused by the coordinator (1), or not a request at all (2, a usage error)
        (["--gpus", "5", script], "needs 5 GPUs", 1),
        (["--nodes", "3", "--gpus-per-node", "1", script], "only 2 nodes", 1),
        (["--nodes", "1", "--gpus-per-node", "3", script], "3 GPUs", 1),
        (["--gpus", "0", script], "at least 1", 2),
        (["--time-limit", "soon", script], "not a duration", 2),
        (["--nodes", "2", script], "go together", 2),
        ([str(cluster.root / "missing.py")], "cannot read the script", 1),
    ]
    for args, reason, code in cases:
        result = cluster.cli("submit", *args[:-1], "--coordinator", f"127.0.0.1:{cluster.port}", "--token",
                             cluster.token, args[-1], check=False, client=False)
        assert result.returncode == code, (args, result.stdout)
        assert reason in result.stderr, (args, result.stderr)
    assert cluster.json("jobs") == []


@pytest.mark.parametrize("launcher", [[], ["--torchrun"]], ids=["agent-started", "torchrun"])
def test_failing_job_reports_its_exit_code_and_launcher_output(cluster: Cluster, launcher: list[str]):
    job_id = cluster.submit(*launcher, "--nodes", "2", "--gpus-per-node", "1", str(SCRIPTS / "slow_ddp.py"),
                            "--steps", "5", "--sleep", "0", "--fail-at", "2")
    job = cluster.wait_job(job_id, ("succeeded", "failed"))
    assert job["state"] == "failed" and job["exit_code"] == 3
    assert "exited with code 3" in job["reason"]
    logs = cluster.cli("logs", str(job_id)).stdout
    assert "[node 0]" in logs, "a failed job's logs include what its launcher (torchrun, or the agent) said"
    if not launcher:
        assert "failed (exit code 3); stopping the other ranks on" in logs


def test_time_limit_stops_an_overrunning_job(cluster: Cluster):
    job_id = cluster.submit("--gpus", "1", "--time-limit", "3s", str(SCRIPTS / "slow_ddp.py"), "--steps", "1000")
    job = cluster.wait_job(job_id, ("succeeded", "failed"), timeout=60)
    assert job["state"] == "failed" and "time limit of 3s" in job["reason"]
    wait_until(lambda: not _ranks_alive(cluster, job["nodes"][0], job_id), 15, "the ranks to stop")


def test_coordinator_killed_and_restarted_adopts_the_running_job(cluster: Cluster):
    job_id = cluster.submit("--nodes", "2", "--gpus-per-node", "1", str(SCRIPTS / "slow_ddp.py"),
                            "--steps", "24", "--sleep", "0.5")
    cluster.wait_job(job_id, ("running",))
    cluster.kill("coordinator", signal.SIGKILL)
    cluster.start_coordinator()
    job = cluster.wait_job(job_id, ("succeeded", "failed", "cancelled"), timeout=120)
    assert job["state"] == "succeeded" and job["attempt"] == 1, job
    logs = cluster.cli("logs", str(job_id)).stdout
    assert logs.count("step 23 loss") == 2 and logs.count("step 0 loss") == 2


def test_agent_killed_mid_job_stops_the_other_ranks_and_requeues(cluster: Cluster):
    job_id = cluster.submit("--nodes", "2", "--gpus-per-node", "1", "--max-restarts", "1",
                            str(SCRIPTS / "slow_ddp.py"), "--steps", "1000")
    job = cluster.wait_job(job_id, ("running",))
    assert _ranks_alive(cluster, "node-a", job_id) and _ranks_alive(cluster, "node-b", job_id)
    cluster.kill("node-b", signal.SIGKILL)
    for pid in cluster.job_pids("node-b", job_id):  # the machine is gone: its ranks with it
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: any(n["name"] == "node-b" and n["state"] == "down" for n in cluster.nodes()), 20,
               "node-b to be down")
    wait_until(lambda: not _ranks_alive(cluster, "node-a", job_id), 15, "the surviving ranks to be stopped")
    job = cluster.job(job_id)
    assert job["state"] == "pending" and "requeued" in job["reason"] and "node-b" in job["reason"], job
    cluster.start_agent("node-b")
    job = cluster.wait_job(job_id, ("running",), timeout=60)
    assert job["attempt"] == 2
    cluster.cli("cancel", str(job_id))


def test_a_draining_node_takes_no_new_jobs_until_undrained(cluster: Cluster):
    assert "is draining" in cluster.cli("drain", "node-a").stdout
    job_id = cluster.submit("--gpus", "2", str(SCRIPTS / "ddp_linear.py"), "--steps", "1")
    assert cluster.wait_job(job_id, ("succeeded", "failed"))["nodes"] == ["node-b"]
    assert next(n for n in cluster.nodes() if n["name"] == "node-a")["draining"] is True
    big = cluster.submit("--gpus", "4", str(SCRIPTS / "ddp_linear.py"), "--steps", "1")
    wait_until(lambda: "needs 4 GPUs" in cluster.job(big)["reason"], 10, "a reason naming the free GPUs")
    assert "(node-a is draining)" in cluster.job(big)["reason"]
    assert cluster.job(big)["state"] == "pending"
    assert "takes new jobs again" in cluster.cli("drain", "node-a", "--off").stdout
    assert cluster.wait_job(big, ("succeeded", "failed"))["state"] == "succeeded"
    missing = cluster.cli("drain", "node-z", check=False)
    assert missing.returncode == 1 and "no node node-z" in missing.stderr


def test_a_second_agent_with_a_taken_name_is_refused_and_the_first_keeps_its_place(cluster: Cluster):
    cluster.spawn("twin", "agent", "--coordinator", f"127.0.0.1:{cluster.port}", "--token", cluster.token,
                  "--name", "node-a", "--simulate-gpus", "8", "--no-mdns", "--state-dir", str(cluster.root / "twin"))
    wait_until(lambda: "already connected" in cluster.logs_of("twin"), 20, "the twin to be refused")
    node_a = next(n for n in cluster.nodes() if n["name"] == "node-a")
    assert node_a["state"] == "up" and len(node_a["gpus"]) == 2


def test_a_frozen_node_that_comes_back_has_its_stale_ranks_stopped(cluster: Cluster):
    """A machine that freezes (or is cut off) past the down deadline keeps its TCP connection; when it
    wakes, its ranks of the given-up attempt must be stopped, and the job runs again."""
    job_id = cluster.submit("--nodes", "2", "--gpus-per-node", "1", "--max-restarts", "1",
                            str(SCRIPTS / "slow_ddp.py"), "--steps", "1000")
    cluster.wait_job(job_id, ("running",))
    wait_until(lambda: _ranks_alive(cluster, "node-b", job_id) >= 2, 20, "node-b's rank and its recorder")
    frozen = [cluster.procs["node-b"].pid, *cluster.job_pids("node-b", job_id)]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: any(n["name"] == "node-b" and n["state"] == "down" for n in cluster.nodes()), 25,
                   "node-b to be down")
        wait_until(lambda: not _ranks_alive(cluster, "node-a", job_id), 15, "node-a's ranks to be stopped")
        assert cluster.job(job_id)["state"] == "pending"
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    wait_until(lambda: not _ranks_alive(cluster, "node-b", job_id), 30, "node-b's stale ranks to be stopped")
    job = cluster.wait_job(job_id, ("running",), timeout=60)
    assert job["attempt"] == 2
    cluster.cli("cancel", str(job_id))


def test_a_rendezvous_port_held_by_another_program_delays_the_job_instead_of_failing_it(tmp_path):
    port = free_port()
    squatter = socket.socket()
    squatter.bind(("", port))
    squatter.listen()
    cluster = Cluster(tmp_path)
    try:
        cluster.start_coordinator("--job-ports", f"{port}-{port}")
        cluster.start_agent("node-a")
        cluster.wait_nodes("up", 1)
        job_id = cluster.submit("--gpus", "1", str(SCRIPTS / "ddp_linear.py"), "--steps", "2")
        wait_until(lambda: f"rendezvous port {port} on node-a is in use" in cluster.job(job_id)["reason"], 30,
                   "the job to wait for its port")
        assert cluster.job(job_id)["state"] in ("pending", "starting") and cluster.job(job_id)["restarts"] == 0
        squatter.close()
        assert cluster.wait_job(job_id, ("succeeded", "failed"))["state"] == "succeeded"
    finally:
        squatter.close()
        cluster.stop()
