"""The views clients see, from the coordinator's rows and live registry (the types and their field
names, a contract, are declared once in `gpudeck.protocol.payloads`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from gpudeck.coordinator.priority import Factor
from gpudeck.coordinator.registry import Registry
from gpudeck.coordinator.store import CordonRow, JobRow, NodeRow
from gpudeck.protocol.payloads import (
    CordonView, FactorView, ProgressView, JobView, NodeView, OutputFile, TrafficByRank, WarmStatus,
)


def job_view(row: JobRow, traffic: TrafficByRank, outputs: dict[str, list[OutputFile]],
             idle_since: float | None = None, factors: Sequence[Factor] = (),
             estimated_start: float | None = None, progress: ProgressView | None = None) -> JobView:
    """`factors` and `estimated_start`: a pending job's priority terms and planned start
    (`JobControl.standing`); `progress`: a running job's stragglers and hang (coordinator.progress)."""
    return JobView.build(row.id, row.spec, state=row.state.value, reason=row.reason, hosts=row.hosts,
                         restarts=row.restarts, attempt=row.attempt, exit_code=row.exit_code,
                         submitted_at=row.submitted_at, started_at=row.started_at, ended_at=row.ended_at,
                         traffic=traffic, outputs=outputs, owner=row.owner, idle_since=idle_since,
                         estimated_start=estimated_start,
                         priority_factors=[FactorView(f.name, f.value, f.weight, f.contribution) for f in factors],
                         array_job=row.array_job, array_index=row.array_index, progress=progress)


def rank_nodes(row: JobRow) -> Callable[[int], str]:
    """The node each rank of the job's current attempt runs on: ranks are numbered node by node, one
    per GPU (a command: one per node)."""
    nodes = [node for node, gpus in row.hosts for _ in range(1 if row.spec.run.command else max(1, len(gpus)))]
    return lambda rank: nodes[rank] if 0 <= rank < len(nodes) else "an unknown node"


def node_view(node: NodeRow, registry: Registry, jobs: list[int], now: float,
              cordons: Sequence[CordonRow] = ()) -> NodeView:
    """`cordons`: the node's cordoned GPUs (coordinator.health)."""
    link = registry.link(node.name)
    heard = registry.last_heard.get(node.name, node.last_seen)
    return NodeView(
        name=node.name, state=registry.states.get(node.name, node.state).value, draining=node.draining,
        simulated=node.simulated, hostname=node.hostname, address=node.address, connected=link is not None,
        last_heartbeat_age=round(max(0.0, now - heard), 1), jobs=jobs, gpus=link.gpus if link else node.gpus,
        warm=link.warm if link else WarmStatus(),
        cordoned=[CordonView(row.gpu, row.cause, row.since) for row in cordons])
