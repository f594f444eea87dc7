"""mDNS discovery with real zeroconf on real sockets, confined to loopback.

Every process started here gets `--mdns-interface 127.0.0.1` (and the in-process Discovery objects get
`["127.0.0.1"]`), so nothing multicasts on the machine's real network (see FIELD-NOTES, zeroconf).
Client commands always get `--coordinator`: without it a client browses on *all* interfaces, which is
only safe inside a network namespace (tests/test_multihost.py covers that path).
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from gpudeck.discovery import Advert, Discovery
from gpudeck.protocol.messages import PROTOCOL_VERSION
from tests.cluster import Cluster, wait_until

LOOPBACK = "127.0.0.1"
MDNS = ("--mdns-interface", LOOPBACK)


class MdnsCluster(Cluster):
    """A Cluster whose coordinator advertises over mDNS on loopback instead of running with --no-mdns."""

    def start_coordinator(self, *extra: str) -> None:
        self.spawn("coordinator", "coordinator", "--host", LOOPBACK, "--port", str(self.port),
                   "--state-dir", str(self.root / "coord"), *MDNS, *extra)
        self.token = wait_until(self._read_token, 20, "the coordinator's token")
        wait_until(self._accepting, 20, "the coordinator to listen")

    def start_mdns_agent(self, name: str, token: str, gpus: int = 1) -> None:
        """An agent with no --coordinator: it has to find the coordinator over loopback mDNS."""
        self.spawn(name, "agent", "--token", token, "--name", name, "--simulate-gpus", str(gpus), *MDNS,
                   "--state-dir", str(self.root / name))

    def nodes_human(self) -> str:
        return self.cli("nodes").stdout


def _unique(prefix: str) -> str:
    """Names unique per run, so adverts of other loopback runs on this machine never match ours."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def mdns_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[MdnsCluster]:
    """A coordinator advertising on loopback mDNS and no agents; every process is stopped at the end."""
    cluster = MdnsCluster(tmp_path)
    try:
        cluster.start_coordinator()
        yield cluster
    finally:
        cluster.stop()
        if getattr(request.node, "rep_call", None) is None or request.node.rep_call.failed:
            for log in sorted(tmp_path.glob("*.log")):
                print(f"--- {log.stem} log\n{log.read_text(errors='replace')[-4000:]}")


def test_agent_without_coordinator_flag_finds_it_over_mdns_and_joins(mdns_cluster: MdnsCluster) -> None:
    """The default way a node joins: no address given, only the token; the mDNS advert is the hint."""
    name = _unique("mdns-node")
    mdns_cluster.start_mdns_agent(name, mdns_cluster.token)
    nodes = mdns_cluster.wait_nodes("up", 1, timeout=30)
    assert [n["name"] for n in nodes] == [name]
    assert "joined the coordinator at 127.0.0.1" in mdns_cluster.logs_of(name)
    assert name not in mdns_cluster.nodes_human().partition("not joined")[2]


def test_agent_with_wrong_token_is_seen_but_never_joins(mdns_cluster: MdnsCluster) -> None:
    """An advert alone never makes a node: the coordinator lists it as unjoined with the reason."""
    name = _unique("intruder")
    wrong_secret = mdns_cluster.token.rsplit(".", 1)[0] + "." + "B" * 43  # right pin: reaches the secret check
    mdns_cluster.start_mdns_agent(name, wrong_secret, gpus=3)

    def unjoined_line() -> str | None:
        listing = mdns_cluster.nodes_human()
        _, marker, tail = listing.partition("seen on the network but not joined:")
        lines = [line for line in tail.splitlines() if name in line] if marker else []
        return lines[0] if lines and "wrong join token" in lines[0] else None

    line = wait_until(unjoined_line, 30, f"{name} listed as seen but refused")
    assert f"{name} at {LOOPBACK} (3 GPUs)" in line
    wait_until(lambda: "refused this agent" in mdns_cluster.logs_of(name), 10, "the agent to log its refusal")
    assert all(n["name"] != name for n in mdns_cluster.nodes()), "a refused agent must never be a node"


# --- the Discovery class in-process ---------------------------------------------------------------


async def _poll(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Await until predicate() is true; zeroconf delivers its callbacks on this same event loop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)


def _ours(discovery: Discovery, node: str) -> list[Advert]:
    return [a for a in discovery.adverts("agent") if a.node == node]


async def test_discovery_advertise_browse_and_goodbye_on_loopback() -> None:
    """Advertise and browse meet on 127.0.0.1, and an awaited close() sends a goodbye browsers act on."""
    node = _unique("disc")
    advertiser, browser = Discovery([LOOPBACK]), Discovery([LOOPBACK])
    try:
        await advertiser.start()
        await browser.start()
        await advertiser.advertise("agent", node, port=4242, gpus=3)
        await _poll(lambda: _ours(browser, node), 10, f"the browser to see {node}")
        [advert] = _ours(browser, node)
        assert (advert.role, advert.host, advert.port, advert.gpus, advert.version) == (
            "agent", LOOPBACK, 4242, 3, PROTOCOL_VERSION)
        assert not _ours(advertiser, node), "a process must not list its own advert"
        await advertiser.close()
        await _poll(lambda: not _ours(browser, node), 10, f"the goodbye of {node} to reach the browser")
    finally:
        await advertiser.close()
        await browser.close()
