"""Live state of the agents that are connected now: their links, last heartbeats and GPU readings.

The store keeps what must survive a restart (which nodes exist, their last state); the registry keeps
what only matters while the coordinator runs (the open connection, the latest telemetry). Health is
judged here from heartbeats alone: an mDNS advert never makes or keeps a node up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gpudeck.model import NodeState
from gpudeck.protocol.payloads import GpuReading, WarmStatus
from gpudeck.protocol.session import Connection

SUSPECT_AFTER = 3.0
DOWN_AFTER = 10.0


@dataclass
class AgentLink:
    """One connected agent."""

    name: str
    hostname: str
    address: str
    simulated: bool
    conn: Connection
    gpus: list[GpuReading]
    last_seen: float
    warm: WarmStatus = field(default_factory=WarmStatus)


@dataclass
class Registry:
    links: dict[str, AgentLink] = field(default_factory=dict)
    # Nodes whose heartbeat is being watched, with the time it was last heard (or the grace start).
    last_heard: dict[str, float] = field(default_factory=dict)
    states: dict[str, NodeState] = field(default_factory=dict)

    def watch(self, name: str, state: NodeState, since: float) -> None:
        """Follow a stored node from `since` (the coordinator's start gives reconnecting agents grace)."""
        self.states[name] = state
        if state is not NodeState.DOWN:
            self.last_heard[name] = since

    def attach(self, link: AgentLink) -> AgentLink | None:
        """Make `link` the node's connection; returns the link it replaces, if any."""
        previous = self.links.get(link.name)
        self.links[link.name] = link
        self.heard(link.name, link.last_seen)
        return previous

    def detach(self, link: AgentLink) -> bool:
        """Forget a closed connection unless a newer one already replaced it."""
        if self.links.get(link.name) is link:
            del self.links[link.name]
            return True
        return False

    def heard(self, name: str, now: float) -> None:
        self.last_heard[name] = now
        if name in self.links:
            self.links[name].last_seen = now

    def link(self, name: str) -> AgentLink | None:
        return self.links.get(name)

    def tick(self, now: float) -> list[tuple[str, NodeState]]:
        """Advance every node's health by the clock; returns the nodes whose state changed."""
        changes = []
        for name, heard in self.last_heard.items():
            if self.states.get(name) is NodeState.DOWN and name not in self.links:
                continue  # judged already; its last heartbeat stays, for the age clients show
            state = self._judge(name, now - heard)
            if state is not self.states.get(name):
                self.states[name] = state
                changes.append((name, state))
        return changes

    def _judge(self, name: str, silent: float) -> NodeState:
        if silent >= DOWN_AFTER:
            return NodeState.DOWN
        if silent >= SUSPECT_AFTER or name not in self.links:
            return NodeState.SUSPECT
        return NodeState.UP
