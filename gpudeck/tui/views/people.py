"""The people view: who holds the cluster's GPUs now, and their share of its GPU time."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static

from gpudeck.output import energy_text, gpu_hours_text
from gpudeck.text import counted, spoken_duration
from gpudeck.tui.model import Changes, Cluster, Person, bar
from gpudeck.tui.table import Column, DeckTable, Palette


PEOPLE_COLUMNS = [
    Column("user", "USER", 8, flex=1, max_width=24),
    Column("gpus", "GPUS NOW", 8, align="right"),
    Column("running", "RUNNING", 7, align="right"),
    Column("pending", "PENDING", 7, align="right"),
    Column("share", "SHARE 7D", 13),
    Column("day", "GPU-H 24H", 9, align="right"),
    Column("week", "GPU-H 7D", 9, align="right"),
    Column("wait", "WAIT 7D", 7, priority=1, align="right"),
    Column("energy", "ENERGY 7D", 12, priority=2, align="right"),
]


class PeopleView(Vertical):
    """One row per user: the GPUs their jobs hold now, their running and pending jobs (from the jobs
    the dashboard watches), their share of the cluster's GPU time over the last 7 days and their
    GPU-hours over the last day and week (from the coordinator's usage figures, refreshed now and then)."""

    def __init__(self, cluster: Cluster, id: str | None = None) -> None:
        super().__init__(id=id)
        self.cluster = cluster
        self.rows: dict[str, Person] = {}
        self.table = DeckTable(PEOPLE_COLUMNS, self._row, id="people-table",
                               empty="nobody has jobs here yet: press s to submit one")
        self.note = Static(classes="preview")

    def compose(self) -> ComposeResult:
        yield self.table
        yield self.note

    def model_changed(self, changes: Changes) -> None:
        if not (changes.reset or changes.job_set or changes.jobs or changes.usage):
            return
        people = self.cluster.people()
        self.rows = {person.user: person for person in people}
        self.table.set_keys([person.user for person in people])
        self.table.refresh()
        self.note.update(self._note(), layout=False)

    def _note(self) -> Text:
        week = self.cluster.usage.get("week")
        if week is None:
            return Text("usage figures are on their way from the coordinator", style="dim")
        text = Text(f"last 7 days: {week.gpu_hours:.1f} GPU-hours in {counted(week.jobs, 'job')}", style="dim")
        if week.mean_wait_s is not None:
            text.append(f", mean wait {spoken_duration(week.mean_wait_s)}", style="dim")
        text.append(" · SHARE is each person's part of it · `gpudeck usage` for every job", style="dim")
        return text

    def _row(self, key: Any, p: Palette) -> dict[str, Any]:
        person = self.rows.get(key)
        if person is None:
            return {}
        week, day = person.week, person.day
        unknown = "…" if not person.known else "0.00"
        share = week.share if week else 0.0
        share_cell = Text(bar(share, 6), style=p.accent)
        share_cell.append(f" {share:4.0%}" if person.known else "    …")
        wait = week.mean_wait_s if week else None
        return {
            "user": Text(person.user or "-", style="bold"), "gpus": str(person.running_gpus),
            "running": str(person.running_jobs),
            "pending": Text(str(person.pending_jobs), style=p.warn if person.pending_jobs else ""),
            "share": share_cell,
            "day": gpu_hours_text(day.gpu_hours) if day else unknown,
            "week": gpu_hours_text(week.gpu_hours) if week else unknown,
            "wait": Text(spoken_duration(wait) if wait is not None else "-", style=p.dim),
            "energy": Text(energy_text(week.energy_j, week.energy_simulated) if week else "-",
                           style=p.dim),
        }
