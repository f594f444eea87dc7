"""What a newcomer found wrong in the dashboard (issue 12), each on recorded data under Pilot: a job's
detail opened before its first traffic report, a finished job's totals, a down node's stale readings,
a filter that matches nothing, the form after a node joins, the help window, traffic of a quiet job,
a node's own output in the logs, the header at 80x24 and quitting `gpudeck up` with jobs running."""

from __future__ import annotations

import copy
from typing import Any

from textual.binding import Binding
from textual.widgets import Input, Static

from gpudeck.model import JobSpec, RunSpec
from gpudeck.protocol.payloads import JobView
from gpudeck.tui.app import GpudeckApp
from gpudeck.tui.client import RecordedLink
from gpudeck.tui.screens.confirm import ConfirmScreen
from gpudeck.tui.screens.help import HelpScreen
from gpudeck.tui.screens.job import JobScreen
from gpudeck.tui.screens.submit import SubmitScreen
from gpudeck.tui.widgets.traffic import KindRates
from tests.conftest import SCRIPTS
from tests.tui import recorded
from tests.tui.helpers import rows, screen_text, type_text, wait_for


def app_on(tmp_path, link: RecordedLink, **options: Any) -> GpudeckApp:
    return GpudeckApp(link, keymap_path=tmp_path / "keymap.json", tick=0, cwd=str(SCRIPTS), workloads={},
                      **options)


def quiet_snapshot() -> dict[str, Any]:
    """The recorded cluster with job 7 running but not yet reporting any traffic."""
    snapshot = recorded.snapshot()
    snapshot["jobs"][0]["traffic"] = {"by_kind": {}, "by_rank": {}}
    return snapshot


def kind_rates_text(app: GpudeckApp) -> str:
    """What the kinds widget of the open job shows on screen, as many lines as it is laid out for."""
    found = app.screen.query(KindRates)
    if not found:
        return ""
    widget = found.first()
    return "\n".join(line.text for line in widget.render_lines(widget.region.reset_offset))


async def test_a_detail_opened_before_the_first_report_shows_every_kind_once_they_come(tmp_path):
    link = RecordedLink(quiet_snapshot())
    app = app_on(tmp_path, link)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        app.push_screen(JobScreen(7))
        await wait_for(pilot, "the total row alone", lambda: kind_rates_text(app).startswith("total"),
                       seen=lambda: kind_rates_text(app))
        await pilot.pause()
        for update in recorded.updates(3):
            link.push(update)
        await wait_for(pilot, "all_reduce and broadcast rows under the total",
                       lambda: all(kind in kind_rates_text(app) for kind in ("total", "all_reduce", "broadcast")),
                       seen=lambda: kind_rates_text(app))


def finished_workload(steps: int) -> dict[str, Any]:
    spec = JobSpec(name="dp", gpus=2, run=RunSpec(workload="data-parallel", args=["--steps", str(steps)]))
    by_rank = {rank: {"all_reduce": 4096 * steps, "broadcast": 1024} for rank in (0, 1)}
    return JobView.build(11, spec, state="succeeded", submitted_at=recorded.T0 - 60, hosts=[("node-a", [2, 3])],
                         attempt=1, exit_code=0, started_at=recorded.T0 - 50, ended_at=recorded.T0 - 10,
                         traffic=by_rank).to_json()


async def test_a_finished_jobs_detail_shows_what_it_moved_by_kind_rank_and_step(tmp_path):
    snapshot = recorded.snapshot()
    snapshot["jobs"].append(finished_workload(steps=8))
    app = app_on(tmp_path, RecordedLink(snapshot))
    async with app.run_test(size=(140, 40)) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        app.push_screen(JobScreen(11))
        await wait_for(pilot, "the detail", lambda: "dp" in screen_text(app))
        shown = kind_rates_text(app)
        assert "bytes moved by kind" in screen_text(app), screen_text(app)
        assert "all_reduce" in shown and "64 KiB" in shown and "8.0 KiB per step" in shown, shown
        assert "broadcast" in shown and "2.0 KiB" in shown, shown
        assert "0 B/s" not in shown, "a finished job has no rates to show"
        detail = app.screen
        assert isinstance(detail, JobScreen)
        ranks = rows(detail.ranks)
        assert all("all_reduce 32 KiB" in row for row in ranks), ranks


async def test_a_down_node_marks_its_last_readings_stale_and_its_age_fits(tmp_path):
    snapshot = recorded.snapshot()
    snapshot["nodes"][1].update(state="down", connected=False, last_heartbeat_age=424.0)
    app = app_on(tmp_path, RecordedLink(snapshot))
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        table = app.nodes_view.table
        node_b = table.row_text(("node", "node-b"))
        assert "stale" in node_b and "7m" in node_b and "…" not in node_b, node_b
        assert "stale" in table.row_text(("gpu", "node-b", 0)), table.row_text(("gpu", "node-b", 0))
        assert "stale" not in table.row_text(("node", "node-a"))


async def test_a_filter_that_matches_no_node_says_so(tmp_path):
    app = app_on(tmp_path, RecordedLink(recorded.snapshot()))
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        await pilot.press("slash")
        await type_text(pilot, "nosuchnode")
        await wait_for(pilot, "an empty table", lambda: not app.nodes_view.table.keys)
        await pilot.pause()
        text = screen_text(app)
        assert "no nodes match 'nosuchnode'" in text and "have joined yet" not in text, text


async def test_the_form_drops_its_objection_when_a_second_node_joins(tmp_path):
    snapshot = recorded.snapshot()
    snapshot["nodes"] = [snapshot["nodes"][0]]
    link = RecordedLink(snapshot)
    app = app_on(tmp_path, link)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        await pilot.press("s")
        await type_text(pilot, "ddp_linear.py")
        await pilot.press("tab")
        await type_text(pilot, "2x1")
        status = lambda: str(app.screen.query_one("#submit-status", Static).render())  # noqa: E731
        await wait_for(pilot, "the objection", lambda: "only 1 node" in status(), seen=status)
        link.push({"time": recorded.T0 + 1, "nodes": [copy.deepcopy(recorded.snapshot()["nodes"][1])]})
        await wait_for(pilot, "the form ready", lambda: status().startswith("ready"), seen=status)
        assert isinstance(app.screen, SubmitScreen)


async def test_help_lists_every_key_of_the_job_screen_grouped_by_what_it_does(tmp_path):
    app = app_on(tmp_path, RecordedLink(recorded.snapshot(), logs=recorded.LOGS))
    async with app.run_test(size=(120, 60)) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        app.push_screen(JobScreen(7))
        await wait_for(pilot, "the detail", lambda: isinstance(app.screen, JobScreen))
        await pilot.press("question_mark")
        await wait_for(pilot, "help", lambda: isinstance(app.screen, HelpScreen))
        help_screen = app.screen
        assert isinstance(help_screen, HelpScreen)
        ids = [binding_id for _, _, binding_id in help_screen.keys]
        for binding in JobScreen.BINDINGS:
            assert isinstance(binding, Binding), binding
            assert binding.id in ids, f"{binding.id} missing from help: {ids}"
        for binding_id in ("gpudeck.nodes", "gpudeck.submit", "gpudeck.cancel", "gpudeck.quit"):
            assert binding_id in ids, ids
        assert ids.index("gpudeck.nodes") < ids.index("gpudeck.traffic") < ids.index("gpudeck.submit"), \
            "the views' keys together, in the order of the views, before the actions"
        text = screen_text(app)
        assert "()" not in text, "a key without a binding id shows no empty parentheses"


async def test_the_traffic_view_shows_what_a_quiet_job_has_sent(tmp_path):
    app = app_on(tmp_path, RecordedLink(recorded.snapshot()))
    async with app.run_test(size=(140, 30)) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        await pilot.press("3")
        await wait_for(pilot, "job 7's row", lambda: app.traffic_view.table.keys == [7])
        row = app.traffic_view.table.row_text(7, 140)
        assert "sent 22 MiB so far" in row, row  # 3 ranks for 90 s, the silent one for 3


async def test_a_nodes_own_output_is_shown_when_chosen_and_counted_for_what_is_shown(tmp_path):
    app = app_on(tmp_path, RecordedLink(recorded.snapshot(), logs=recorded.LOGS))
    async with app.run_test(size=(120, 36)) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        app.push_screen(JobScreen(7, "logs"))
        status = lambda: "".join(str(w.render()) for w in app.screen.query("#log-status"))  # noqa: E731
        await wait_for(pilot, "every rank's lines", lambda: "24 lines" in status(), seen=status)
        await pilot.press("left_square_bracket")  # from every rank back to the last choice: node 1's own output
        await wait_for(pilot, "node 1's own output", lambda: "node 1" in status(), seen=status)
        assert "no lines" in status(), status()
        await pilot.press("left_square_bracket")
        await wait_for(pilot, "node 0's own output", lambda: "node 0" in status(), seen=status)
        await wait_for(pilot, "its line", lambda: "[torchrun] starting 2 ranks" in screen_text(app))
        assert "1 line" in status() and "1 lines" not in status() and "torchrun" not in status(), status()


async def test_the_header_keeps_the_counts_at_80_columns(tmp_path):
    app = app_on(tmp_path, RecordedLink(recorded.snapshot()))
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        await pilot.pause()
        header = screen_text(app).splitlines()[0]
        assert "1 running" in header and "2 pending" in header, header


async def test_quitting_up_with_jobs_running_asks_first(tmp_path):
    app = app_on(tmp_path, RecordedLink(recorded.snapshot()), local_node="node-a")
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        await pilot.press("q")
        await wait_for(pilot, "the question", lambda: isinstance(app.screen, ConfirmScreen))
        question = app.screen
        assert isinstance(question, ConfirmScreen)
        assert "1 job is running" in question.detail, question.detail
        await pilot.press("n")
        await wait_for(pilot, "the dashboard again", lambda: not isinstance(app.screen, ConfirmScreen))
        assert app.is_running
        await pilot.press("q", "y")
        await wait_for(pilot, "the app to quit", lambda: not app.is_running)


async def test_up_says_the_local_agent_is_starting_before_it_joins(tmp_path):
    empty = {"time": recorded.T0, "nodes": [], "unjoined": [], "jobs": []}
    app = app_on(tmp_path, RecordedLink(empty), local_node="workstation")
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        await pilot.pause()
        text = screen_text(app)
        assert "the local agent (workstation) is starting" in text and "run `gpudeck agent`" not in text, text


async def test_enter_on_a_gpu_row_keeps_its_node_open(tmp_path):
    app = app_on(tmp_path, RecordedLink(recorded.snapshot()))
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        app.nodes_view.table.move_to(("gpu", "node-a", 1))
        await pilot.press("enter")
        await pilot.pause()
        assert ("gpu", "node-a", 1) in app.nodes_view.table.keys and app.nodes_view.is_expanded("node-a")
        app.nodes_view.table.move_to(("node", "node-a"))
        await pilot.press("enter")
        await wait_for(pilot, "node-a collapsed", lambda: ("gpu", "node-a", 1) not in app.nodes_view.table.keys)


class AddressedLink(RecordedLink):
    """A recorded link that keeps the --coordinator it was given, as CoordinatorLink does."""

    coordinator: str | None = None


async def test_no_coordinator_repeats_the_address_that_was_asked_for(tmp_path):
    link = AddressedLink(not_found="nothing answered at 10.1.2.3:7171")
    link.coordinator = "10.1.2.3:7171"  # as CoordinatorLink keeps the --coordinator it was given
    app = app_on(tmp_path, link)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, "the advice", lambda: "gpudeck --coordinator" in screen_text(app))
        text = screen_text(app)
        assert "gpudeck --coordinator 10.1.2.3:7171 --token-file FILE" in text and ":7070" not in text, text


async def test_a_keymap_entry_with_an_unknown_id_is_named_once(tmp_path):
    (tmp_path / "keymap.json").write_text('{"gpudeck.submit": "n", "gpudeck.sumbit": "m"}')
    app = app_on(tmp_path, RecordedLink(recorded.snapshot()))
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        said = [n.message for n in app._notifications]
        assert (len([m for m in said if "gpudeck.sumbit" in m]) == 1
                and not any("'gpudeck.submit'" in m for m in said)), said


async def test_the_name_placeholder_follows_the_chosen_workload(tmp_path):
    app = GpudeckApp(RecordedLink(recorded.snapshot()), keymap_path=tmp_path / "k.json", tick=0, cwd=str(SCRIPTS),
                     workloads=recorded.WORKLOADS)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        await pilot.press("s", "shift+tab", "shift+tab", "enter", "down", "enter")  # Run: the first workload
        name = lambda: app.screen.query_one("#f-name", Input).placeholder  # noqa: E731
        await wait_for(pilot, "the workload's placeholder", lambda: "workload" in name(), seen=name)


async def test_one_gpu_is_one_gpu(tmp_path):
    app = app_on(tmp_path, RecordedLink(recorded.snapshot()))
    async with app.run_test(size=(140, 30)) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        assert "· 1 GPU · jobs none" in app.nodes_view.describe(("node", "node-c")).plain
        assert "asked 1 GPU · priority" in app.jobs_view.describe(9).plain
        assert "asked 4 GPUs · priority" in app.jobs_view.describe(8).plain


async def test_the_preview_of_a_node_that_has_not_joined_says_why(tmp_path):
    """It was always empty: rich's Text.rstrip() strips in place and returns None (mypy found it)."""
    app = app_on(tmp_path, RecordedLink(recorded.snapshot()))
    async with app.run_test(size=(140, 30)) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        said = app.nodes_view.describe(("unjoined", "gpu-box-7")).plain
        assert said.startswith("gpu-box-7 at 10.0.0.17 (8 GPUs) has not joined: ") and not said.endswith("\n")


async def test_a_model_change_between_screens_does_not_crash_the_header(tmp_path):
    """A change can arrive while no screen is on the stack (as the app switches screens or shuts
    down); the header's counts then wait for the next change instead of failing the app."""
    app = app_on(tmp_path, RecordedLink(recorded.snapshot()))
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
    assert not app.screen_stack and app.cluster.connected
    app.show_totals()
