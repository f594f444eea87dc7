"""The change stream the dashboard watches: a snapshot, then only what changed."""

from __future__ import annotations

import asyncio

import pytest

from gpudeck.client import connect
from gpudeck.config import Endpoint
from gpudeck.protocol.auth import JoinToken
from gpudeck.protocol.messages import Submit, Watch
from tests.cluster import Cluster
from tests.conftest import SCRIPTS

pytestmark = pytest.mark.slow


async def _next_with(updates: asyncio.Queue, key: str, predicate, timeout: float = 60) -> dict:
    async def wait() -> dict:
        while True:
            update = await updates.get()
            if any(predicate(item) for item in update.get(key, [])):
                return update
    return await asyncio.wait_for(wait(), timeout)


async def test_watch_gets_a_snapshot_then_only_changes(cluster: Cluster):
    endpoint = Endpoint("127.0.0.1", cluster.port, "test")
    async with connect([endpoint], JoinToken.parse(cluster.token), "test") as session:
        snapshot = await session.request(Watch)
        assert sorted(n["name"] for n in snapshot["nodes"]) == ["node-a", "node-b"]
        assert snapshot["jobs"] == [] and all(n["simulated"] for n in snapshot["nodes"])
        spec = {"name": "w", "gpus": 1, "run": {"script_name": "ddp_linear.py",
                                                "script": (SCRIPTS / "ddp_linear.py").read_bytes(),
                                                "args": ["--steps", "3"]}}
        job = await session.request(Submit, spec=spec)
        done = await _next_with(session.updates, "jobs", lambda j: j["id"] == job["id"] and j["state"] == "succeeded")
        finished = next(j for j in done["jobs"] if j["id"] == job["id"])
        assert finished["traffic"]["by_kind"]["all_reduce"] == 3 * 2080 * 4
        quiet = await asyncio.wait_for(session.updates.get(), 10)
        assert all(j["id"] != job["id"] for j in quiet.get("jobs", [])), "a finished job is not sent again"
        assert set(quiet) <= {"time", "nodes", "removed_nodes", "unjoined", "jobs"}
