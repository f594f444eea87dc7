"""The dashboard's model and form logic, without a terminal."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest

from gpudeck.protocol.views import JobView, NodeView
from gpudeck.tui.client import ClusterUpdate
from gpudeck.tui.model import (
    Cluster, JobTraffic, bar, human_bytes, matches, node_matrix, rank_flows, rank_health, rank_places, request_problem,
    sparkline,
)
from gpudeck.tui.spec import Form, check_form, parse_shape
from tests.tui import recorded


class Clock:
    def __init__(self, now: float = recorded.T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_snapshot_then_updates_report_only_what_changed():
    cluster = Cluster(wall=Clock(), mono=Clock(0.0))
    changes = cluster.reset(ClusterUpdate.decode(recorded.snapshot()))
    assert changes.reset and set(cluster.nodes) == {"node-a", "node-b", "node-c"}
    assert cluster.gpu_jobs[("node-a", 0)] == 7 and ("node-a", 2) not in cluster.gpu_jobs
    update = recorded.updates(1)[0]
    changes = cluster.apply(ClusterUpdate.decode(update))
    assert changes.nodes == {"node-a", "node-b"} and not changes.node_set and changes.jobs == {7}
    assert not changes.job_set, "a job whose state did not change keeps its row's place"
    assert len(cluster.gpu_util[("node-a", 0)]) == 2
    changes = cluster.apply(ClusterUpdate.decode({"time": recorded.T0 + 2, "removed_nodes": ["node-c"]}))
    assert changes.node_set and "node-c" not in cluster.nodes and ("node-c", 0) not in cluster.gpu_util


def test_new_node_and_state_change_rebuild_rows():
    cluster = Cluster(wall=Clock(), mono=Clock(0.0))
    cluster.reset(ClusterUpdate.decode(recorded.snapshot()))
    extra = copy.deepcopy(recorded.snapshot()["nodes"][0]) | {"name": "node-d"}
    job = copy.deepcopy(recorded.snapshot()["jobs"][1]) | {"state": "running"}
    changes = cluster.apply(ClusterUpdate.decode({"time": recorded.T0 + 1, "nodes": [extra], "jobs": [job]}))
    assert changes.node_set and changes.job_set
    assert [j.id for j in cluster.sorted_jobs()][:3] == [8, 7, 9], "running first, then the queue"


def test_rates_come_from_differences_and_a_quiet_job_drops_to_zero():
    cluster = Cluster(wall=Clock(), mono=Clock(0.0))
    cluster.reset(ClusterUpdate.decode(recorded.snapshot()))
    for update in recorded.updates(3):
        cluster.apply(ClusterUpdate.decode(update))
    traffic = cluster.traffic[7]
    rates = traffic.rank_rates()
    assert rates[0]["all_reduce"] == pytest.approx(recorded.STEP)
    assert rates[3]["all_reduce"] == 0, "rank 3 is silent in the recording"
    assert traffic.kind_rates()["all_reduce"] == pytest.approx(3 * recorded.STEP)
    assert traffic.series("all_reduce")[-1] == pytest.approx(3 * recorded.STEP)
    # The coordinator sends nothing about a job that did not change: its rate falls to zero.
    cluster.apply(ClusterUpdate.decode({"time": recorded.T0 + 10, "nodes": []}))
    assert traffic.series()[-1] == 0
    assert cluster.cluster_rate[-1] == 0


def test_a_new_attempt_starts_its_traffic_afresh():
    traffic = JobTraffic(1)
    traffic.add(0.0, {"0": {"all_reduce": 100}})
    traffic.add(1.0, {"0": {"all_reduce": 300}})
    assert traffic.total_rate() == 200
    cluster = Cluster(wall=Clock(), mono=Clock(0.0))
    cluster.reset(ClusterUpdate.decode(recorded.snapshot()))
    job = cluster.jobs[7].to_json() | {"attempt": 2}
    job["traffic"] = {"by_kind": {}, "by_rank": {}}
    cluster.apply(ClusterUpdate.decode({"time": recorded.T0 + 1, "jobs": [job]}))
    assert cluster.traffic[7].attempt == 2 and cluster.traffic[7].total_rate() == 0


def test_ranks_are_numbered_node_by_node_in_node_rank_order():
    job = JobView.from_json(recorded.job(1, "x", "running", [("b", [2, 3]), ("a", [0])], gpus=3))
    places = rank_places(job)
    assert [(p.rank, p.node, p.gpu) for p in places] == [(0, "b", 2), (1, "b", 3), (2, "a", 0)]


def test_flows_follow_a_ring_a_pipeline_and_all_to_all():
    assert rank_flows("all_reduce", 3, 4) == [(0, 1.0)]
    assert rank_flows("broadcast", 0, 4) == [(1, 1.0)]
    assert rank_flows("send", 1, 3) == [(2, 1.0)]
    assert rank_flows("send", 2, 3) == [(1, 1.0)], "the last pipeline stage sends back"
    assert rank_flows("recv", 1, 3) == [], "recv mirrors a send: counted once, at the sender"
    assert sorted(rank_flows("all_to_all", 0, 3)) == [(1, 0.5), (2, 0.5)]
    assert rank_flows("all_reduce", 0, 1) == [(0, 1.0)]


def test_node_matrix_sums_rank_flows_between_nodes():
    job = JobView.from_json(recorded.job(1, "x", "running", [("a", [0, 1]), ("b", [0, 1])], gpus=4))
    rates = {r: {"all_reduce": 10.0} for r in range(4)}
    names, matrix = node_matrix(job, rates)
    # ring 0->1 (a->a), 1->2 (a->b), 2->3 (b->b), 3->0 (b->a)
    assert names == ["a", "b"] and matrix == [[10.0, 10.0], [10.0, 10.0]]
    rates[3] = {"all_reduce": 0.0}
    assert node_matrix(job, rates)[1] == [[10.0, 10.0], [0.0, 10.0]]


def test_a_silent_or_slow_rank_stands_out():
    places = rank_places(JobView.from_json(recorded.job(1, "x", "running", [("a", [0, 1, 2, 3])], gpus=4)))
    rates = {0: {"all_reduce": 100.0}, 1: {"all_reduce": 90.0}, 2: {"all_reduce": 20.0}, 3: {}}
    assert rank_health(places, rates, running=True) == {0: "", 1: "", 2: "slow", 3: "silent"}
    assert set(rank_health(places, rates, running=False).values()) == {""}


def test_impossible_requests_say_why_in_the_schedulers_words():
    nodes = [NodeView.from_json(n) for n in recorded.snapshot()["nodes"]]  # node-a 4 GPUs, node-b 2, node-c 1 (suspect)
    assert request_problem(7, None, None, nodes) is None
    assert request_problem(8, None, None, nodes) == "needs 8 GPUs but the 3 nodes have only 7 GPUs in all"
    assert request_problem(None, 4, 1, nodes) == "needs 4 nodes with 1 GPU each but there are only 3 nodes"
    assert request_problem(None, 2, 4, nodes) == ("needs 2 nodes with 4 GPUs each but only 1 node has that "
                                                   "many (node-a)")
    assert request_problem(None, 1, 5, nodes) == "needs 5 GPUs on one node but the largest node, node-a, has 4 GPUs"
    down = [replace(n, state="down") if n.name == "node-a" else n for n in nodes]
    assert request_problem(4, None, None, down) == "needs 4 GPUs but the 2 nodes have only 3 GPUs in all"
    assert request_problem(99, None, None, []) is None, "nodes may still join an empty cluster"
    assert request_problem(0, None, None, nodes) == "a job takes from 1 to 4096 GPUs"


def test_form_checks_as_you_type_and_reads_the_script_when_sent(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    nodes = [NodeView.from_json(n) for n in recorded.snapshot()["nodes"]]
    checked = check_form(Form(script="train.py --epochs 3", gpus="2x2"), nodes, {}, str(tmp_path))
    assert not checked.problems and checked.spec is not None
    assert checked.spec.run.script == b"#", "typing only stats the file"
    checked = check_form(Form(script="train.py --epochs 3", gpus="2x2", time_limit="10m"), nodes, {}, str(tmp_path),
                         read=True)
    spec = checked.spec
    assert spec is not None
    assert spec.run.script == script.read_bytes() and spec.name == "train" and spec.run.args == ["--epochs", "3"]
    assert (spec.nodes, spec.gpus_per_node, spec.gpus, spec.time_limit) == (2, 2, None, 600)
    assert spec.run.workdir == str(tmp_path)
    problems = check_form(Form(script="missing.py", gpus="9", priority="x", time_limit="soon"), nodes, {},
                          str(tmp_path)).problems
    assert set(problems) == {"script", "gpus", "priority", "time_limit"}
    assert "No such file" in problems["script"] and "7 GPUs in all" in problems["gpus"]
    assert check_form(Form(script=""), nodes, {}, str(tmp_path)).problems["script"].startswith("give a script")


def test_form_offers_built_in_workloads_when_there_are_some(tmp_path):
    workloads = {"mnist": "a small DDP MNIST"}
    checked = check_form(Form(workload="mnist", script="--epochs 2"), [], workloads, str(tmp_path), read=True)
    spec = checked.spec
    assert spec is not None and spec.run.workload == "mnist" and spec.run.args == ["--epochs", "2"] \
        and spec.name == "mnist"
    assert "workload" in check_form(Form(workload="nope"), [], workloads, str(tmp_path)).problems


def test_shapes():
    assert parse_shape("4") == (4, None, None)
    assert parse_shape(" 2 x 4 ") == (None, 2, 4)
    assert parse_shape("2*4") == (None, 2, 4)
    with pytest.raises(ValueError):
        parse_shape("two")


def test_filter_matches_every_word():
    job = JobView.from_json(recorded.snapshot()["jobs"][0])
    assert matches("ddp running", job) and matches("node-b", job) and not matches("ddp failed", job)
    node = NodeView.from_json(recorded.snapshot()["nodes"][2])
    assert matches("suspect draining", node) and not matches("sim", node)


def test_formatting():
    assert sparkline([0, 50, 100], 5, 100) == "   ▄█"
    assert sparkline([], 3) == "   "
    assert bar(0.5, 4) == "██  " and bar(None, 3) == "   " and bar(1.0, 2) == "██"
    assert human_bytes(1023) == "1023 B" and human_bytes(1536) == "1.5 KiB" and human_bytes(3 << 30) == "3.0 GiB"


def test_what_a_peer_wrote_reaches_the_screen_with_its_control_characters_visible():
    cluster = Cluster(wall=Clock(), mono=Clock(0.0))
    snapshot = recorded.snapshot()
    snapshot["jobs"][0]["name"] = "evil\x1b]0;pwned\x07"
    snapshot["jobs"][0]["reason"] = "clear\x1b[2J"
    cluster.reset(ClusterUpdate.decode(snapshot))
    job = cluster.jobs[snapshot["jobs"][0]["id"]]
    assert job.name == "evil\\x1b]0;pwned\\x07" and job.reason == "clear\\x1b[2J"
    update = recorded.updates(1)[0]
    update["jobs"] = [dict(job.to_json(), name="again\x9b2J")]
    cluster.apply(ClusterUpdate.decode(update))
    assert cluster.jobs[job.id].name == "again\\x9b2J"


def test_what_a_job_asked_for_reads_as_gpus_or_none_for_the_doctor_check() -> None:
    from gpudeck.tui.model import asked_text

    def asking(gpus: int | None, nodes: int | None, per_node: int | None) -> JobView:
        return JobView.from_json(recorded.job(1, "x", "pending", gpus=gpus, nodes=nodes, per_node=per_node))

    assert asked_text(asking(1, None, None)) == "1 GPU"
    assert asked_text(asking(None, 2, 4)) == "2x4 GPUs"
    assert asked_text(asking(None, None, None)) == "no GPU"
