"""gpudeck doctor: the verdict on what its check measured, who may ask for such a job, and the whole
command on a real loopback cluster (the network cases, a slowed link and blocked ports, are in
test_doctor_netns.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gpudeck import doctor
from gpudeck.doctor import AllReduce, NodeSeen, Route
from gpudeck.model import DOCTOR, JobSpec, RunSpec
from tests.cluster import Cluster

GB = 1e9


def _pair(a: str, b: str, rate: float | None, error: str | None = None) -> AllReduce:
    return AllReduce(nodes=[a, b], busbw=rate, seconds=None if rate is None else 4e6 / rate, error=error)


def _seen(*names: str) -> list[NodeSeen]:
    return [NodeSeen(name, f"10.0.0.{i}", mdns={"agent": [n for n in names if n != name], "coordinator": ["c"]})
            for i, name in enumerate(names, 1)]


def test_bus_bandwidth_is_nccl_tests_definition() -> None:
    assert doctor.bus_bandwidth(1_000_000, 0.001, 2) == pytest.approx(1e9)  # n = 2: busbw equals algbw
    assert doctor.bus_bandwidth(1_000_000, 0.001, 8) == pytest.approx(1e9 * 2 * 7 / 8)


def test_a_node_whose_every_link_is_slow_is_named_with_each_slow_link() -> None:
    pairs = [_pair("a", "b", 1.2 * GB), _pair("a", "c", 0.1 * GB), _pair("b", "c", 0.12 * GB)]
    found = doctor.report(_seen("a", "b", "c"), [], pairs, None, 4 << 20, "29500-29999")
    assert found.problems == [
        "the link a ↔ c is slow: 0.1 GB/s, 0.08× the best pair (a ↔ b, 1.2 GB/s)",
        "the link b ↔ c is slow: 0.12 GB/s, 0.10× the best pair (a ↔ b, 1.2 GB/s)",
        "every link of c is slow: look at c's network first (cable, port speed, MTU)",
    ]
    assert [p.vs_best for p in found.pairs] == pytest.approx([1.0, 0.1 / 1.2, 0.1])
    assert found.warnings == [] and not found.to_json()["ok"]


def test_links_within_half_of_the_best_pass_and_a_failed_all_reduce_is_a_broken_link() -> None:
    pairs = [_pair("a", "b", 1.0 * GB), _pair("a", "c", 0.6 * GB), _pair("b", "c", None, error="Connection reset")]
    found = doctor.report(_seen("a", "b", "c"), [], pairs, None, 4 << 20, "29500-29999")
    assert found.problems == ["the link b ↔ c is broken: its all-reduce failed (Connection reset)"]


def test_blocked_job_ports_unreached_nodes_and_unseen_adverts_are_said() -> None:
    nodes = _seen("a", "b", "c")
    nodes[1].mdns = {"agent": ["a"], "coordinator": []}
    nodes[2] = NodeSeen("c", reached=False)
    routes = [Route("a", "b", "eth0", "10.0.0.1", True, 29501),
              Route("b", "a", "eth0", "10.0.0.2", False, 29502, "no answer in 3 s")]
    found = doctor.report(nodes, routes, [_pair("a", "b", GB)], None, 4 << 20, "29500-29999")
    assert found.problems == [
        "c did not reach the check's rendezvous on a (10.0.0.1): it never answered",
        "b cannot reach a on the job ports (a:29502 via eth0: no answer in 3 s); jobs across them will hang in "
        "their rendezvous",
    ]
    assert found.warnings == [
        "b sees no coordinator's mDNS advert: start its agent with --coordinator HOST:PORT",
    ]
    nodes[1].mdns = {"agent": [], "coordinator": ["c"]}
    assert doctor.report(nodes, routes, [], None, 1, "1-2").warnings == [
        "b does not see the mDNS adverts of a (multicast does not pass between them: a different subnet or a "
        "switch that filters it)"]
    assert "(not measured: c, which did not reach the rendezvous)" in doctor.table(found)


def test_a_node_whose_findings_never_came_is_a_problem_not_a_clean_bill() -> None:
    found = doctor.report(_seen("a", "b"), [], [], None, 1 << 20, "29500-29999", late=["b"])
    assert found.problems == ["b's findings never reached a: its routes and some pairs are not in this report "
                              "(its rank stopped, or its node was too slow)"]


def test_the_report_reads_back_from_its_json() -> None:
    found = doctor.report(_seen("a", "b"), [Route("a", "b", "lo", "127.0.0.1", True, 29501)], [_pair("a", "b", GB)],
                          None, 1 << 20, "29500-29999")
    again = doctor.Report.from_json(json.loads(json.dumps(found.to_json())))
    assert again == found and doctor.table(again) == doctor.table(found)


def test_only_the_doctor_check_names_its_nodes_and_it_takes_no_gpu() -> None:
    check = JobSpec(name="doctor", run=RunSpec(workload=DOCTOR), on_nodes=["a", "b"])
    check.check()
    refused = {
        "only gpudeck doctor runs its check, on the nodes it names": [
            JobSpec(name="x", run=RunSpec(workload="data-parallel"), gpus=1, on_nodes=["a"]),
            JobSpec(name="x", run=RunSpec(script_name="t.py", script=b"1"), on_nodes=["a"]),
            JobSpec(name="x", run=RunSpec(workload=DOCTOR), gpus=1),
        ],
        "gpudeck doctor's check takes no GPU": [
            JobSpec(name="x", run=RunSpec(workload=DOCTOR), gpus=1, on_nodes=["a"])],
        "gpudeck doctor checks 1 to 64 different nodes": [
            JobSpec(name="x", run=RunSpec(workload=DOCTOR), on_nodes=["a", "a"])],
        "gpudeck doctor's check takes --bytes 4 to": [
            JobSpec(name="x", run=RunSpec(workload=DOCTOR, args=["--bytes", str(1 << 30)]), on_nodes=["a"]),
            JobSpec(name="x", run=RunSpec(workload=DOCTOR, args=["--reps", "1000"]), on_nodes=["a"])],
        "gpudeck doctor's check: unrecognized arguments: --evil": [
            JobSpec(name="x", run=RunSpec(workload=DOCTOR, args=["--evil"]), on_nodes=["a"])],
    }
    # nothing of a user's may come with it: it would run their code on any node, outside the queue
    run_extras: tuple[tuple[str, Any], ...] = (
        ("python", "/usr/bin/python3"), ("venv", "/opt/v"), ("image", "busybox"),
        ("workdir", "/home/ada"), ("project", "a" * 64), ("env", {"PYTHONPATH": "/tmp"}),
        ("requirements", {"requirements.txt": b"evil"}), ("launcher", "torchrun"))
    for extra, value in run_extras:
        refused.setdefault(f"it takes no {extra}$", []).append(
            JobSpec(name="x", run=RunSpec(workload=DOCTOR, **{extra: value}), on_nodes=["a"]))
    job_extras: tuple[tuple[str, Any], ...] = (("array", "0-3"), ("time_limit", 5.0), ("preemptible", True))
    for extra, value in job_extras:
        refused.setdefault(f"it takes no {extra}$", []).append(
            JobSpec(name="x", run=RunSpec(workload=DOCTOR), on_nodes=["a"], **{extra: value}))
    for reason, specs in refused.items():
        for spec in specs:
            with pytest.raises(ValueError, match=reason):
                spec.check()
    with pytest.raises(ValueError, match="printable"):
        JobSpec(name="x", run=RunSpec(workload=DOCTOR), on_nodes=["a\x1b[2J"]).check()


def test_chosen_nodes_default_to_those_taking_jobs_and_refuse_what_cannot_take_the_check() -> None:
    nodes = [{"name": "b", "state": "up", "draining": False}, {"name": "a", "state": "up", "draining": False},
             {"name": "c", "state": "suspect", "draining": False}, {"name": "d", "state": "up", "draining": True}]
    assert doctor.chosen_nodes(nodes, None) == ["a", "b"]
    assert doctor.chosen_nodes(nodes, ["b", "a", "b"]) == ["a", "b"]
    for asked, reason in ((["zz"], "there is no node 'zz'"), (["c"], "c is suspect"), (["d"], "d is draining")):
        with pytest.raises(ValueError, match=reason):
            doctor.chosen_nodes(nodes, asked)
    with pytest.raises(ValueError, match="no node is up"):
        doctor.chosen_nodes(nodes[2:3], None)


@pytest.mark.slow
def test_doctor_checks_two_loopback_nodes_whose_gpus_are_all_held(cluster: Cluster) -> None:
    cluster.wait_nodes("up", 2)
    holder = cluster.submit("--gpus", "2x2", "--", "sleep", "600")
    cluster.wait_job(holder, ("running",))

    result = cluster.cli("doctor", "--size", "256K", "--json", check=False, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [n["name"] for n in report["nodes"]] == ["node-a", "node-b"] and report["ok"]
    assert {(r["source"], r["target"], r["interface"], r["ports_reachable"]) for r in report["paths"]} == {
        ("node-a", "node-b", "lo", True), ("node-b", "node-a", "lo", True)}
    [pair] = report["pairs"]
    assert pair["nodes"] == ["node-a", "node-b"] and pair["busbw"] > 0 and pair["vs_best"] == 1.0
    assert report["size"] == 256 << 10 and report["all"] is None
    assert "node-a runs without mDNS, so it finds the coordinator only by its address" in report["warnings"]
    assert cluster.job(holder)["state"] == "running"  # the check took no GPU from it

    table = cluster.cli("doctor", "--nodes", "node-b,node-a", "--size", "256K", timeout=120)
    assert "node-a ↔ node-b" in table.stdout and "no problems found on 2 nodes" in table.stdout
    assert "checking node-a, node-b (job" in table.stderr

    ghost = cluster.cli("doctor", "--nodes", "node-a,ghost", check=False)
    assert (ghost.returncode, ghost.stderr) == (
        1, "gpudeck: there is no node 'ghost' in this cluster (gpudeck nodes lists them)\n")
    by_submit = cluster.cli("submit", "--workload", DOCTOR, check=False)
    assert by_submit.returncode == 2 and "there is no built-in workload 'doctor'" in by_submit.stderr
    jobs = {job["id"]: job for job in cluster.json("jobs")}
    checks = [job for job in jobs.values() if job["name"] == "doctor"]
    assert [job["state"] for job in checks] == ["succeeded", "succeeded"]
    rank0 = cluster.cli("logs", str(checks[0]["id"]), "--rank", "0")
    assert "node-a ↔ node-b" in rank0.stdout  # rank 0 prints the table in its log too
    beyond = cluster.cli("logs", str(checks[0]["id"]), "--rank", "2", check=False)
    assert beyond.returncode == 1 and "its ranks are 0 and 1" in beyond.stderr
