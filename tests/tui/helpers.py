"""Waiting on the dashboard under Pilot, and reading what its tables show."""

from __future__ import annotations

import time
from typing import Any, Callable

from textual.pilot import Pilot

from gpudeck.config import Endpoint
from gpudeck.protocol.auth import JoinToken
from gpudeck.tui.app import GpudeckApp
from gpudeck.tui.client import CoordinatorLink
from gpudeck.tui.table import DeckTable
from tests.cluster import Cluster
from tests.conftest import SCRIPTS


def live_app(cluster: Cluster, token: str | None = None, **options: Any) -> GpudeckApp:
    """The dashboard against a test cluster's coordinator, with the join token or a user's `token`,
    and scripts resolved from tests/scripts; `options` for the app."""
    link = CoordinatorLink(endpoints=[Endpoint("127.0.0.1", cluster.port, "test")],
                           join_token=JoinToken.parse(token or cluster.token))
    return GpudeckApp(link, keymap_path=cluster.root / "no-keymap.json", cwd=str(SCRIPTS), **options)


async def wait_for(pilot: Pilot, what: str, predicate: Callable[[], Any], timeout: float = 60.0,
                   seen: Callable[[], str] | None = None) -> Any:
    """Poll (letting the app run) until `predicate` is true; fail saying what did not happen, and
    what `seen` says was there instead."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await pilot.pause(0.1)
    instead = f"; instead: {seen()}" if seen else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{instead}")


def app_state(app: GpudeckApp) -> str:
    """Where the dashboard is: its screens, the focused widget, the view and the selected job."""
    job = app.selected_job()
    return (f"screens {[type(s).__name__ for s in app.screen_stack]}, focus {app.focused!r}, view {app.active_tab}, "
            f"selected job {job and (job.id, job.state)}, cancel applies: {app.check_action('cancel_job', ())}")


def rows(table: DeckTable, width: int = 200) -> list[str]:
    """Every row of a table as plain text (not only those on screen)."""
    return [table.row_text(key, width) for key in table.keys]


def screen_text(app: GpudeckApp) -> str:
    """What the terminal shows now, as plain text."""
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


async def type_text(pilot: Pilot, text: str) -> None:
    await pilot.press(*[{" ": "space", "/": "slash", ".": "full_stop", "-": "minus"}.get(c, c) for c in text])
