"""Keys and commands on recorded data (no network): rebinding by binding id, the command palette, the
footer showing only keys that apply, and the submit form over a recorded link."""

from __future__ import annotations

import asyncio
import json

from textual.binding import Binding
from textual.command import CommandPalette
from textual.widgets import Log

from gpudeck.tui.app import GpudeckApp
from gpudeck.tui.client import RecordedLink
from gpudeck.tui.screens.confirm import ConfirmScreen
from gpudeck.tui.screens.help import HelpScreen
from gpudeck.tui.screens.job import JobScreen
from gpudeck.tui.screens.not_found import NotFoundScreen
from gpudeck.tui.screens.submit import SubmitScreen
from tests.conftest import SCRIPTS
from tests.tui import recorded
from tests.tui.helpers import screen_text, wait_for


def app_with(tmp_path, keymap: dict[str, str] | None = None) -> tuple[GpudeckApp, RecordedLink]:
    path = tmp_path / "keymap.json"
    if keymap is not None:
        path.write_text(json.dumps(keymap))
    link = RecordedLink(recorded.snapshot(), logs=recorded.LOGS)
    return GpudeckApp(link, keymap_path=path, tick=0, cwd=str(SCRIPTS), workloads={}), link


def footer_keys(app: GpudeckApp) -> set[str]:
    """The actions the footer offers now (Textual leaves out those whose check_action is False)."""
    return {b.binding.action for b in app.screen.active_bindings.values() if b.binding.show and b.enabled}


async def test_bindings_have_ids_that_a_keymap_file_rebinds(tmp_path):
    app, _ = app_with(tmp_path, {"gpudeck.submit": "n", "gpudeck.help": "f1"})
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        await pilot.press("s")
        assert not isinstance(app.screen, SubmitScreen), "s is no longer submit"
        await pilot.press("n")
        await wait_for(pilot, "the form", lambda: isinstance(app.screen, SubmitScreen))
        await pilot.press("escape", "f1")
        await wait_for(pilot, "help", lambda: isinstance(app.screen, HelpScreen))
        ids = set()
        for b in GpudeckApp.BINDINGS:
            assert isinstance(b, Binding), b
            ids.add(b.id)
        assert {"gpudeck.submit", "gpudeck.cancel", "gpudeck.logs", "gpudeck.filter", "gpudeck.help",
                "gpudeck.quit", "gpudeck.drain", "gpudeck.nodes", "gpudeck.jobs", "gpudeck.traffic"} <= ids


async def test_footer_shows_the_keys_that_apply_now(tmp_path):
    app, _ = app_with(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        on_nodes = footer_keys(app)
        assert {"drain", "filter", "submit"} <= on_nodes and "cancel_job" not in on_nodes
        await pilot.press("2")
        await pilot.pause()
        on_jobs = footer_keys(app)
        assert {"cancel_job", "logs", "filter"} <= on_jobs and "drain" not in on_jobs
        await pilot.press("end")  # the oldest job, cancelled already: nothing to cancel
        await pilot.pause()
        assert "cancel_job" not in footer_keys(app) and "logs" in footer_keys(app)


async def test_every_action_is_in_the_command_palette(tmp_path):
    app, _ = app_with(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        await pilot.press("2")
        titles = {command.title for command in app.get_system_commands(app.screen)}
        assert "Drain or resume the selected node" not in titles, "only what applies here"
        assert {"Submit a job", "Cancel the selected job", "Show the selected job's logs", "Show nodes",
                "Show traffic", "Filter this view", "Help"} <= titles
        await pilot.press("ctrl+p")
        await wait_for(pilot, "the palette", lambda: isinstance(app.screen, CommandPalette))
        await pilot.press(*"cancel the")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await wait_for(pilot, "the confirmation", lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("n")


async def test_submit_over_the_keyboard_selects_the_new_job(tmp_path):
    app, link = app_with(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        await pilot.press("s", *"ddp_linear.py --steps 3", "tab", "2", "x", "2", "tab", "3", "tab", "1", "0", "m",
                          "tab", "2", "enter")
        await wait_for(pilot, "the form to close", lambda: not isinstance(app.screen, SubmitScreen))
        spec = link.sent[0]
        assert (spec.name, spec.nodes, spec.gpus_per_node, spec.priority, spec.time_limit, spec.max_restarts) == (
            "ddp_linear", 2, 2, 3, 600, 2)
        assert spec.run.script == (SCRIPTS / "ddp_linear.py").read_bytes() and spec.run.args == ["--steps", "3"]
        assert app.active_tab == "jobs" and app.jobs_view.table.cursor_key == 10
        await pilot.press("enter")
        await wait_for(pilot, "the job's detail", lambda: isinstance(app.screen, JobScreen) and app.screen.job_id == 10)


async def test_drain_asks_then_marks_the_node(tmp_path):
    app, link = app_with(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        await pilot.press("d")
        await wait_for(pilot, "the question", lambda: isinstance(app.screen, ConfirmScreen))
        question = app.screen
        assert isinstance(question, ConfirmScreen)
        assert "Drain node node-a?" in question.question
        await pilot.press("y")
        await wait_for(pilot, "node-a draining", lambda: app.cluster.nodes["node-a"].draining)
        assert app.nodes_view.table.row_text(("node", "node-a")).split()[2] == "draining"


async def test_the_form_offers_built_in_workloads(tmp_path):
    link = RecordedLink(recorded.snapshot())
    app = GpudeckApp(link, keymap_path=tmp_path / "k.json", tick=0, cwd=str(SCRIPTS), workloads=recorded.WORKLOADS)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        await pilot.press("s", "shift+tab", "shift+tab", "enter", "down", "enter")  # Run: the first workload
        await pilot.press("tab", "tab", *"--steps 5", "tab", "2", "enter")
        await wait_for(pilot, "the form to close", lambda: not isinstance(app.screen, SubmitScreen))
        spec = link.sent[0]
        assert (spec.run.workload, spec.run.args, spec.gpus, spec.run.script_name) == (
            "data-parallel", ["--steps", "5"], 2, "")


async def test_a_screen_closed_at_once_while_the_title_changes_does_not_crash(tmp_path):
    """The not-found screen closes the moment a coordinator answers, and the subtitle changes at the
    same time; Textual's own Header then failed with NoMatches on HeaderTitle."""
    app, _ = app_with(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        for attempt in range(10):
            screen = NotFoundScreen("looking", None)
            app.push_screen(screen)
            screen.dismiss()
            app.sub_title = f"subtitle {attempt}"
            await asyncio.sleep(0)
            await pilot.pause()
        assert app.sub_title == "subtitle 9" and not isinstance(app.screen, NotFoundScreen)


async def test_a_finished_jobs_detail_names_the_outputs_its_nodes_keep_and_how_to_fetch_them(tmp_path):
    snapshot = recorded.snapshot()
    warmup = next(job for job in snapshot["jobs"] if job["id"] == 6)
    warmup["outputs"] = {"node-a": [{"path": "model/final.pt", "size": 3 * 1024 * 1024},
                                    {"path": "metrics.json", "size": 812}]}
    app = GpudeckApp(RecordedLink(snapshot, logs=recorded.LOGS), keymap_path=tmp_path / "keymap.json", tick=0,
                     cwd=str(SCRIPTS), workloads={})
    async with app.run_test(size=(160, 40)) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        app.push_screen(JobScreen(6))
        expected = ("outputs model/final.pt (3.0 MiB, node-a), metrics.json (812 B, node-a): fetch with "
                    "`gpudeck outputs 6`")
        await wait_for(pilot, "the outputs in the detail", lambda: expected in screen_text(app))
        app.pop_screen()
        app.push_screen(JobScreen(5))
        await wait_for(pilot, "job 5's detail", lambda: "bad-config" in screen_text(app))
        assert "outputs" not in screen_text(app).split("Traffic")[0], "a job without kept outputs names none"


async def test_a_log_that_measures_new_lines_after_its_screen_closed_does_not_close_the_dashboard(tmp_path):
    app, _ = app_with(tmp_path)
    async with app.run_test(size=(120, 36)) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        app.push_screen(JobScreen(7, "logs"))
        log = await wait_for(pilot, "the job's logs",
                             lambda: isinstance(app.screen, JobScreen) and app.screen.query(Log)
                             and app.screen.query_one(Log))
        await app.pop_screen()
        log.write_lines(["a line that arrives as the screen closes (Esc while logs stream)"])
        await wait_for(pilot, "the main screen", lambda: len(app.screen_stack) == 1)
        await pilot.press("2")
        await wait_for(pilot, "the jobs view", lambda: app.active_tab == "jobs")
        assert app.is_running and app.return_code is None
