"""The nodes view: one row per node, and under it one per GPU with its utilisation history."""

from __future__ import annotations

from typing import Any, Hashable

from rich.text import Text
from textual.app import ComposeResult

from gpudeck.text import counted, spoken_duration
from gpudeck.tui.model import (
    Changes, Cluster, age, bar, cordon_of, describe_process, foreign_processes, gib, matches, sparkline,
)
from gpudeck.tui.table import SPAN, SPAN_FROM, Column, DeckTable, Palette
from gpudeck.tui.views.filtered import FilteredView
from gpudeck.tui.widgets.filter_bar import FilterBar


EXPAND_UP_TO_GPUS = 64  # clusters this small show every GPU from the start, as nvitop does

HEARTBEAT_LATE = 5.0

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
            if not matches(self.filter_text, node):
                continue
            keys.append(("node", name))
            if self.is_expanded(name):
                keys += [("gpu", name, gpu.index) for gpu in node.gpus]
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
            self.expand_all = sum(len(n.gpus) for n in self.cluster.nodes.values()) <= EXPAND_UP_TO_GPUS
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
                keys += [("gpu", name, gpu.index) for gpu in self.cluster.nodes[name].gpus]
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
        sim = " SIM" if node.simulated else ""
        if key[0] == "node":
            text.append(key[1], style="bold")
            text.append(f" ({node.hostname}, {node.address}) {node.state}"
                        + (", draining" if node.draining else "")
                        + f" · {counted(len(node.gpus), sim.strip() + ' GPU' if sim else 'GPU')}"
                        f" · jobs {','.join(map(str, node.jobs)) or 'none'}"
                        + f" · heartbeat {age(self.cluster.heartbeat_age(key[1]))} ago")
            outside = [(g.index, p) for g in node.gpus for p in foreign_processes(g)]
            for index, process in outside:
                text.append(f"\nGPU {index}: ! outside gpudeck: {describe_process(process)}")
            for kept_out in node.cordoned:
                text.append(f"\nGPU {kept_out.gpu}: cordoned, no new jobs: {kept_out.cause}")
            return text
        gpu = next((g for g in node.gpus if g.index == key[2]), None)
        if gpu is None:
            return text
        text.append(f"{key[1]} GPU {key[2]}{sim}", style="bold")
        text.append(f" {gpu.name} · {gpu.uuid}")
        job = self.cluster.gpu_jobs.get((key[1], key[2]))
        if job is not None:
            held = self.cluster.jobs.get(job)
            text.append(f" · job {job} {held.name if held else ''}")
        power = gpu.power
        limit = gpu.power_limit
        if power is not None:
            text.append(f" · {power:.0f}W" + (f" of {limit:.0f}W" if limit else ""))
        cordon = cordon_of(node, key[2])
        if cordon is not None:
            text.append(f"\ncordoned for {spoken_duration(self.cluster.now() - cordon.since)} "
                        f"(`gpudeck gpu uncordon {key[1]}:{key[2]}` offers it again): {cordon.cause}")
        for process in gpu.processes or []:
            mark = "! outside gpudeck: " if process.foreign else ""
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
        gpus = node.gpus
        utils = [g.utilization for g in gpus if g.utilization is not None]
        used = [g.memory_used for g in gpus if g.memory_used is not None]
        total = [g.memory_total for g in gpus if g.memory_total is not None]
        temps = [g.temperature for g in gpus if g.temperature is not None]
        power = [g.power for g in gpus if g.power is not None]
        state = "draining" if node.draining and node.state == "up" else node.state
        seen = self.cluster.heartbeat_age(name)
        marker = "▾ " if self.is_expanded(name) else "▸ "
        gpus_cell = Text(str(len(gpus)))
        if node.simulated:
            gpus_cell.append(" SIM", style=p.sim)
        foreign = sum(1 for g in gpus if foreign_processes(g))
        jobs = Text(",".join(map(str, node.jobs)) or "-")
        if node.draining and state != "draining":
            jobs.append(" draining", style=p.warn)
        if foreign:
            jobs.append(f" !{foreign} outside", style=p.bad)
        if node.cordoned:
            jobs.append(f" x{len(node.cordoned)} cordoned", style=p.bad)
        util = sum(utils) / len(utils) if utils else None
        stale = node.state == "down"
        if stale:
            jobs = Text("stale ", style=p.warn) + jobs
        return self._dim_readings(stale, p, {
            "name": Text(marker + name, style="bold"),
            "state": Text(state, style=getattr(p, STATE_STYLE.get(node.state, "warn"))
                          if state != "draining" else p.warn),
            "gpus": gpus_cell,
            "util": self._util(util, p),
            "memory": self._memory(sum(used) if used else None, sum(total) if total else None, p),
            "temp": f"{max(temps):.0f}C" if temps else "n/a",
            "power": _watts(sum(power)) if power else "n/a",
            "history": Text(sparkline(self.cluster.node_util.get(name, []), self.table.column_width("history"), 100),
                            style=p.accent),
            "address": node.address,
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
        gpu = next((g for g in node.gpus if g.index == index), None) if node else None
        if node is None or gpu is None:
            return {}
        job = self.cluster.gpu_jobs.get((name, index))
        foreign = foreign_processes(gpu)
        label = Text(f"  {index} ")
        if node.simulated:
            label.append("SIM ", style=p.sim)
        gpu_name = (gpu.name or "GPU").removeprefix("NVIDIA ")
        if not (node.simulated and gpu_name.startswith("Simulated")):
            label.append(gpu_name, style=p.dim)
        stale = node.state == "down"
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
            held = self.cluster.jobs.get(job)
            if held and held.name:
                use.append(f" {held.name}", style=p.dim)
        if foreign:
            if use:
                use.append("  ")
            more = f" +{len(foreign) - 1}" if len(foreign) > 1 else ""
            use.append(f"! outside gpudeck: {describe_process(foreign[0])}{more}", style=p.bad)
        if cordon is not None:
            if use:
                use.append("  ")
            use.append(f"cordoned: {cordon.cause}", style=p.bad)
        temp = f"{gpu.temperature:.0f}C" if gpu.temperature is not None else "n/a"
        power = _watts(gpu.power) if gpu.power is not None else "n/a"
        cells = {
            "name": label, "state": Text(state, style=style), "gpus": "",
            "util": self._util(gpu.utilization, p),
            "memory": self._memory(gpu.memory_used, gpu.memory_total, p),
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
