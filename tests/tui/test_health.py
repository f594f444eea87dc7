"""A cordoned GPU in the dashboard: its row says cordoned with the cause, its node counts it, and the
detail says how to offer it again. Recorded data, no network."""

from __future__ import annotations

from gpudeck.tui.app import GpudeckApp
from gpudeck.tui.client import RecordedLink
from tests.conftest import SCRIPTS
from tests.tui import recorded
from tests.tui.helpers import screen_text, wait_for

CAUSE = "Xid 79 at 2026-12-03 07:31:02: the GPU has fallen off the bus"


async def test_a_cordoned_gpu_shows_its_cause_and_how_to_uncordon_it(tmp_path):
    snapshot = recorded.snapshot()
    node_a = snapshot["nodes"][0]
    node_a["cordoned"] = [{"gpu": 2, "cause": CAUSE, "since": recorded.T0 - 120}]
    app = GpudeckApp(RecordedLink(snapshot), keymap_path=tmp_path / "keymap.json", tick=0, cwd=str(SCRIPTS),
                     workloads={})
    async with app.run_test(size=(160, 40)) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        await pilot.press("1")
        await wait_for(pilot, "the cordoned GPU's row", lambda: "cordoned: Xid 79" in screen_text(app))
        text = screen_text(app)
        assert "x1 cordoned" in text
        app.nodes_view.table.move_to(("gpu", "node-a", 2))
        await wait_for(pilot, "the detail", lambda: "gpudeck gpu uncordon node-a:2" in screen_text(app))
        assert "cordoned for 2 min" in screen_text(app)
