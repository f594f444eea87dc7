"""The values inside the messages between agents and the coordinator: GPU readings and what an
agent holds. Agents build `GpuReading` and `JobReport`; `messages.decode` rebuilds them on the
coordinator.

The views clients see (nodes, jobs, usage) and the GPU readings inside a node's view live in
`gpudeck.protocol.views`, which a client command loads without the messages of the nodes; they are
named here too, for the coordinator and the agents.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpudeck.protocol.views import (
    CordonView as CordonView,
    FactorView as FactorView,
    GpuProcess as GpuProcess,
    GpuReading as GpuReading,
    HangView as HangView,
    JobUsage as JobUsage,
    JobView as JobView,
    MAX_USAGE_JOBS as MAX_USAGE_JOBS,
    NodeView as NodeView,
    OutputFile as OutputFile,
    PlacementView as PlacementView,
    ProgressView as ProgressView,
    ProjectView as ProjectView,
    RequestView as RequestView,
    TrafficByRank as TrafficByRank,
    TrafficView as TrafficView,
    UsageView as UsageView,
    UserUsage as UserUsage,
    WarmStatus as WarmStatus,
)


@dataclass(frozen=True)
class JobReport:
    """One job attempt an agent holds, in its register: running (exit_code None) or ended while the
    coordinator was away, with what it would have said in `job_exited`."""

    job: int
    attempt: int
    exit_code: int | None = None
    detail: str = ""
    retry: bool = False
    failed_at: float | None = None
