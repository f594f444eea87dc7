"""The dashboard under Pilot against a real coordinator and real agents (simulated GPUs), driven from the
keyboard only: nodes appear, a job submitted from the form runs and its traffic shows, cancel and
filter work, and losing the coordinator shows and heals by itself."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
from textual.widgets import Input, Log

from gpudeck.tui.app import GpudeckApp
from gpudeck.tui.client import CoordinatorLink
from gpudeck.tui.screens.confirm import ConfirmScreen
from gpudeck.tui.screens.job import JobScreen
from gpudeck.tui.screens.not_found import NotFoundScreen
from gpudeck.tui.screens.submit import SubmitScreen
from gpudeck.tui.widgets.traffic import KindRates
from gpudeck.tui.widgets.header import Banner
from tests.cluster import Cluster, free_port
from tests.tui.helpers import app_state, live_app, rows, screen_text, wait_for

pytestmark = pytest.mark.slow
SIZE = (120, 36)


async def test_nodes_submit_traffic_logs_cancel_and_filter(cluster: Cluster):
    app = live_app(cluster)
    async with app.run_test(size=SIZE) as pilot:
        nodes = app.nodes_view.table
        await wait_for(pilot, "both nodes and their GPUs", lambda: {("node", "node-a"), ("node", "node-b"),
                                                                    ("gpu", "node-b", 1)} <= set(nodes.keys))
        shown = rows(nodes)
        assert any(r.startswith("▾ node-a") and " up " in r and "2 SIM" in r and "127.0.0.1" in r for r in shown)
        assert sum("SIM" in r for r in shown) == 6, "every node and GPU row says SIM"

        # Submit from the form: an impossible request says why before anything is sent.
        await pilot.press("s")
        form = await wait_for(pilot, "the submit form", lambda: isinstance(app.screen, SubmitScreen) and app.screen)
        # It runs until cancelled: on a busy machine any fixed length could end before the cancel below.
        await pilot.press(*"slow_ddp.py --steps 1000000 --sleep 0.1")
        await pilot.press("tab", "5")
        status = form.query_one("#submit-status")
        await wait_for(pilot, "the form to refuse 5 GPUs",
                       lambda: "needs 5 GPUs but the 2 nodes have only 4 GPUs in all" in str(status.render()))
        await pilot.press("enter")
        assert isinstance(app.screen, SubmitScreen) and not app.cluster.jobs, "nothing was sent"
        await pilot.press("backspace", "2", "enter")
        await wait_for(pilot, "the form to close", lambda: not isinstance(app.screen, SubmitScreen))
        assert app.active_tab == "jobs"
        job_id = app.jobs_view.table.cursor_key
        assert job_id is not None and app.cluster.jobs[job_id].name == "slow_ddp", "the new job is selected"
        await wait_for(pilot, "the job to run", lambda: app.cluster.jobs[job_id].state == "running", 90)

        # Its logs, live, then its traffic.
        await pilot.press("l")
        screen = await wait_for(pilot, "the job's logs", lambda: isinstance(app.screen, JobScreen) and app.screen)
        log = screen.query_one(Log)
        await wait_for(pilot, "loss lines from both ranks", lambda: all(
            any(line.startswith(f"[{rank}] rank {rank} step") and "loss" in line for line in log.lines)
            for rank in (0, 1)), 60)
        await pilot.press("t")
        kinds = screen.query_one(KindRates)
        await wait_for(pilot, "all-reduce traffic", lambda: any(kind == "all_reduce" and value > 0
                                                                 for kind, value, _ in kinds.rows), 30)
        assert [r.split()[0] for r in rows(screen.ranks)] == ["0", "1"]
        await pilot.press("escape", "3")
        await wait_for(pilot, "the job in the traffic view",
                       lambda: any("all_reduce" in r for r in rows(app.traffic_view.table)))

        # Cancel, after confirming (once the jobs view shows, with the job selected: a busy machine
        # may take the "c" before the switch of views has happened).
        await pilot.press("2")
        await wait_for(pilot, "the jobs view with the job selected", lambda: app.active_tab == "jobs" and (
            getattr(app.selected_job(), "id", None) == job_id))
        await pilot.press("c")
        await wait_for(pilot, "the confirmation", lambda: isinstance(app.screen, ConfirmScreen),
                       seen=lambda: app_state(app))
        await pilot.press("y")
        await wait_for(pilot, "the job to be cancelled", lambda: app.cluster.jobs[job_id].state == "cancelled", 30)
        assert "cancelled" in rows(app.jobs_view.table)[0]

        # Filter: / and words; escape clears.
        await pilot.press("1", "slash", *"node-b")
        await wait_for(pilot, "only node-b", lambda: nodes.keys and all(k[1] == "node-b" for k in nodes.keys))
        await pilot.press("enter")
        assert nodes.has_focus and app.nodes_view.query_one(Input).value == "node-b"
        await pilot.press("slash", "escape")
        await wait_for(pilot, "every node again", lambda: ("node", "node-a") in nodes.keys)
        await pilot.press("2", "slash", *"running")
        await wait_for(pilot, "no running job", lambda: app.jobs_view.table.keys == [])
        await pilot.press("escape")

        # Drain a node, after confirming.
        await pilot.press("1", "home", "d")
        await wait_for(pilot, "the drain question", lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, "node-a draining", lambda: app.cluster.nodes["node-a"].draining, 30)
        assert cluster.nodes()[0]["draining"], "the coordinator has it"
        await pilot.press("q")


async def test_losing_the_coordinator_shows_a_banner_and_heals(cluster: Cluster):
    app = live_app(cluster)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, "the nodes", lambda: len(app.cluster.nodes) == 2)
        banner = app.query_one(Banner)
        cluster.kill("coordinator", signal.SIGKILL)
        await wait_for(pilot, "the banner", lambda: banner.has_class("-shown"), 30)
        assert "Lost the coordinator" in str(banner.render())
        assert "Lost the coordinator" in screen_text(app)
        assert rows(app.nodes_view.table), "the last known nodes stay on screen"
        await asyncio.to_thread(cluster.start_coordinator)
        await wait_for(pilot, "the banner to go", lambda: not banner.has_class("-shown"), 60)
        await wait_for(pilot, "the nodes back up", lambda: len(app.cluster.nodes) == 2 and all(
            n.state == "up" for n in app.cluster.nodes.values()), 60)


async def test_no_coordinator_says_what_to_do_and_connects_once_one_starts(tmp_path: Path, monkeypatch):
    cluster = Cluster(tmp_path)
    monkeypatch.setenv("GPUDECK_HOME", str(tmp_path / "home"))
    for name in ("GPUDECK_COORDINATOR", "GPUDECK_TOKEN", "GPUDECK_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    app = GpudeckApp(CoordinatorLink(mdns_interfaces=["127.0.0.1"]), keymap_path=tmp_path / "none.json")
    try:
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, "the not-found screen saying what to do",
                           lambda: isinstance(app.screen, NotFoundScreen)
                           and all(words in screen_text(app)
                                   for words in ("no coordinator found", "gpudeck up", "mDNS")),
                           30)
            port = free_port()
            cluster.spawn("coordinator", "coordinator", "--host", "127.0.0.1", "--port", str(port), "--no-mdns")
            await wait_for(pilot, "the dashboard to connect by itself", lambda: app.cluster.connected, 60)
            await wait_for(pilot, "the empty nodes view", lambda: not isinstance(app.screen, NotFoundScreen)
                           and "no nodes have joined yet" in screen_text(app))
    finally:
        cluster.stop()
