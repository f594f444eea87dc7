"""Peers without the token cost the coordinator a bounded amount of memory and time, and never lock
out the cluster's own clients: a real coordinator process, attacked over loopback with a reduced count
of what `bench/unauthenticated_load.py` runs in full."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gpudeck.coordinator.admission import PROOF_DEADLINE, AdmissionGate
from tests import hostile
from tests.cluster import Cluster

GROWTH_LIMIT_MIB = 50


@pytest.fixture
def coordinator(tmp_path: Path):
    cluster = Cluster(tmp_path)
    cluster.start_coordinator()
    cluster.start_agent("node-a")
    cluster.wait_nodes("up", 1)
    yield cluster
    cluster.stop()


def _answers(cluster: Cluster) -> bool:
    result = cluster.cli("nodes", "--json", check=False)
    return result.returncode == 0 and '"node-a"' in result.stdout


def test_floods_without_the_token_cost_bounded_memory_and_the_cluster_keeps_answering(coordinator: Cluster):
    pid, port = coordinator.procs["coordinator"].pid, coordinator.port
    start = hostile.rss_mib(pid)

    idle = hostile.open_idle(port, 300)
    assert _answers(coordinator), "a client with the token gets in while 300 idle connections are open"
    assert hostile.wait_closed_by_peer(idle, PROOF_DEADLINE + 30), "idle connections are closed by the deadline"
    hostile.close_all(idle)

    hostile.connect_and_close(port, 500)

    big = hostile.announce_big_frames(port, 40)
    assert _answers(coordinator)
    assert hostile.wait_closed_by_peer(big, PROOF_DEADLINE + 30), "announcing a huge frame ends the connection"
    hostile.close_all(big)

    slow = hostile.slowloris(port, 30)
    assert _answers(coordinator), "a client gets in during a slowloris"
    assert hostile.wait_closed_by_peer(slow, PROOF_DEADLINE + 30), "a trickled TLS hello is cut off at the deadline"
    hostile.close_all(slow)

    grown = hostile.rss_mib(pid) - start
    assert grown < GROWTH_LIMIT_MIB, f"the coordinator grew by {grown:.0f} MiB and kept it"
    assert _answers(coordinator)


def test_a_large_frame_before_the_secret_is_refused_with_a_reason(coordinator: Cluster):
    answer = hostile.answer_to_big_frame(coordinator.port)
    assert b"over the 4096-byte limit" in answer


class FakeTransport(asyncio.WriteTransport):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


def test_the_gate_pushes_out_the_oldest_of_the_address_holding_the_most():
    gate = AdmissionGate(total=4, per_source=2)
    a1, a2, a3 = FakeTransport("a1"), FakeTransport("a2"), FakeTransport("a3")
    b1, c1, c2 = FakeTransport("b1"), FakeTransport("c1"), FakeTransport("c2")
    for transport, source in ((a1, "a"), (a2, "a"), (b1, "b")):
        gate.admit(transport, source)
    gate.admit(a3, "a")
    assert a1.aborted and not a2.aborted and len(gate) == 3, "over the per-address limit: that address's oldest"
    gate.admit(c1, "c")
    gate.admit(c2, "c")
    assert a2.aborted and not b1.aborted, "over the total: the oldest of the address holding the most"
    gate.proven(b1)
    assert len(gate) == 3 and not any(t.aborted for t in (a3, b1, c1, c2))
