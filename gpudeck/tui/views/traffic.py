"""The traffic view: each active job's collective traffic, and the ranks off pace."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical

from gpudeck.arrays import job_label
from gpudeck.protocol.views import JobView
from gpudeck.text import human_bytes, rate
from gpudeck.tui.model import ACTIVE_STATES, Changes, Cluster, JobTraffic, rank_health, rank_places, sparkline
from gpudeck.tui.table import Column, DeckTable, Palette
from gpudeck.tui.widgets.traffic import TotalTraffic


TRAFFIC_COLUMNS = [
    Column("id", "ID", 4, align="right"),
    Column("name", "NAME", 10, flex=1, max_width=30),
    Column("ranks", "RANKS", 5, align="right"),
    Column("rate", "RATE", 10, align="right"),
    Column("history", "HISTORY", 12, flex=2, max_width=60),
    Column("kinds", "BY KIND", 16, priority=1, flex=2),
    Column("health", "RANKS OFF PACE", 14, flex=1),
]


class TrafficView(Vertical):
    """Every running job's parameter-sync traffic, side by side, with the cluster total on top."""

    def __init__(self, cluster: Cluster, id: str | None = None) -> None:
        super().__init__(id=id)
        self.cluster = cluster
        self.total = TotalTraffic(id="traffic-total")
        self.table = DeckTable(TRAFFIC_COLUMNS, self._row, id="traffic-table",
                               empty="no job is running: press s to submit one")

    def compose(self) -> ComposeResult:
        yield self.total
        yield self.table

    def model_changed(self, changes: Changes) -> None:
        if changes.reset or changes.job_set:
            self.table.set_keys([job.id for job in self.cluster.sorted_jobs() if job.state in ACTIVE_STATES])
        if changes.traffic or changes.reset:
            kinds: dict[str, float] = {}
            for job in self.cluster.active_jobs():
                traffic = self.cluster.traffic.get(job.id)
                for kind, value in (traffic.kind_rates() if traffic else {}).items():
                    kinds[kind] = kinds.get(kind, 0.0) + value
            recent = list(self.cluster.cluster_rate)[-3:]
            self.total.data = (sum(recent) / len(recent) if recent else 0.0, tuple(self.cluster.cluster_rate),
                               tuple(sorted(kinds.items(), key=lambda kv: -kv[1])))
            self.table.refresh()

    def selected_job(self) -> JobView | None:
        key = self.table.cursor_key
        return self.cluster.jobs.get(key) if key is not None else None

    def _row(self, key: Any, p: Palette) -> dict[str, Any]:
        job = self.cluster.jobs.get(key)
        if job is None:
            return {}
        traffic = self.cluster.traffic.get(key)
        places = rank_places(job)
        kinds = traffic.kind_rates() if traffic else {}
        health = rank_health(places, traffic.rank_rates() if traffic else {}, job.state == "running")
        off = [f"{r} {flag}" for r, flag in sorted(health.items()) if flag]
        return {
            "id": job_label(job.id, job.array_job, job.array_index), "name": job.name,
            "ranks": str(len(places)),
            "rate": rate(sum(kinds.values())),
            "history": Text(sparkline(traffic.series() if traffic else [], self.table.column_width("history")),
                            style=p.accent),
            "kinds": ", ".join(f"{k} {rate(v)}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]) if v)
                     or _quiet(traffic, p),
            "health": Text("rank " + ", ".join(off), style=p.bad) if off else Text("-", style=p.dim),
        }


def _quiet(traffic: JobTraffic | None, p: Palette) -> Text:
    """A job sending nothing now: what it has sent so far, or that it has not reported yet."""
    sent = sum(count for kinds in (traffic.latest.values() if traffic else ()) for count in kinds.values())
    return Text(f"quiet now; sent {human_bytes(sent)} so far" if sent else "no traffic reported yet", style=p.dim)
