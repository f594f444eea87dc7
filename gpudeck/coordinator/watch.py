"""The change stream for watching clients (the TUI): a snapshot once (the `watch` reply), then only
what changed.

Views are computed once per publish for everyone; each watcher gets the same small update, so the
cost grows with the changes, not with clients times cluster size. Publishing never waits on a
watcher: while a watcher's socket has not taken its last update, newer ones are merged into one
pending update (a node's or job's newest view replaces the older one), so a slow watcher receives
fewer, larger updates and loses nothing. A watcher that takes nothing for the connection's stall
limit is cut off; it gets a fresh snapshot when it watches again.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from gpudeck.protocol.framing import encode_frame
from gpudeck.protocol.messages import Update
from gpudeck.protocol.session import Connection

log = logging.getLogger(__name__)
VOLATILE = ("last_heartbeat_age",)  # changes every second by itself; the client can age it
JOBS_PER_FRAME = 1000  # about 700 KB of job views, well under the frame limit


def split_update(update: dict[str, Any], per_frame: int = JOBS_PER_FRAME) -> list[dict[str, Any]]:
    """An update (or a snapshot) as frames that each fit: the first has everything but the jobs past
    `per_frame`, the others only more jobs. A client applies them in order and ends in the same state."""
    jobs = update.get("jobs", [])
    if len(jobs) <= per_frame:
        return [update]
    pieces = [{**update, "jobs": jobs[:per_frame]}]
    pieces += [{"time": update["time"], "jobs": jobs[start:start + per_frame]}
               for start in range(per_frame, len(jobs), per_frame)]
    return pieces


def _comparable(view: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in view.items() if k not in VOLATILE}


def merge_updates(older: dict[str, Any], newer: dict[str, Any]) -> dict[str, Any]:
    """One update that says what `older` then `newer` said: the newest view of each node and job."""
    nodes = {n["name"]: n for n in older.get("nodes", [])}
    removed = set(older.get("removed_nodes", []))
    for node in newer.get("nodes", []):
        nodes[node["name"]] = node
        removed.discard(node["name"])
    for name in newer.get("removed_nodes", []):
        nodes.pop(name, None)
        removed.add(name)
    jobs = {j["id"]: j for j in older.get("jobs", [])}
    jobs.update({j["id"]: j for j in newer.get("jobs", [])})
    merged: dict[str, Any] = {"time": newer["time"]}
    if nodes:
        merged["nodes"] = list(nodes.values())
    if removed:
        merged["removed_nodes"] = sorted(removed)
    if "unjoined" in newer or "unjoined" in older:
        merged["unjoined"] = newer.get("unjoined", older.get("unjoined"))
    if jobs:
        merged["jobs"] = [jobs[job_id] for job_id in sorted(jobs)]
    return merged


def encode_update(update: dict[str, Any]) -> list[bytes]:
    return [encode_frame(Update(data=piece).to_wire()) for piece in split_update(update)]


class Watcher:
    """One watching connection: at most one update waits for its socket, merged with newer ones."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.pending: dict[str, Any] | None = None
        self._frames: list[bytes] | None = None  # `pending` encoded, while it is one broadcast unmerged
        self._ready = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._deliver())

    def offer(self, update: dict[str, Any], frames: list[bytes]) -> None:
        if self.pending is None:
            self.pending, self._frames = update, frames
        else:
            self.pending, self._frames = merge_updates(self.pending, update), None
        self._ready.set()

    async def _deliver(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            update, frames, self.pending, self._frames = self.pending, self._frames, None, None
            if update is None:
                continue
            if frames is None:
                frames = encode_update(update)
            if not all(self.conn.post_frame(frame) for frame in frames):
                return
            await self.conn.flushed()
            if self.conn.cut_off is not None:
                return

    @property
    def gone(self) -> bool:
        return self._task.done()

    def stop(self) -> None:
        self._task.cancel()


class Publisher:
    def __init__(self) -> None:
        self.watchers: dict[Connection, Watcher] = {}
        self.nodes: dict[str, dict[str, Any]] = {}
        self.unjoined: list[dict[str, Any]] = []
        self.jobs: dict[int, dict[str, Any]] = {}

    def watch(self, conn: Connection) -> None:
        """Start streaming to a client that has just been sent its snapshot."""
        if conn not in self.watchers:
            self.watchers[conn] = Watcher(conn)

    def unwatch(self, conn: Connection) -> None:
        watcher = self.watchers.pop(conn, None)
        if watcher:
            watcher.stop()

    def publish_data(self, nodes: list[dict[str, Any]], unjoined: list[dict[str, Any]],
                     changed_jobs: list[dict[str, Any]], now: float) -> dict[str, Any] | None:
        """The update since the last call, or None when nothing changed."""
        current = {n["name"]: n for n in nodes}
        changed_nodes = [n for name, n in current.items()
                         if name not in self.nodes or _comparable(self.nodes[name]) != _comparable(n)]
        removed = sorted(set(self.nodes) - set(current))
        jobs = [j for j in changed_jobs if self.jobs.get(j["id"]) != j]
        update: dict[str, Any] = {"time": now}
        if changed_nodes:
            update["nodes"] = changed_nodes
        if removed:
            update["removed_nodes"] = removed
        if unjoined != self.unjoined:
            update["unjoined"] = unjoined
        if jobs:
            update["jobs"] = jobs
        self.nodes = current
        self.unjoined = unjoined
        self.jobs.update({j["id"]: j for j in changed_jobs})
        return update if len(update) > 1 else None

    def broadcast(self, update: dict[str, Any]) -> None:
        """Hand the update to every watcher, encoded once; returns at once whatever their sockets do."""
        frames = encode_update(update)
        for conn, watcher in list(self.watchers.items()):
            if watcher.gone:
                del self.watchers[conn]
            else:
                watcher.offer(update, frames)
