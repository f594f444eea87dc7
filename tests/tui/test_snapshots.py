"""Snapshots of every view at a fixed size, time zone (UTC, see conftest) and theme, from recorded data and
a frozen clock, so they are the same on every run. Record with `pytest tests/tui --snapshot-update`."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.pilot import Pilot

from gpudeck.tui.app import GpudeckApp
from gpudeck.tui.client import RecordedLink
from tests.conftest import SCRIPTS
from tests.tui import recorded
from tests.tui.helpers import wait_for

SIZE = (100, 30)
SETTLED = 5  # recorded updates applied before the screenshot


class Frozen:
    def __init__(self, value: float) -> None:
        self.value = value

    def __call__(self) -> float:
        return self.value


def recorded_app(tmp_path: Path, link: RecordedLink | None = None) -> GpudeckApp:
    link = link or RecordedLink(recorded.snapshot(), logs=recorded.LOGS)
    app = GpudeckApp(link, keymap_path=tmp_path / "keymap.json", wall=Frozen(recorded.T0 + SETTLED),
                     mono=Frozen(100.0), tick=0, cwd=str(SCRIPTS), workloads=recorded.WORKLOADS)
    app.theme = "textual-dark"
    return app


def settle(*keys: str, updates: int = SETTLED):
    """A run_before that replays the recorded updates, then presses `keys`."""

    async def run(pilot: Pilot) -> None:
        app = pilot.app
        assert isinstance(app, GpudeckApp)
        link = app.link
        assert isinstance(link, RecordedLink)
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected and link.pushed is not None)
        for update in recorded.updates(updates):
            link.push(update)
        await wait_for(pilot, "the updates", lambda: app.cluster.time == recorded.T0 + updates)
        await pilot.pause()
        for key in keys:
            await pilot.press(key)
            await pilot.pause()

    return run


@pytest.fixture(autouse=True)
def _colour(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("GPUDECK_THEME", raising=False)


def test_nodes(snap_compare, tmp_path):
    assert snap_compare(recorded_app(tmp_path), terminal_size=SIZE, run_before=settle())


def test_nodes_80x24(snap_compare, tmp_path):
    assert snap_compare(recorded_app(tmp_path), terminal_size=(80, 24), run_before=settle())


def test_nodes_wide(snap_compare, tmp_path):
    assert snap_compare(recorded_app(tmp_path), terminal_size=(160, 30), run_before=settle())


def test_nodes_no_color(snap_compare, tmp_path, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    assert snap_compare(recorded_app(tmp_path), terminal_size=SIZE, run_before=settle())


def test_jobs(snap_compare, tmp_path):
    assert snap_compare(recorded_app(tmp_path), terminal_size=SIZE, run_before=settle("2", "down"))


def test_jobs_filtered_80x24(snap_compare, tmp_path):
    assert snap_compare(recorded_app(tmp_path), terminal_size=(80, 24),
                        run_before=settle("2", "slash", "p", "e", "n", "d"))


def test_traffic(snap_compare, tmp_path):
    assert snap_compare(recorded_app(tmp_path), terminal_size=SIZE, run_before=settle("3"))


def test_job_detail_traffic(snap_compare, tmp_path):
    assert snap_compare(recorded_app(tmp_path), terminal_size=SIZE, run_before=settle("2", "enter"))


def test_job_detail_logs(snap_compare, tmp_path):
    assert snap_compare(recorded_app(tmp_path), terminal_size=SIZE, run_before=settle("2", "l"))


def test_submit_form_says_why_before_sending(snap_compare, tmp_path):
    keys = ("s", *"slow_ddp.py --steps 50", "tab", "9", "tab", "tab", *"soon")
    assert snap_compare(recorded_app(tmp_path), terminal_size=SIZE, run_before=settle(*keys))


def test_cancel_asks_first(snap_compare, tmp_path):
    assert snap_compare(recorded_app(tmp_path), terminal_size=SIZE, run_before=settle("2", "c"))


def test_help(snap_compare, tmp_path):
    assert snap_compare(recorded_app(tmp_path), terminal_size=SIZE, run_before=settle("question_mark"))


def test_no_coordinator(snap_compare, tmp_path):
    link = RecordedLink(not_found=(
        "no coordinator found: none given with --coordinator HOST:PORT or $GPUDECK_COORDINATOR, none running from "
        "this machine's data dir, and none answered over mDNS. Start one with `gpudeck up` (all on this machine) "
        "or `gpudeck coordinator`."))

    async def run(pilot: Pilot) -> None:
        await wait_for(pilot, "the not-found screen", lambda: len(pilot.app.screen_stack) > 1)

    assert snap_compare(recorded_app(tmp_path, link), terminal_size=(80, 24), run_before=run)
