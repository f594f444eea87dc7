"""The dashboard's people view under Pilot against a real coordinator and agents (simulated GPUs):
each user's GPUs, queue, share and recent usage, and an idle job marked in the jobs view."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.cluster import Cluster
from tests.tui.helpers import live_app, rows, wait_for

SIZE = (120, 36)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Cluster]:
    """A coordinator that marks jobs idle after 2 s, and two agents with 2 simulated GPUs each."""
    cluster = Cluster(tmp_path)
    cluster.start_coordinator("--idle-after", "2s")
    for name in ("node-a", "node-b"):
        cluster.start_agent(name)
    cluster.wait_nodes("up", 2)
    yield cluster
    cluster.stop()


async def test_the_people_view_shows_each_users_gpus_queue_and_usage(lab: Cluster):
    ada = lab.cli("user", "add", "ada").stdout.strip().splitlines()[-1]
    short = lab.submit("--name", "short", "--gpus", "1", "--no-project", "--", "sleep", "1")
    lab.wait_job(short, ("succeeded",))
    napper = lab.submit_json("--name", "napper", "--gpus", "2", "--no-project", "--", "sleep", "600", token=ada)["id"]
    lab.wait_job(napper, ("running",))
    waiting = lab.submit_json("--name", "big", "--gpus", "4", "--no-project", "--", "sleep", "1", token=ada)["id"]
    assert lab.job(waiting)["state"] == "pending"

    app = live_app(lab, usage_every=1)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("4")
        people = app.people_view
        await wait_for(pilot, "ada and admin with their usage", lambda: {"ada", "admin"} <= people.rows.keys()
                       and people.rows["ada"].week is not None, seen=lambda: str(people.rows))
        assert app.active_tab == "people" and people.table.has_focus
        them = people.rows["ada"]
        assert (them.running_gpus, them.running_jobs, them.pending_jobs) == (2, 1, 1), them
        admin = people.rows["admin"]
        assert (admin.running_gpus, admin.pending_jobs) == (0, 0) and admin.day is not None, admin
        assert admin.day.gpu_seconds > 0, admin
        assert people.table.keys[0] == "ada", "most GPUs now first"
        shown = rows(people.table)
        assert shown[0].split()[:4] == ["ada", "2", "1", "1"], shown
        assert "%" in shown[1] and "<0.01" in shown[1], shown

        await pilot.press("2")
        jobs = app.jobs_view.table
        await wait_for(pilot, "the sleeping job marked idle",
                       lambda: "idle" in jobs.row_text(napper) and "GPUs are at 0 %" in jobs.row_text(napper),
                       seen=lambda: jobs.row_text(napper))
