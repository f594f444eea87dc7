"""Sending never waits on a peer: the outbox of `Connection` and the watchers' coalescing, on real
socket pairs whose far end reads only when the test says so."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from gpudeck.coordinator.watch import Publisher, merge_updates
from gpudeck.protocol import session
from gpudeck.protocol.messages import Update
from gpudeck.protocol.node_messages import Telemetry
from gpudeck.protocol.payloads import GpuReading
from gpudeck.protocol.session import Connection


async def _pair() -> tuple[Connection, Connection]:
    near, far = socket.socketpair()
    for sock in (near, far):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    a = Connection(*await asyncio.open_connection(sock=near))
    b = Connection(*await asyncio.open_connection(sock=far))
    return a, b


async def _until(predicate: Any) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


def _big(n: int) -> Telemetry:
    return Telemetry(gpus=[GpuReading(index=n, name="x" * 60_000, uuid="", memory_total=None, memory_used=None,
                                      utilization=None, temperature=None, power=None, power_limit=None)])


@pytest.mark.timeout(60)
def test_post_returns_at_once_and_a_peer_over_the_outbox_limit_is_cut_off(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(session, "OUTBOX_LIMIT", 1_000_000)

    async def scenario() -> None:
        near, far = await _pair()
        posted = 0
        while near.post(_big(posted)):
            posted += 1
        assert 10 < posted < 20, "about a megabyte went into the outbox before the cut"
        assert near.cut_off and "unread" in near.cut_off
        await near.close()
        await far.close()

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_a_peer_that_takes_nothing_for_the_stall_limit_is_cut_off(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(session, "STALL_LIMIT", 0.5)

    async def scenario() -> None:
        near, far = await _pair()
        for n in range(20):
            near.post(_big(n))
        await asyncio.wait_for(_until(lambda: near.cut_off is not None), 30)
        assert "took nothing for" in near.cut_off  # type: ignore[operator]
        with pytest.raises(ConnectionError, match="took nothing"):
            await near.send(_big(0))
        await near.close()
        await far.close()

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_a_slow_watcher_gets_merged_updates_and_misses_nothing():
    async def scenario() -> None:
        near, far = await _pair()
        publisher = Publisher()
        publisher.watch(near)
        for step in range(200):
            publisher.broadcast({"time": float(step),
                                 "nodes": [{"name": f"n{step % 7}", "step": step, "pad": "x" * 2000}],
                                 "jobs": [{"id": step % 5, "step": step}]})
        assert near.queued_bytes < 200 * 2000, "no more than one update waits per watcher"
        nodes: dict[str, Any] = {}
        jobs: dict[int, Any] = {}
        frames = 0
        while not (len(nodes) == 7 and all(n["step"] >= 193 for n in nodes.values())):
            update = await asyncio.wait_for(far.recv(), 10)
            assert isinstance(update, Update)
            frames += 1
            nodes.update({n["name"]: n for n in update.data.get("nodes", [])})
            jobs.update({j["id"]: j for j in update.data.get("jobs", [])})
        assert frames < 200, "updates were merged while the watcher's socket was full"
        assert {j: jobs[j]["step"] for j in jobs} == {j: 195 + j for j in range(5)}
        publisher.unwatch(near)
        await near.close()
        await far.close()

    asyncio.run(scenario())


def test_merge_keeps_the_newest_view_and_removals():
    older = {"time": 1.0, "nodes": [{"name": "a", "v": 1}, {"name": "b", "v": 1}], "jobs": [{"id": 1, "v": 1}],
             "unjoined": [{"name": "x"}]}
    newer = {"time": 2.0, "nodes": [{"name": "a", "v": 2}], "removed_nodes": ["b"], "jobs": [{"id": 2, "v": 1}]}
    assert merge_updates(older, newer) == {
        "time": 2.0, "nodes": [{"name": "a", "v": 2}], "removed_nodes": ["b"],
        "unjoined": [{"name": "x"}], "jobs": [{"id": 1, "v": 1}, {"id": 2, "v": 1}]}
    back = {"time": 3.0, "nodes": [{"name": "b", "v": 3}]}
    merged = merge_updates(merge_updates(older, newer), back)
    assert "removed_nodes" not in merged and {n["name"] for n in merged["nodes"]} == {"a", "b"}
