"""The JSON shapes clients see (`--json` output and the TUI's data). Field names here are a contract."""

from __future__ import annotations

from typing import Any

from gpudeck.coordinator.registry import Registry
from gpudeck.coordinator.store import JobRow, NodeRow

GPU_FIELDS = ("index", "name", "uuid", "memory_total", "memory_used", "utilization", "temperature", "power",
              "power_limit", "processes")


def traffic_view(by_rank: dict[int, dict[str, int]]) -> dict[str, Any]:
    by_kind: dict[str, int] = {}
    for kinds in by_rank.values():
        for kind, count in kinds.items():
            by_kind[kind] = by_kind.get(kind, 0) + count
    return {"by_kind": dict(sorted(by_kind.items())),
            "by_rank": {str(rank): dict(sorted(kinds.items())) for rank, kinds in sorted(by_rank.items())}}


def job_view(row: JobRow, traffic: dict[int, dict[str, int]]) -> dict[str, Any]:
    spec = row.spec
    return {
        "id": row.id,
        "name": spec.name,
        "state": row.state.value,
        "reason": row.reason,
        "nodes": [node for node, _ in row.hosts],
        "gpus": spec.gpus if spec.gpus is not None else (spec.nodes or 0) * (spec.gpus_per_node or 0),
        "placement": [{"node": node, "node_rank": rank, "gpus": gpus} for rank, (node, gpus) in enumerate(row.hosts)],
        "request": {"gpus": spec.gpus, "nodes": spec.nodes, "gpus_per_node": spec.gpus_per_node},
        "command": [spec.script_name or f"--workload {spec.workload}", *spec.args],
        "priority": spec.priority,
        "time_limit": spec.time_limit,
        "max_restarts": spec.max_restarts,
        "restarts": row.restarts,
        "attempt": row.attempt,
        "exit_code": row.exit_code,
        "submitted_at": row.submitted_at,
        "started_at": row.started_at,
        "ended_at": row.ended_at,
        "traffic": traffic_view(traffic),
    }


def node_view(node: NodeRow, registry: Registry, jobs: list[int], now: float) -> dict[str, Any]:
    link = registry.link(node.name)
    gpus = link.gpus if link else node.gpus
    heard = registry.last_heard.get(node.name, node.last_seen)
    return {
        "name": node.name,
        "state": registry.states.get(node.name, node.state).value,
        "draining": node.draining,
        "simulated": node.simulated,
        "hostname": node.hostname,
        "address": node.address,
        "connected": link is not None,
        "last_heartbeat_age": round(max(0.0, now - heard), 1),
        "jobs": jobs,
        "gpus": [{k: g.get(k) for k in GPU_FIELDS} for g in gpus],
    }
