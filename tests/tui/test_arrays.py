"""The dashboard names the tasks of an array as a person types them (ARRAY.INDEX). A real coordinator
under a real dashboard, under Pilot."""

from __future__ import annotations

from tests.cluster import Cluster
from tests.tui.helpers import live_app, rows, wait_for


async def test_the_jobs_view_lists_array_tasks_as_array_dot_index(one_node: Cluster) -> None:
    array_id = one_node.submit("--name", "sweep", "--array", "0,4-5", "--no-project", "--", "sleep", "600")
    app = live_app(one_node)
    async with app.run_test(size=(140, 30)) as pilot:
        await wait_for(pilot, "the three tasks", lambda: len(app.cluster.jobs) == 3)
        await pilot.press("2")
        table = app.jobs_view.table
        await wait_for(pilot, "the tasks listed", lambda: len(rows(table)) == 3, seen=lambda: str(rows(table)))
        assert sorted(row.split()[0] for row in rows(table)) == [f"{array_id}.{i}" for i in (0, 4, 5)], rows(table)
