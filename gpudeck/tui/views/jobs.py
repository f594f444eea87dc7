"""The jobs view: running first, then the queue in the order it is served, then history."""

from __future__ import annotations

import time
from typing import Any, Hashable

from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.reactive import reactive

from gpudeck.arrays import job_label
from gpudeck.protocol.views import JobView
from gpudeck.text import idle_note
from gpudeck.tui.model import ACTIVE_STATES, Changes, Cluster, asked_text, matches, request_text
from gpudeck.tui.table import Column, DeckTable, Palette
from gpudeck.tui.views.filtered import FilteredView
from gpudeck.tui.widgets.filter_bar import FilterBar


JOB_COLUMNS = [
    Column("id", "ID", 4, align="right"),
    Column("name", "NAME", 10, flex=1, max_width=30),
    Column("owner", "OWNER", 5, priority=3, max_width=16),
    Column("state", "STATE", 9),
    Column("gpus", "GPUS", 5, align="right"),
    Column("nodes", "NODES", 13, priority=1, flex=1, max_width=40),
    Column("runtime", "RUNTIME", 7, align="right"),
    Column("attempt", "ATT", 3, priority=2, align="right"),
    Column("exit", "EXIT", 4, align="right"),
    Column("priority", "PRIO", 4, priority=4, align="right"),
    Column("info", "REASON / COMMAND", 14, flex=3),
]

JOB_STATE_STYLE = {"pending": "warn", "starting": "accent", "running": "good", "succeeded": "dim",
                   "failed": "bad", "cancelled": "dim"}


class JobsView(FilteredView):
    """The queue (running, then pending in the order they will be served) and history, newest first."""

    kind = "job"
    mine_only: reactive[bool] = reactive(False)

    def __init__(self, cluster: Cluster, id: str | None = None) -> None:
        super().__init__(cluster, id=id)
        self.me = ""  # the user this dashboard's token belongs to
        self.table = DeckTable(JOB_COLUMNS, self._row, version=self._version, id="jobs-table",
                               empty="no jobs yet: press s to submit one")

    def watch_mine_only(self) -> None:
        self.rebuild()

    def compose(self) -> ComposeResult:
        yield self.table
        yield self.preview
        yield FilterBar("jobs", id="jobs-filter")

    def rebuild(self) -> None:
        mine = self.mine_only
        self.table.empty = (f"none of the jobs are yours ({self.me}): m shows everyone's" if mine
                            else "no jobs yet: press s to submit one")
        self.table.set_keys([job.id for job in self.cluster.sorted_jobs()
                             if matches(self.filter_text, job) and (not mine or self._mine(job))])

    def _mine(self, job: JobView) -> bool:
        return bool(self.me) and job.owner == self.me

    def model_changed(self, changes: Changes) -> None:
        if changes.reset or changes.job_set:
            self.rebuild()
        else:
            self.table.refresh_keys(changes.jobs)
        if changes.reset or self.table.cursor_key in changes.jobs:
            self.update_preview()

    def selected_job(self) -> JobView | None:
        key = self.table.cursor_key
        return self.cluster.jobs.get(key) if key is not None else None

    def describe(self, key: Any) -> Text:
        job = self.cluster.jobs.get(key)
        text = Text()
        if job is None:
            return text
        text.append(f"job {job.id} {job.name}", style="bold")
        text.append(f" {job.state}")
        if job.reason:
            text.append(f": {job.reason}")
        if job.idle_since is not None and job.state == "running":
            text.append(f": {idle_note(job.idle_since, self.cluster.now())}", style="bold")
        submitted = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.submitted_at))
        text.append(f"\n$ {' '.join(job.command)} · asked {asked_text(job)} · priority "
                    f"{job.priority} · submitted {submitted}", style="dim")
        return text

    def _version(self, key: Any) -> Hashable:
        job = self.cluster.jobs.get(key)
        ticking = job is not None and job.state in ACTIVE_STATES
        return (self.cluster.job_version.get(key), int(self.cluster.now()) if ticking else 0)

    def _row(self, key: Any, p: Palette) -> dict[str, Any]:
        job = self.cluster.jobs.get(key)
        if job is None:
            return {}
        state = job.state
        if state in ("pending", "failed") or (state == "cancelled" and job.reason):
            info = Text(job.reason or "", style=p.warn if state == "pending" else p.dim)
        elif state == "running" and job.progress and job.progress.hung:
            info = Text(job.progress.hung.sentence, style=p.bad)
        elif state == "running" and job.idle_since is not None:
            info = Text(idle_note(job.idle_since, self.cluster.now()), style=p.warn)
        elif state == "running" and job.progress and job.progress.straggler:
            info = Text(job.progress.straggler, style=p.warn)
        else:
            info = Text(" ".join(job.command), style=p.dim)
        exit_code = job.exit_code
        return {
            "id": job_label(job.id, job.array_job, job.array_index), "name": job.name,
            "owner": Text(job.owner or "-", style=p.accent + Style(bold=True) if self._mine(job) else ""),
            "state": Text("hung", style=p.bad) if state == "running" and job.progress and job.progress.hung
            else Text(state, style=getattr(p, JOB_STATE_STYLE.get(state, "dim"))),
            "gpus": request_text(job), "nodes": ",".join(job.nodes) or "-",
            "runtime": self.cluster.runtime(job), "attempt": str(job.attempt),
            "exit": Text("-" if exit_code is None else str(exit_code), style=p.bad if exit_code else ""),
            "priority": str(job.priority), "info": info,
        }
