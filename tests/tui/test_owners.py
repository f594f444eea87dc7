"""The dashboard knows whose token it holds (issue 13): every job shows its owner, the user's own are
marked, and `m` shows only theirs. A real coordinator under a real dashboard, under Pilot."""

from __future__ import annotations

from rich.text import Text

from tests.cluster import Cluster
from tests.tui.helpers import live_app, rows, wait_for


async def test_the_jobs_view_marks_and_filters_the_users_own_jobs(one_node: Cluster) -> None:
    ada = one_node.cli("user", "add", "ada").stdout.strip().splitlines()[-1]
    one_node.submit_json("--name", "adas-job", "--no-project", "--", "sleep", "600", token=ada)
    one_node.submit_json("--name", "admins-job", "--no-project", "--", "sleep", "600")
    app = live_app(one_node, ada)
    async with app.run_test(size=(140, 30)) as pilot:
        await wait_for(pilot, "both jobs", lambda: len(app.cluster.jobs) == 2)
        await pilot.press("2")
        table = app.jobs_view.table
        await wait_for(pilot, "the owners listed", lambda: any("ada" in r for r in rows(table)),
                       seen=lambda: str(rows(table)))
        owners = {job.name: app.jobs_view._row(job.id, table.palette)["owner"]
                  for job in app.cluster.jobs.values()}
        assert isinstance(owners["adas-job"], Text) and owners["adas-job"].style
        assert owners["admins-job"].plain == "admin" and not owners["admins-job"].style
        await pilot.press("m")
        await wait_for(pilot, "only ada's job", lambda: len(table.keys) == 1, seen=lambda: str(rows(table)))
        assert "adas-job" in rows(table)[0]
        await pilot.press("m")
        await wait_for(pilot, "both jobs again", lambda: len(table.keys) == 2, seen=lambda: str(rows(table)))
