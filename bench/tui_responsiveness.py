"""Does the dashboard answer a key press quickly while a big cluster streams updates?

One run measures both, one after the other in the same process, with the same data:

* gpudeck:  the dashboard's nodes view (`GpudeckApp` over a `RecordedLink`, no network), fed one
            update a second in which all of 1,000 nodes x 8 GPUs changed (utilisation, memory,
            temperature, power move every second, as simulated GPUs do);
* baseline: a bare Textual app with one DataTable of 1,000 rows x 8 columns that applies the same
            updates the straightforward way, `update_cell` for every cell of every changed node.

Latency is the time from `pilot.press("down")` until the screen has been redrawn with the moved
cursor: a hook on the app's display call records the first frame composed after the cursor changed.
Presses come at random intervals (50 to 250 ms) so they land at every phase of the update cycle.
gpudeck is measured twice: nodes collapsed (1,000 rows, its default for a big cluster) and expanded
(9,000 rows).

    python bench/tui_responsiveness.py [--seconds 20] [--nodes 1000] [--gpus 8] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from textual.app import App, ComposeResult  # noqa: E402
from textual.widgets import DataTable  # noqa: E402

from gpudeck.tui.app import GpudeckApp  # noqa: E402
from gpudeck.tui.client import RecordedLink  # noqa: E402
from gpudeck.tui.table import DeckTable  # noqa: E402

GIB = 1 << 30
T0 = 1_767_225_600.0


def cluster_data(nodes: int, gpus: int, seconds: int, seed: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A snapshot and one update per second in which every node's GPUs changed."""
    rng = random.Random(seed)

    def node(n: int, second: int) -> dict[str, Any]:
        return {"name": f"node-{n:04d}", "state": "up", "draining": False, "simulated": True,
                "hostname": f"node-{n:04d}", "address": f"10.{n // 250}.{n % 250}.1", "connected": True,
                "last_heartbeat_age": 0.3, "jobs": [],
                "gpus": [{"index": g, "name": "Simulated GPU", "uuid": f"SIM-{n}-{g}", "memory_total": 80 * GIB,
                          "memory_used": rng.randint(0, 80) * GIB, "utilization": rng.randint(0, 100),
                          "temperature": rng.randint(35, 80), "power": float(rng.randint(60, 700)),
                          "power_limit": 700.0, "processes": []} for g in range(gpus)]}

    snapshot = {"time": T0, "nodes": [node(n, 0) for n in range(nodes)], "unjoined": [], "jobs": []}
    updates = [{"time": T0 + s, "nodes": [node(n, s) for n in range(nodes)]} for s in range(1, seconds + 1)]
    return snapshot, updates


class FrameClock:
    """Wraps an app's display call: the time of the first frame composed after `armed` became true."""

    def __init__(self, app: App[Any], moved: Callable[[], bool]) -> None:
        self.moved = moved
        self.armed = False
        self.at: float | None = None
        original = app._display

        def display(screen: Any, renderable: Any) -> None:
            original(screen, renderable)
            if self.armed and self.at is None and self.moved():
                self.at = time.perf_counter()

        app._display = display  # type: ignore[method-assign]


async def measure(app: App[Any], feed: Callable[[dict[str, Any]], None], updates: list[dict[str, Any]],
                  cursor: Callable[[], int], seconds: float, prepare: Callable[[Any], Any] | None,
                  seed: int, size: tuple[int, int] = (160, 50)) -> list[float]:
    latencies: list[float] = []
    rng = random.Random(seed)
    async with app.run_test(size=size) as pilot:
        if prepare is not None:
            await prepare(pilot)
        before = {"cursor": cursor()}
        clock = FrameClock(app, lambda: cursor() != before["cursor"])

        async def feeder() -> None:
            for update in updates:
                await asyncio.sleep(1.0)
                feed(update)

        task = asyncio.create_task(feeder())
        await asyncio.sleep(1.5)  # the first update is flowing
        deadline = time.perf_counter() + seconds
        direction = "down"
        try:
            while time.perf_counter() < deadline:
                await asyncio.sleep(rng.uniform(0.05, 0.25))
                before["cursor"] = cursor()
                if before["cursor"] >= 300:
                    direction = "up"
                elif before["cursor"] <= 0:
                    direction = "down"
                clock.at = None
                clock.armed = True
                start = time.perf_counter()
                await pilot.press(direction)
                while clock.at is None:
                    if time.perf_counter() - start > 30:
                        raise RuntimeError("no frame with the moved cursor within 30 s")
                    await asyncio.sleep(0.001)
                clock.armed = False
                latencies.append(clock.at - start)
        finally:
            task.cancel()
    return latencies


class BareTable(App[None]):
    """The baseline: one DataTable, every cell of every changed node updated as it arrives."""

    COLUMNS = ("name", "state", "gpus", "util", "memory", "temp", "power", "jobs")

    def __init__(self, snapshot: dict[str, Any]) -> None:
        super().__init__()
        self.snapshot = snapshot
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def compose(self) -> ComposeResult:
        yield DataTable(cursor_type="row")

    @staticmethod
    def cells(node: dict[str, Any]) -> list[str]:
        gpus = node["gpus"]
        util = sum(g["utilization"] for g in gpus) / len(gpus)
        used = sum(g["memory_used"] for g in gpus) // GIB
        total = sum(g["memory_total"] for g in gpus) // GIB
        return [node["name"], node["state"], str(len(gpus)), f"{util:.0f}%", f"{used}/{total}G",
                f"{max(g['temperature'] for g in gpus)}C", f"{sum(g['power'] for g in gpus):.0f}W",
                ",".join(map(str, node["jobs"])) or "-"]

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for column in self.COLUMNS:
            table.add_column(column.upper(), key=column, width=12)
        for node in self.snapshot["nodes"]:
            table.add_row(*self.cells(node), key=node["name"])
        table.focus()
        self.run_worker(self.follow())

    async def follow(self) -> None:
        table = self.query_one(DataTable)
        while True:
            update = await self.queue.get()
            for node in update.get("nodes", []):
                for column, value in zip(self.COLUMNS, self.cells(node)):
                    table.update_cell(node["name"], column, value)


def summary(name: str, values: list[float]) -> dict[str, Any]:
    ms = sorted(v * 1000 for v in values)
    return {"name": name, "n": len(ms), "p50": statistics.median(ms), "p95": ms[int(0.95 * (len(ms) - 1))],
            "max": ms[-1], "mean": statistics.fmean(ms)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="key presses per case, in seconds (default 20)")
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    updates_needed = int(args.seconds) + 5
    print(f"making {args.nodes} nodes x {args.gpus} GPUs and {updates_needed} updates …", flush=True)
    snapshot, updates = cluster_data(args.nodes, args.gpus, updates_needed, args.seed)
    gc.collect()
    gc.freeze()  # the recorded updates are test data: keep the collector from walking them in both cases
    results = []

    for expanded in (False, True):
        link = RecordedLink(snapshot)
        app = GpudeckApp(link, keymap_path=Path("/nonexistent/keymap.json"))

        async def prepare(pilot: Any, app: GpudeckApp = app, expanded: bool = expanded) -> None:
            while not app.cluster.connected or len(app.nodes_view.table.keys) == 0:
                await pilot.pause(0.05)
            if expanded:
                await pilot.press("e")
                while len(app.nodes_view.table.keys) < args.nodes * (args.gpus + 1):
                    await pilot.pause(0.05)

        table = app.nodes_view.table

        def cursor(t: DeckTable = table) -> int:
            return t.cursor

        label = ("gpudeck nodes view "
                 f"({'expanded, ' + str(args.nodes * (args.gpus + 1)) if expanded else args.nodes} rows)")
        print(f"measuring {label} …", flush=True)
        lat = await measure(app, link.push, updates, cursor, args.seconds, prepare, args.seed)
        results.append(summary(label, lat))

    bare = BareTable(snapshot)
    print("measuring the bare DataTable …", flush=True)

    async def ready(pilot: Any) -> None:
        while bare.query_one(DataTable).row_count < args.nodes:
            await pilot.pause(0.05)

    lat = await measure(bare, bare.queue.put_nowait, updates, lambda: bare.query_one(DataTable).cursor_row,
                        args.seconds, ready, args.seed)
    results.append(summary(f"bare DataTable ({args.nodes} rows x 8 cells, update_cell)", lat))

    print()
    print(f"key press to redrawn cursor while {args.nodes} nodes x {args.gpus} GPUs update once a second (ms)")
    print(f"{'case':<58} {'n':>4} {'p50':>8} {'p95':>8} {'max':>8} {'mean':>8}")
    for row in results:
        print(f"{row['name']:<58} {row['n']:>4} {row['p50']:>8.1f} {row['p95']:>8.1f} {row['max']:>8.1f} "
              f"{row['mean']:>8.1f}")
    base = results[-1]
    for row in results[:-1]:
        print(f"ratio bare/gpudeck [{row['name']}]: p50 {base['p50'] / row['p50']:.1f}x, "
              f"p95 {base['p95'] / row['p95']:.1f}x, mean {base['mean'] / row['mean']:.1f}x")
    p95s = ", ".join(f"{r['p95']:.0f} ms" for r in results[:-1])
    print(f"goal: a key press answered within 100 ms: gpudeck p95 {p95s}")


if __name__ == "__main__":
    asyncio.run(main())
