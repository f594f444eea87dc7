"""The dashboard's view of the queue: a pending job's detail says when it is planned to start and what
its priority score is made of, and pending jobs are listed in the order they are served."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from gpudeck.protocol.views import JobView
from gpudeck.tui.client import RecordedLink
from gpudeck.tui.model import job_sort_key
from gpudeck.tui.screens.job import JobScreen
from tests.tui import recorded
from tests.tui.helpers import screen_text, wait_for
from tests.tui.test_newcomer import app_on

FACTORS = [{"name": "fair_share", "value": 0.5, "weight": 10000.0, "contribution": 5000.0},
           {"name": "age", "value": 0.001, "weight": 1000.0, "contribution": 1.0},
           {"name": "priority", "value": 0.5025, "weight": 1000.0, "contribution": 502.5}]


def queued_snapshot() -> dict[str, Any]:
    """The recorded cluster with its 4-GPU job reserved to start 10 minutes from the recorded time."""
    snapshot = recorded.snapshot()
    waiting = next(job for job in snapshot["jobs"] if job["id"] == 8)
    waiting.update(estimated_start=recorded.T0 + 600, priority_score=5503.5, priority_factors=FACTORS)
    return snapshot


async def test_a_pending_jobs_detail_shows_its_planned_start_and_score(tmp_path) -> None:
    app = app_on(tmp_path, RecordedLink(queued_snapshot()))
    async with app.run_test(size=(140, 40)) as pilot:
        await wait_for(pilot, "the snapshot", lambda: app.cluster.connected)
        app.push_screen(JobScreen(8))
        text = await wait_for(pilot, "the planned start", lambda: "planned" in screen_text(app) and screen_text(app),
                              seen=lambda: screen_text(app))
        assert re.search(r"starts in (9m\d\ds|10m00s) \(planned\)", text), text
        assert "priority score 5,504 = fair share 5,000 + age 1 + priority 502" in text, text
        app.pop_screen()
        app.push_screen(JobScreen(9))
        text = await wait_for(pilot, "job 9's detail", lambda: "eval" in screen_text(app) and screen_text(app))
        assert "start not planned yet" in text, text


def test_pending_jobs_sort_by_their_score_then_by_priority_from_an_older_coordinator() -> None:
    unscored = [JobView.from_json(recorded.job(3, "a", "pending", priority=0)),
                JobView.from_json(recorded.job(2, "b", "pending", priority=5))]
    scored = [replace(unscored[0], priority_score=9.0), replace(unscored[1], priority_score=1.0)]
    assert [job.id for job in sorted(scored, key=job_sort_key)] == [3, 2]
    assert [job.id for job in sorted(unscored, key=job_sort_key)] == [2, 3]
