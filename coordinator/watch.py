"""The change stream for watching clients (the TUI): a snapshot once (the `watch` reply), then only
what changed.

Views are computed once per publish for everyone; each watcher gets the same small update, so the
cost grows with the changes, not with clients times cluster size. A watcher whose connection fails
is dropped; it gets a fresh snapshot when it watches again.
"""

from __future__ import annotations

import logging
from typing import Any

from gpudeck.protocol.messages import Update
from gpudeck.protocol.session import Connection

log = logging.getLogger(__name__)
VOLATILE = ("last_heartbeat_age",)  # changes every second by itself; the client can age it


def _comparable(view: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in view.items() if k not in VOLATILE}


class Publisher:
    def __init__(self) -> None:
        self.watchers: set[Connection] = set()
        self.nodes: dict[str, dict[str, Any]] = {}
        self.unjoined: list[dict[str, Any]] = []
        self.jobs: dict[int, dict[str, Any]] = {}

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

    async def broadcast(self, update: dict[str, Any]) -> None:
        for conn in list(self.watchers):
            try:
                await conn.send(Update(data=update))
            except (OSError, ConnectionError, RuntimeError):
                self.watchers.discard(conn)
