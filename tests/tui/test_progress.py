"""A running job's collective progress in the dashboard: the jobs list marks a hung job and names
the straggler, and the job's detail shows the per-rank heatmap. Recorded data, no network."""

from __future__ import annotations

from gpudeck.tui.app import GpudeckApp
from gpudeck.tui.client import RecordedLink
from gpudeck.tui.screens.job import JobScreen
from tests.conftest import SCRIPTS
from tests.tui import recorded
from tests.tui.helpers import screen_text, wait_for

STRAGGLER = "rank 3 on node-b is 1.8× slower than the median"
HUNG = ("no collective completed for 4 min; rank 3 on node-b stopped first (outside any collective, the others "
        "wait for it)")


def with_progress(hung: bool) -> dict:
    snapshot = recorded.snapshot()
    job = next(j for j in snapshot["jobs"] if j["id"] == 7)
    job["progress"] = {"bucket_seconds": 15.0, "straggler": STRAGGLER,
                       "wait": {str(rank): [None, 0.1, 0.5, 0.9] if rank < 3 else [None, 0.0, 0.0, 0.0]
                                for rank in range(4)},
                       "hung": {"since": recorded.T0 - 240, "rank": 3, "node": "node-b", "sentence": HUNG} if hung
                       else None}
    return snapshot


def app_on(tmp_path, snapshot: dict) -> GpudeckApp:
    return GpudeckApp(RecordedLink(snapshot), keymap_path=tmp_path / "keymap.json", tick=0, cwd=str(SCRIPTS),
                      workloads={})


async def test_the_job_detail_names_the_straggler_and_draws_the_heatmap(tmp_path):
    app = app_on(tmp_path, with_progress(hung=False))
    async with app.run_test(size=(160, 50)) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        await pilot.press("2")
        await wait_for(pilot, "the straggler in the list", lambda: STRAGGLER in screen_text(app))
        app.push_screen(JobScreen(7))
        await wait_for(pilot, "the heatmap", lambda: "rank 0 |·▁▄▇|" in screen_text(app))
        text = screen_text(app)
        assert f"straggler: {STRAGGLER}" in text and "rank 3 |·   |" in text


async def test_a_hung_job_is_marked_in_the_list_and_its_detail(tmp_path):
    app = app_on(tmp_path, with_progress(hung=True))
    async with app.run_test(size=(200, 50)) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        await pilot.press("2")
        await wait_for(pilot, "the hang in the list", lambda: "rank 3 on node-b stopped first" in screen_text(app))
        assert " hung " in screen_text(app)
        app.push_screen(JobScreen(7))
        await wait_for(pilot, "the hang in the detail", lambda: f"HUNG: {HUNG}" in screen_text(app))
