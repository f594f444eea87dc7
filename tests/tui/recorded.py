"""Recorded cluster data for the dashboard's snapshot tests: fixed, so every screen is the same on every
run. Times are seconds of a fixed coordinator clock; the app under test is given the same clock."""

from __future__ import annotations

import copy
from typing import Any

from gpudeck.model import JobSpec, RunSpec
from gpudeck.protocol.payloads import GpuProcess, GpuReading, JobView, NodeView
from gpudeck.protocol.values import plain

GIB = 1 << 30
T0 = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC


def gpu(index: int, util: int | None, used_gib: float | None, temp: float | None, power: float | None,
        processes: list[dict[str, Any]] | None = None, name: str = "Simulated GPU") -> dict[str, Any]:
    return plain(GpuReading(index=index, name=name, uuid=f"SIM-{index}", memory_total=80 * GIB,
                            memory_used=None if used_gib is None else int(used_gib * GIB), utilization=util,
                            temperature=temp, power=power, power_limit=700.0,
                            processes=tuple(GpuProcess(**p) for p in processes or [])))


def node(name: str, gpus: list[dict[str, Any]], state: str = "up", simulated: bool = True, address: str = "10.0.0.1",
         jobs: list[int] | None = None, draining: bool = False, age: float = 0.4,
         cordoned: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return NodeView.from_json({"name": name, "state": state, "draining": draining, "simulated": simulated,
                               "cordoned": cordoned or [],
                               "hostname": name, "address": address, "connected": state != "down",
                               "last_heartbeat_age": age, "jobs": jobs or [], "gpus": gpus,
                               "warm": {"size": 1, "ready": 1, "memory_bytes": 412 * 2**20}}).to_json()


def job(job_id: int, name: str, state: str, placement: list[tuple[str, list[int]]] | None = None,
        gpus: int | None = 2, nodes: int | None = None, per_node: int | None = None, reason: str = "",
        started: float | None = None, ended: float | None = None, exit_code: int | None = None,
        attempt: int = 1, priority: int = 0, by_rank: dict[str, dict[str, int]] | None = None,
        command: list[str] | None = None) -> dict[str, Any]:
    """A job's view as the coordinator builds it (`JobView.build`), from a spec like the one submitted."""
    script, *args = command or [f"{name}.py", "--epochs", "3"]
    spec = JobSpec(name=name, gpus=gpus, nodes=nodes, gpus_per_node=per_node, priority=priority,
                   run=RunSpec(script_name=script, script=b"#", args=args))
    return JobView.build(job_id, spec, state=state, submitted_at=T0 - 600 + job_id, reason=reason,
                         hosts=placement or [], attempt=attempt, exit_code=exit_code, started_at=started,
                         ended_at=ended,
                         traffic={int(rank): kinds for rank, kinds in (by_rank or {}).items()}).to_json()


STEP = 8320 * 10  # bytes one rank all-reduces per second in the recorded DDP job


def ddp_traffic(seconds: int, silent_rank: int | None = None) -> dict[str, dict[str, int]]:
    out = {}
    for rank in range(4):
        steps = seconds if rank != silent_rank else min(seconds, 3)
        out[str(rank)] = {"all_reduce": STEP * steps, "broadcast": 8320}
    return out


def snapshot() -> dict[str, Any]:
    outside = [{"pid": 4121, "name": "python3", "memory_used": 3 * GIB + GIB // 4, "foreign": True}]
    mine = [{"pid": 5001, "name": "python", "memory_used": 18 * GIB, "foreign": False}]
    nodes = [
        node("node-a", [gpu(0, 91, 18, 70, 450, mine), gpu(1, 88, 18, 69, 441, mine), gpu(2, 0, 0, 35, 60),
                        gpu(3, 0, 3.25, 41, 75, outside)], address="10.0.0.11", jobs=[7]),
        node("node-b", [gpu(0, 95, 18, 71, 460, mine), gpu(1, 93, 18, 70, 455, mine)], address="10.0.0.12",
             jobs=[7]),
        node("node-c", [gpu(0, None, None, None, None, name="NVIDIA A100-SXM4-40GB")], simulated=False,
             state="suspect", address="10.0.0.13", age=7.2, draining=True),
    ]
    jobs = [
        job(7, "ddp-resnet", "running", [("node-a", [0, 1]), ("node-b", [0, 1])], gpus=None, nodes=2, per_node=2,
            started=T0 - 95, by_rank=ddp_traffic(90, silent_rank=3)),
        job(8, "sweep-lr", "pending", gpus=4, reason="needs 4 GPUs; 1 is free on 1 node (node-a 1); 1 more is "
                                                     "held by a process outside gpudeck", priority=5),
        job(9, "eval", "pending", gpus=1, reason="needs 1 GPU; none are free"),
        job(6, "warmup", "succeeded", [("node-a", [2])], gpus=1, started=T0 - 400, ended=T0 - 300, exit_code=0,
            by_rank={"0": {"all_reduce": 1000}}),
        job(5, "bad-config", "failed", [("node-b", [0])], gpus=1, started=T0 - 500, ended=T0 - 490, exit_code=3,
            reason="rank 0 exited with code 3"),
        job(4, "old", "cancelled", [("node-a", [0, 1])], gpus=2, started=T0 - 900, ended=T0 - 800,
            reason="cancelled by a user"),
    ]
    unjoined = [{"name": "gpu-box-7", "address": "10.0.0.17", "gpus": 8,
                 "why": "it offered a wrong join token"}]
    return {"time": T0, "nodes": nodes, "unjoined": unjoined, "jobs": jobs}


def updates(count: int = 5) -> list[dict[str, Any]]:
    """What the coordinator pushes over the next seconds: job 7 keeps training, rank 3 stays silent."""
    base = snapshot()
    out = []
    for second in range(1, count + 1):
        running = copy.deepcopy(base["jobs"][0])
        running["traffic"]["by_rank"] = ddp_traffic(90 + second, silent_rank=3)
        kinds: dict[str, int] = {}
        for ranks in running["traffic"]["by_rank"].values():
            for kind, value in ranks.items():
                kinds[kind] = kinds.get(kind, 0) + value
        running["traffic"]["by_kind"] = kinds
        nodes = copy.deepcopy(base["nodes"][:2])
        for n in nodes:
            for g in n["gpus"]:
                if g["utilization"]:
                    g["utilization"] = max(0, min(100, g["utilization"] + (second * 7 + g["index"] * 3) % 11 - 5))
        out.append({"time": T0 + second, "nodes": nodes, "jobs": [running]})
    return out


LOGS = {7: {"0": b"".join(b"rank 0 step %d loss %.4f\n" % (s, 1.0 / (s + 1)) for s in range(12)),
            "1": b"".join(b"rank 1 step %d loss %.4f\n" % (s, 1.1 / (s + 1)) for s in range(12)),
            "-1": b"[torchrun] starting 2 ranks\n"}}


WORKLOADS = {"data-parallel": "DDP: the whole model on every rank, gradients all-reduced every step",
             "pipeline": "the model cut into one stage per rank (GPipe)"}
