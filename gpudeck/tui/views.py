"""The three main views (nodes, jobs, traffic). Each renders the model it is given and repaints only
the rows a change touched; none does I/O."""

from __future__ import annotations

import time
from typing import Any, Hashable

from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.reactive import reactive
from textual.widget import Widget
from textual import events
from textual.css.query import NoMatches
from textual.dom import NoScreen
from textual.widgets import Header, Input, Static
from textual.widgets._header import HeaderTitle

from gpudeck.arrays import job_label
from gpudeck.output import energy_text, gpu_hours_text
from gpudeck.text import counted, human_bytes, idle_note, rate, spoken_duration, visible
from gpudeck.tui.model import (
    ACTIVE_STATES, Changes, Cluster, Person, JobTraffic, age, asked_text, bar, cordon_of, describe_process,
    foreign_processes,
    gib, matches, rank_health, rank_places, request_text, sparkline,
)
from gpudeck.tui.table import SPAN, SPAN_FROM, Column, DeckTable, Palette

EXPAND_UP_TO_GPUS = 64  # clusters this small show every GPU from the start, as nvitop does
HEARTBEAT_LATE = 5.0


class FilterBar(Input):
    """The `/` filter: hidden until asked for; every word typed must match."""

    class Done(Message):
        """Enter (keep the filter) or escape (clear it) was pressed."""

        def __init__(self, bar: "FilterBar", keep: bool) -> None:
            super().__init__()
            self.bar = bar
            self.keep = keep

    BINDINGS = [("escape", "clear_filter", "Clear filter")]

    def __init__(self, what: str, id: str | None = None) -> None:
        super().__init__(placeholder=f"filter {what}: words to match (enter keeps it, esc clears)", id=id,
                         classes="filter-bar")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.post_message(self.Done(self, keep=True))

    def action_clear_filter(self) -> None:
        self.value = ""
        self.post_message(self.Done(self, keep=False))


class FilteredView(Vertical):
    """A table with a filter bar under it."""

    filter_text: reactive[str] = reactive("")
    kind = ""
    table: DeckTable

    def __init__(self, cluster: Cluster, id: str | None = None) -> None:
        super().__init__(id=id)
        self.cluster = cluster
        self.preview = Static(classes="preview")

    def show_filter(self) -> None:
        bar = self.query_one(FilterBar)
        bar.add_class("-shown")
        bar.focus()

    def clear_filter(self) -> None:
        bar = self.query_one(FilterBar)
        bar.value = ""
        bar.remove_class("-shown")
        self.filter_text = ""

    def on_input_changed(self, event: Input.Changed) -> None:
        if isinstance(event.input, FilterBar):
            self.filter_text = event.value
            event.stop()

    def on_filter_bar_done(self, event: FilterBar.Done) -> None:
        if not event.keep or not self.filter_text:
            event.bar.remove_class("-shown")
        self.table.focus()

    def watch_filter_text(self) -> None:
        self.rebuild()

    def on_deck_table_highlighted(self, event: DeckTable.Highlighted) -> None:
        self.update_preview()

    def update_preview(self) -> None:
        """The highlighted row in full, under the table: what a narrow column had to cut."""
        key = self.table.cursor_key
        self.preview.update(self.describe(key) if key is not None else "", layout=False)  # its height is fixed
        self.preview.display = key is not None

    def describe(self, key: Any) -> Text:  # pragma: no cover - every view defines it
        raise NotImplementedError

    def rebuild(self) -> None:  # pragma: no cover - every view defines it
        raise NotImplementedError


# --- nodes -------------------------------------------------------------------------------------------

NODE_COLUMNS = [
    Column("name", "NAME", 12, flex=2, max_width=28),
    Column("state", "STATE", 8),
    Column("gpus", "GPUS", 6),
    Column("util", "UTIL", 9),
    Column("memory", "MEMORY", 12, priority=1),
    Column("history", "HISTORY", 8, priority=3, flex=1, max_width=40),
    Column("temp", "TEMP", 4, priority=4, align="right"),
    Column("power", "POWER", 5, priority=5, align="right"),
    Column("address", "ADDRESS", 15, priority=6),  # the first to go: a narrow terminal keeps temperature and power
    Column("heartbeat", "SEEN", 4, align="right"),
    Column("jobs", "JOBS / PROCESSES", 6, flex=2),
]

STATE_STYLE = {"up": "good", "suspect": "warn", "down": "bad", "unjoined": "warn"}
READING_COLUMNS = {"util", "memory", "history", "temp", "power"}


def _watts(value: float) -> str:
    return f"{value / 1000:.1f}kW" if value >= 10000 else f"{value:.0f}W"


class NodesView(FilteredView):
    """One row per node, expandable to one row per GPU; agents seen but not joined at the bottom."""

    kind = "node"

    def __init__(self, cluster: Cluster, id: str | None = None, local_node: str | None = None) -> None:
        super().__init__(cluster, id=id)
        self.local_node = local_node  # the agent `gpudeck up` starts beside the dashboard
        self.expanded: set[str] = set()
        self.collapsed: set[str] = set()
        self.expand_all = True
        self.sized = False
        self.table = DeckTable(NODE_COLUMNS, self._row, version=self._version, id="nodes-table",
                               empty=self._nothing_joined())

    def compose(self) -> ComposeResult:
        yield self.table
        yield self.preview
        yield FilterBar("nodes", id="nodes-filter")

    # --- rows --------------------------------------------------------------------------------------

    def is_expanded(self, name: str) -> bool:
        return name in self.expanded or (self.expand_all and name not in self.collapsed)

    def _nothing_joined(self) -> str:
        if self.local_node:
            return f"the local agent ({self.local_node}) is starting; its GPUs appear here once it has joined"
        return "no nodes have joined yet: run `gpudeck agent` on each GPU machine (or `gpudeck up` on this one)"

    def rebuild(self) -> None:
        self.table.empty = (f"no nodes match {self.filter_text.strip()!r} (esc in the filter clears it)"
                            if self.filter_text.strip() and self.cluster.nodes else self._nothing_joined())
        keys: list[Hashable] = []
        for name in self.cluster.node_names():
            node = self.cluster.nodes[name]
            if not matches(self.filter_text, node, "node"):
                continue
            keys.append(("node", name))
            if self.is_expanded(name):
                keys += [("gpu", name, gpu["index"]) for gpu in node["gpus"]]
        unjoined = [u for u in self.cluster.unjoined
                    if not self.filter_text or all(w in f"{u['name']} {u['address']} unjoined".lower()
                                                   for w in self.filter_text.lower().split())]
        if unjoined:
            keys.append(("section", "unjoined"))
            keys += [("unjoined", u["name"]) for u in unjoined]
        self.table.set_keys(keys)

    def model_changed(self, changes: Changes) -> None:
        if changes.reset and not self.sized:  # the first snapshot; a reconnect keeps what the user opened
            self.sized = True
            self.expand_all = sum(len(n["gpus"]) for n in self.cluster.nodes.values()) <= EXPAND_UP_TO_GPUS
        if changes.reset or changes.node_set or changes.unjoined:
            self.rebuild()
            self.update_preview()
            return
        selected = self.selected_node()
        if selected in changes.nodes:
            self.update_preview()
        keys: list[Hashable] = []
        for name in changes.nodes:
            keys.append(("node", name))
            if self.is_expanded(name) and name in self.cluster.nodes:
                keys += [("gpu", name, gpu["index"]) for gpu in self.cluster.nodes[name]["gpus"]]
        self.table.refresh_keys(keys)

    def toggle(self, name: str) -> None:
        if self.is_expanded(name):
            self.expanded.discard(name)
            self.collapsed.add(name)
        else:
            self.collapsed.discard(name)
            self.expanded.add(name)
        self.rebuild()

    def toggle_all(self) -> None:
        self.expand_all = not self.expand_all
        self.expanded.clear()
        self.collapsed.clear()
        self.rebuild()

    def selected_node(self) -> str | None:
        key = self.table.cursor_key
        return key[1] if key and key[0] in ("node", "gpu") else None

    def on_deck_table_selected(self, event: DeckTable.Selected) -> None:
        """Enter on a node shows or hides its GPUs; on a GPU it stays put (the preview has its detail)."""
        if event.key and event.key[0] == "node":
            self.toggle(event.key[1])
            self.table.move_to(("node", event.key[1]))

    def describe(self, key: Any) -> Text:
        text = Text()
        if key[0] in ("section", "unjoined"):
            for advert in self.cluster.unjoined:
                if key[0] == "section" or advert["name"] == key[1]:
                    gpus = counted(advert["gpus"], "GPU") if isinstance(advert.get("gpus"), int) else "? GPUs"
                    text.append(f"{advert['name']} at {advert['address']} ({gpus}) has not "
                                f"joined: {advert['why']}\n")
            text.rstrip()
            return text
        node = self.cluster.nodes.get(key[1])
        if node is None:
            return text
        sim = " SIM" if node.get("simulated") else ""
        if key[0] == "node":
            text.append(key[1], style="bold")
            text.append(f" ({node.get('hostname')}, {node.get('address')}) {node['state']}"
                        + (", draining" if node.get("draining") else "")
                        + f" · {counted(len(node['gpus']), sim.strip() + ' GPU' if sim else 'GPU')}"
                        f" · jobs {','.join(map(str, node.get('jobs', []))) or 'none'}"
                        + f" · heartbeat {age(self.cluster.heartbeat_age(key[1]))} ago")
            outside = [(g["index"], p) for g in node["gpus"] for p in foreign_processes(g)]
            for index, process in outside:
                text.append(f"\nGPU {index}: ! outside gpudeck: {describe_process(process)}")
            for cordon in node.get("cordoned", []):
                text.append(f"\nGPU {cordon['gpu']}: cordoned, no new jobs: {cordon['cause']}")
            return text
        gpu = next((g for g in node["gpus"] if g["index"] == key[2]), None)
        if gpu is None:
            return text
        text.append(f"{key[1]} GPU {key[2]}{sim}", style="bold")
        text.append(f" {gpu.get('name')} · {gpu.get('uuid')}")
        job = self.cluster.gpu_jobs.get((key[1], key[2]))
        if job is not None:
            text.append(f" · job {job} {self.cluster.jobs.get(job, {}).get('name', '')}")
        power = gpu.get("power")
        limit = gpu.get("power_limit")
        if power is not None:
            text.append(f" · {power:.0f}W" + (f" of {limit:.0f}W" if limit else ""))
        cordon = cordon_of(node, key[2])
        if cordon is not None:
            text.append(f"\ncordoned for {spoken_duration(self.cluster.now() - cordon['since'])} "
                        f"(`gpudeck gpu uncordon {key[1]}:{key[2]}` offers it again): {cordon['cause']}")
        for process in gpu.get("processes") or []:
            mark = "! outside gpudeck: " if process.get("foreign") else ""
            text.append(f"\n{mark}{describe_process(process)}")
        return text

    def _version(self, key: Any) -> Hashable:
        if key[0] in ("node", "gpu"):
            name = key[1]
            version = (self.cluster.node_version.get(name), self.cluster.placement_version, self.cluster.connected)
            if key[0] == "node":
                seen = int(self.cluster.heartbeat_age(name)) if name in self.cluster.nodes else 0
                return (*version, self.is_expanded(name), seen)
            return version
        return (id(self.cluster.unjoined), len(self.cluster.unjoined))

    def _row(self, key: Any, p: Palette) -> dict[str, Any]:
        if key[0] == "node":
            return self._node_cells(key[1], p)
        if key[0] == "gpu":
            return self._gpu_cells(key[1], key[2], p)
        if key[0] == "section":
            return {SPAN_FROM: "name", SPAN: Text(f"seen on the network, not joined ({len(self.cluster.unjoined)})",
                                                  style=p.section)}
        advert = next((u for u in self.cluster.unjoined if u["name"] == key[1]), None)
        if advert is None:
            return {}
        return {"name": advert["name"], "state": Text("unjoined", style=p.warn), "gpus": str(advert.get("gpus", "?")),
                SPAN_FROM: "util", SPAN: Text(f"{advert['address']}: {advert['why']}", style=p.dim)}

    def _node_cells(self, name: str, p: Palette) -> dict[str, Any]:
        node = self.cluster.nodes.get(name)
        if node is None:
            return {}
        gpus = node["gpus"]
        utils = [g["utilization"] for g in gpus if g.get("utilization") is not None]
        used = [g["memory_used"] for g in gpus if g.get("memory_used") is not None]
        total = [g["memory_total"] for g in gpus if g.get("memory_total") is not None]
        temps = [g["temperature"] for g in gpus if g.get("temperature") is not None]
        power = [g["power"] for g in gpus if g.get("power") is not None]
        state = "draining" if node.get("draining") and node["state"] == "up" else node["state"]
        seen = self.cluster.heartbeat_age(name)
        marker = "▾ " if self.is_expanded(name) else "▸ "
        gpus_cell = Text(str(len(gpus)))
        if node.get("simulated"):
            gpus_cell.append(" SIM", style=p.sim)
        foreign = sum(1 for g in gpus if foreign_processes(g))
        jobs = Text(",".join(map(str, node.get("jobs", []))) or "-")
        if node.get("draining") and state != "draining":
            jobs.append(" draining", style=p.warn)
        if foreign:
            jobs.append(f" !{foreign} outside", style=p.bad)
        if node.get("cordoned"):
            jobs.append(f" x{len(node['cordoned'])} cordoned", style=p.bad)
        util = sum(utils) / len(utils) if utils else None
        stale = node["state"] == "down"
        if stale:
            jobs = Text("stale ", style=p.warn) + jobs
        return self._dim_readings(stale, p, {
            "name": Text(marker + name, style="bold"),
            "state": Text(state, style=getattr(p, STATE_STYLE.get(node["state"], "warn"))
                          if state != "draining" else p.warn),
            "gpus": gpus_cell,
            "util": self._util(util, p),
            "memory": self._memory(sum(used) if used else None, sum(total) if total else None, p),
            "temp": f"{max(temps):.0f}C" if temps else "n/a",
            "power": _watts(sum(power)) if power else "n/a",
            "history": Text(sparkline(self.cluster.node_util.get(name, []), self.table.column_width("history"), 100),
                            style=p.accent),
            "address": node.get("address", ""),
            "heartbeat": Text(age(seen), style=p.warn if seen > HEARTBEAT_LATE else p.dim),
            "jobs": jobs,
        })

    @staticmethod
    def _dim_readings(stale: bool, p: Palette, cells: dict[str, Any]) -> dict[str, Any]:
        """A down node's last readings, dimmed: they are what it said before it stopped answering."""
        if stale:
            for key in READING_COLUMNS & cells.keys():
                cells[key] = Text(cells[key].plain if isinstance(cells[key], Text) else cells[key], style=p.dim)
        return cells

    def _gpu_cells(self, name: str, index: int, p: Palette) -> dict[str, Any]:
        node = self.cluster.nodes.get(name)
        gpu = next((g for g in node["gpus"] if g["index"] == index), None) if node else None
        if node is None or gpu is None:
            return {}
        job = self.cluster.gpu_jobs.get((name, index))
        foreign = foreign_processes(gpu)
        label = Text(f"  {index} ")
        if node.get("simulated"):
            label.append("SIM ", style=p.sim)
        gpu_name = (gpu.get("name") or "GPU").removeprefix("NVIDIA ")
        if not (node.get("simulated") and gpu_name.startswith("Simulated")):
            label.append(gpu_name, style=p.dim)
        stale = node["state"] == "down"
        cordon = cordon_of(node, index)
        if stale:
            state, style = "stale", p.warn
        elif cordon is not None:
            state, style = "cordoned", p.bad
        elif foreign:
            state, style = "outside", p.bad
        elif job is not None:
            state, style = "busy", p.good
        else:
            state, style = "idle", p.dim
        use = Text()
        if job is not None:
            use.append(f"job {job}")
            name_of = self.cluster.jobs.get(job, {}).get("name")
            if name_of:
                use.append(f" {name_of}", style=p.dim)
        if foreign:
            if use:
                use.append("  ")
            more = f" +{len(foreign) - 1}" if len(foreign) > 1 else ""
            use.append(f"! outside gpudeck: {describe_process(foreign[0])}{more}", style=p.bad)
        if cordon is not None:
            if use:
                use.append("  ")
            use.append(f"cordoned: {cordon['cause']}", style=p.bad)
        temp = f"{gpu['temperature']:.0f}C" if gpu.get("temperature") is not None else "n/a"
        power = _watts(gpu["power"]) if gpu.get("power") is not None else "n/a"
        cells = {
            "name": label, "state": Text(state, style=style), "gpus": "",
            "util": self._util(gpu.get("utilization"), p),
            "memory": self._memory(gpu.get("memory_used"), gpu.get("memory_total"), p),
            "temp": temp, "power": power,
            "history": Text(sparkline(self.cluster.gpu_util.get((name, index), []),
                                      self.table.column_width("history"), 100),
                            style=p.accent),
        }
        # Node-level columns are empty on a GPU row: what uses the GPU gets the rest of the line.
        rest = Text()
        if not self.table.column_width("temp"):
            rest.append(f"{temp} {power}  ", style=p.dim)
        rest.append_text(use or Text("-", style=p.dim))
        cells[SPAN_FROM] = "address"
        cells[SPAN] = rest
        return self._dim_readings(stale, p, cells)

    @staticmethod
    def _util(value: float | None, p: Palette) -> Text:
        if value is None:
            return Text("n/a", style=p.dim)
        text = Text(bar(value / 100, 4), style=p.accent)
        text.append(f"{value:4.0f}%")
        return text

    @staticmethod
    def _memory(used: int | None, total: int | None, p: Palette) -> Text:
        if used is None or not total:
            return Text("n/a", style=p.dim)
        text = Text(bar(used / total, 3), style=p.accent)
        text.append(f" {gib(used)}/{gib(total)}G")
        return text


# --- jobs ----------------------------------------------------------------------------------------------

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
        self.table.set_keys([job["id"] for job in self.cluster.sorted_jobs()
                             if matches(self.filter_text, job, "job") and (not mine or self._mine(job))])

    def _mine(self, job: dict[str, Any]) -> bool:
        return bool(self.me) and job.get("owner") == self.me

    def model_changed(self, changes: Changes) -> None:
        if changes.reset or changes.job_set:
            self.rebuild()
        else:
            self.table.refresh_keys(changes.jobs)
        if changes.reset or self.table.cursor_key in changes.jobs:
            self.update_preview()

    def selected_job(self) -> dict[str, Any] | None:
        key = self.table.cursor_key
        return self.cluster.jobs.get(key) if key is not None else None

    def describe(self, key: Any) -> Text:
        job = self.cluster.jobs.get(key)
        text = Text()
        if job is None:
            return text
        text.append(f"job {job['id']} {job['name']}", style="bold")
        text.append(f" {job['state']}")
        if job.get("reason"):
            text.append(f": {job['reason']}")
        if job.get("idle_since") is not None and job["state"] == "running":
            text.append(f": {idle_note(job['idle_since'], self.cluster.now())}", style="bold")
        submitted = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job["submitted_at"]))
        text.append(f"\n$ {' '.join(job.get('command', []))} · asked {asked_text(job)} · priority "
                    f"{job.get('priority', 0)} · submitted {submitted}", style="dim")
        return text

    def _version(self, key: Any) -> Hashable:
        job = self.cluster.jobs.get(key)
        ticking = job is not None and job["state"] in ACTIVE_STATES
        return (self.cluster.job_version.get(key), int(self.cluster.now()) if ticking else 0)

    def _row(self, key: Any, p: Palette) -> dict[str, Any]:
        job = self.cluster.jobs.get(key)
        if job is None:
            return {}
        state = job["state"]
        if state in ("pending", "failed") or (state == "cancelled" and job.get("reason")):
            info = Text(job.get("reason") or "", style=p.warn if state == "pending" else p.dim)
        elif state == "running" and (job.get("progress") or {}).get("hung"):
            info = Text(job["progress"]["hung"]["sentence"], style=p.bad)
        elif state == "running" and job.get("idle_since") is not None:
            info = Text(idle_note(job["idle_since"], self.cluster.now()), style=p.warn)
        elif state == "running" and (job.get("progress") or {}).get("straggler"):
            info = Text(job["progress"]["straggler"], style=p.warn)
        else:
            info = Text(" ".join(job.get("command", [])), style=p.dim)
        exit_code = job.get("exit_code")
        return {
            "id": job_label(job["id"], job.get("array_job"), job.get("array_index")), "name": job["name"],
            "owner": Text(job.get("owner") or "-", style=p.accent + Style(bold=True) if self._mine(job) else ""),
            "state": Text("hung", style=p.bad) if state == "running" and (job.get("progress") or {}).get("hung")
            else Text(state, style=getattr(p, JOB_STATE_STYLE.get(state, "dim"))),
            "gpus": request_text(job), "nodes": ",".join(job.get("nodes", [])) or "-",
            "runtime": self.cluster.runtime(job), "attempt": str(job.get("attempt", "")),
            "exit": Text("-" if exit_code is None else str(exit_code), style=p.bad if exit_code else ""),
            "priority": str(job.get("priority", 0)), "info": info,
        }


# --- people --------------------------------------------------------------------------------------------

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
        text = Text(f"last 7 days: {week['gpu_hours']:.1f} GPU-hours in {counted(week['jobs'], 'job')}", style="dim")
        if week.get("mean_wait_s") is not None:
            text.append(f", mean wait {spoken_duration(week['mean_wait_s'])}", style="dim")
        text.append(" · SHARE is each person's part of it · `gpudeck usage` for every job", style="dim")
        return text

    def _row(self, key: Any, p: Palette) -> dict[str, Any]:
        person = self.rows.get(key)
        if person is None:
            return {}
        week, day = person.week or {}, person.day or {}
        unknown = "…" if not person.known else "0.00"
        share = week.get("share", 0.0)
        share_cell = Text(bar(share, 6), style=p.accent)
        share_cell.append(f" {share:4.0%}" if person.known else "    …")
        wait = week.get("mean_wait_s")
        return {
            "user": Text(person.user or "-", style="bold"), "gpus": str(person.running_gpus),
            "running": str(person.running_jobs),
            "pending": Text(str(person.pending_jobs), style=p.warn if person.pending_jobs else ""),
            "share": share_cell,
            "day": gpu_hours_text(day["gpu_hours"]) if day else unknown,
            "week": gpu_hours_text(week["gpu_hours"]) if week else unknown,
            "wait": Text(spoken_duration(wait) if wait is not None else "-", style=p.dim),
            "energy": Text(energy_text(week.get("energy_j"), week.get("energy_simulated", False)) if week else "-",
                           style=p.dim),
        }


# --- traffic -------------------------------------------------------------------------------------------


class TotalTraffic(Widget):
    """The cluster's sync traffic: total rate, its history, and the split by kind."""

    data: reactive[tuple[float, tuple[float, ...], tuple[tuple[str, float], ...]]] = reactive((0.0, (), ()))

    def render(self) -> Text:
        total, series, kinds = self.data
        width = max(10, self.size.width - 30)
        text = Text()
        text.append("cluster total ", style="bold")
        text.append(f"{rate(total):>11}  ")
        text.append(sparkline(series, width))
        text.append("\n")
        if kinds:
            text.append("  ·  ".join(f"{kind} {rate(value)}" for kind, value in kinds))
        else:
            text.append("no running job reports traffic", style="dim")
        return text


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
            self.table.set_keys([job["id"] for job in self.cluster.sorted_jobs() if job["state"] in ACTIVE_STATES])
        if changes.traffic or changes.reset:
            kinds: dict[str, float] = {}
            for job in self.cluster.active_jobs():
                traffic = self.cluster.traffic.get(job["id"])
                for kind, value in (traffic.kind_rates() if traffic else {}).items():
                    kinds[kind] = kinds.get(kind, 0.0) + value
            recent = list(self.cluster.cluster_rate)[-3:]
            self.total.data = (sum(recent) / len(recent) if recent else 0.0, tuple(self.cluster.cluster_rate),
                               tuple(sorted(kinds.items(), key=lambda kv: -kv[1])))
            self.table.refresh()

    def selected_job(self) -> dict[str, Any] | None:
        key = self.table.cursor_key
        return self.cluster.jobs.get(key) if key is not None else None

    def _row(self, key: Any, p: Palette) -> dict[str, Any]:
        job = self.cluster.jobs.get(key)
        if job is None:
            return {}
        traffic = self.cluster.traffic.get(key)
        places = rank_places(job)
        kinds = traffic.kind_rates() if traffic else {}
        health = rank_health(places, traffic.rank_rates() if traffic else {}, job["state"] == "running")
        off = [f"{r} {flag}" for r, flag in sorted(health.items()) if flag]
        return {
            "id": job_label(job["id"], job.get("array_job"), job.get("array_index")), "name": job["name"],
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


class Banner(Static):
    """Connection trouble, shown above the views while it lasts."""

    def say(self, text: str) -> None:
        """Show `text` as written: it quotes errors, which quote what peers wrote, so a '[' in it is
        not markup and its control characters are made visible."""
        self.update(Text(visible(text)))


class DeckHeader(Header):
    """Textual's Header, without its crash on a short-lived screen: its title watchers run later, and
    when the screen was dismissed meanwhile (the not-found screen closes the moment a coordinator
    answers) the header has lost its children and Textual's `query_one` raises `NoMatches`."""

    def _on_mount(self, event: events.Mount) -> None:
        event.prevent_default()

        async def set_title() -> None:
            try:
                self.query_one(HeaderTitle).update(self.format_title())
            except (NoMatches, NoScreen):
                pass

        for owner in (self.app, self.screen):
            self.watch(owner, "title", set_title)
            self.watch(owner, "sub_title", set_title)
