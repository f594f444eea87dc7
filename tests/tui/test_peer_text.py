"""What peers and users wrote reaches the dashboard as text: a '[' in a job's name is not markup (a
"[/]" in it crashed Textual's markup parser), and control characters in names, reasons and refusals
are shown as escapes (gpudeck.text.visible) instead of reaching the terminal. Recorded data, no network."""

from __future__ import annotations


from gpudeck.protocol.handshake import Refused
from gpudeck.tui.app import GpudeckApp
from gpudeck.protocol.views import JobView
from gpudeck.tui.client import Lost, RecordedLink, job_view
from gpudeck.tui.screens.confirm import ConfirmScreen
from gpudeck.tui.screens.not_found import NotFoundScreen
from tests.conftest import SCRIPTS
from tests.tui import recorded
from tests.tui.helpers import screen_text, wait_for

MARKUP_NAME = "sweep[/] [b]lr"  # printable, so a valid job name


def app_on(tmp_path, link: RecordedLink) -> GpudeckApp:
    return GpudeckApp(link, keymap_path=tmp_path / "keymap.json", tick=0, cwd=str(SCRIPTS), workloads={})


class RefusingLink(RecordedLink):
    """A coordinator whose refusal quotes what it was sent, as the real one quotes names."""

    async def cancel(self, job: int, index: int | None = None) -> JobView:
        raise Refused(f"job {job} is held by [/]someone\x1b]0;pwned\x07")


async def test_a_job_name_with_brackets_is_asked_about_and_reported_as_written(tmp_path):
    snapshot = recorded.snapshot()
    snapshot["jobs"][1]["name"] = MARKUP_NAME  # job 8, pending
    app = app_on(tmp_path, RecordedLink(snapshot))
    async with app.run_test(size=(100, 30), notifications=True) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        await pilot.press("2")
        app.jobs_view.table.move_to(8)
        await pilot.press("c")
        await wait_for(pilot, "the question", lambda: isinstance(app.screen, ConfirmScreen))
        assert f"Cancel job 8 {MARKUP_NAME}?" in screen_text(app)
        await pilot.press("y")
        await wait_for(pilot, "job 8 cancelled", lambda: app.cluster.jobs[8].state == "cancelled")
        await wait_for(pilot, "the toast", lambda: "job 8 cancelled" in screen_text(app))


async def test_a_refusal_quoting_markup_and_escapes_is_a_readable_toast(tmp_path):
    app = app_on(tmp_path, RefusingLink(recorded.snapshot()))
    async with app.run_test(size=(120, 30), notifications=True) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        await pilot.press("2")
        app.jobs_view.table.move_to(8)
        await pilot.press("c")
        await wait_for(pilot, "the question", lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, "the refusal", lambda: "held by [/]someone\\x1b]0;pwned\\x07" in screen_text(app))


async def test_a_reply_merged_into_the_model_has_its_controls_made_visible(tmp_path):
    app = app_on(tmp_path, RecordedLink(recorded.snapshot()))
    async with app.run_test(size=(100, 30), notifications=True) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        app.cluster.upsert_job(job_view(dict(recorded.snapshot()["jobs"][1], name="evil\x1b]0;pwned\x07")))
        assert app.cluster.jobs[8].name == "evil\\x1b]0;pwned\\x07"


async def test_why_no_coordinator_answered_is_shown_as_text(tmp_path):
    reason = "cannot reach [/]node\x1b[2J at 10.0.0.9"
    app = app_on(tmp_path, RecordedLink(not_found=reason))
    async with app.run_test(size=(100, 30), notifications=True) as pilot:
        await wait_for(pilot, "the not-found screen", lambda: isinstance(app.screen, NotFoundScreen))
        await wait_for(pilot, "the reason", lambda: "cannot reach [/]node\\x1b[2J at 10.0.0.9" in screen_text(app))


async def test_a_lost_connection_banner_shows_the_reason_as_text(tmp_path):
    app = app_on(tmp_path, RecordedLink(recorded.snapshot()))
    async with app.run_test(size=(160, 30)) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        app._lost(Lost("refused: [/]x\x1b]0;t\x07", 1.0, 1))
        await wait_for(pilot, "the banner", lambda: "refused: [/]x\\x1b]0;t\\x07" in screen_text(app))
