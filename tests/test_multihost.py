"""Three "hosts" in network namespaces on one bridge: real mDNS across hosts, and a 2-node DDP job.

ns1 runs the coordinator, ns2 and ns3 run agents that are given only the token: they must find the
coordinator over multicast DNS on the bridge. mDNS runs with its default (all interfaces) here, which
is safe because a namespace only sees lo and its veth into the lab's bridge. The job is the case where
gloo has to use the bridge interface instead of the address the host name maps to (127.0.0.1).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.cluster import wait_until
from tests.conftest import SCRIPTS
from tests.netns import SKIP_REASON, Lab, NamespaceProcesses, netns_available, print_logs_if_failed, running_lab

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not netns_available(), reason=SKIP_REASON),
    pytest.mark.timeout(120),
]
PORT = 7070  # the default port: each namespace has its own port space
GRAD_BYTES = 2080 * 4  # Linear(64, 32): 2,080 float32 parameters, all-reduced once per step per rank
AGENTS = ("ns-node-2", "ns-node-3")


class MultiHost:
    """The lab plus the processes in it, and the client calls the tests make from the coordinator's host."""

    def __init__(self, lab: Lab, procs: NamespaceProcesses) -> None:
        self.lab, self.procs = lab, procs
        self.coord_host = lab.hosts[0]
        self.token = ""

    @property
    def address(self) -> str:
        return f"{self.coord_host.address}:{PORT}"

    def start(self) -> None:
        """Coordinator in ns1 (default mDNS), agents in ns2 and ns3 with the token and no address."""
        state = self.procs.root / "coordinator-state"
        self.procs.spawn("coordinator", self.coord_host, "coordinator", "--host", self.coord_host.address,
                         "--port", str(PORT), "--state-dir", str(state))
        self.token = wait_until(lambda: self._token(state), 20, "the coordinator's token")
        for name, host in zip(AGENTS, self.lab.hosts[1:]):
            self.procs.spawn(name, host, "agent", "--token", self.token, "--name", name, "--simulate-gpus", "1",
                             "--state-dir", str(self.procs.root / name))

    def _token(self, state: Path) -> str:
        result = self.procs.run(self.coord_host, "token", "--state-dir", str(state))
        return result.stdout.strip() if result.returncode == 0 else ""

    def client(self, *args: str) -> list[str]:
        """Client flags before any script, so they are not taken as the script's arguments."""
        return [*args, "--coordinator", self.address, "--token", self.token]

    def nodes(self) -> list[dict[str, Any]]:
        return self.procs.json(self.coord_host, *self.client("nodes"))

    def wait_joined(self, timeout: float = 40) -> list[dict[str, Any]]:
        def both_up() -> list[dict[str, Any]] | None:
            up = [n for n in self.nodes() if n["state"] == "up"]
            return up if len(up) == len(AGENTS) else None

        return wait_until(both_up, timeout, "both agents to join over mDNS")


@pytest.fixture(scope="module")
def multihost(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiHost]:
    """Built once for the module (the mDNS joins are the slow part); torn down even on failure."""
    with running_lab(tmp_path_factory.mktemp("multihost"), 3) as (lab, procs):
        cluster = MultiHost(lab, procs)
        cluster.start()
        yield cluster


@pytest.fixture(autouse=True)
def _logs_on_failure(multihost: MultiHost, request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    print_logs_if_failed(request, multihost.procs, ("coordinator", *AGENTS))


def test_agents_in_other_namespaces_find_the_coordinator_over_mdns(multihost: MultiHost) -> None:
    """Multicast crosses the bridge both ways: agents join, and the coordinator sees their adverts."""
    nodes = multihost.wait_joined()
    addresses = {n["name"]: n["address"] for n in nodes}
    assert addresses == {name: host.address for name, host in zip(AGENTS, multihost.lab.hosts[1:])}
    for name in AGENTS:
        assert f"joined the coordinator at {multihost.coord_host.address}" in multihost.procs.logs_of(name)
    human = multihost.procs.run(multihost.coord_host, *multihost.client("nodes"))
    assert human.returncode == 0 and "not joined" not in human.stdout, human.stdout


def test_client_without_coordinator_flag_finds_it_over_mdns(multihost: MultiHost) -> None:
    """A client with an empty data dir (no endpoint file) and no address browses and finds ns1's coordinator."""
    multihost.wait_joined()
    nodes = multihost.procs.json(multihost.coord_host, "nodes", "--token", multihost.token, home="mdns-client")
    assert sorted(n["name"] for n in nodes) == sorted(AGENTS)
    assert not any((multihost.procs.root / "homes" / "mdns-client").iterdir()), "the data dir must stay empty"


@pytest.mark.slow
def test_two_node_ddp_job_across_namespaces(multihost: MultiHost) -> None:
    """gloo must bind the bridge interface (GLOO_SOCKET_IFNAME): otherwise rank 1 hangs on 127.0.0.1."""
    multihost.wait_joined()
    submit = multihost.procs.run(multihost.coord_host, *multihost.client("submit", "--json", "--nodes", "2",
                                 "--gpus-per-node", "1"), str(SCRIPTS / "ddp_linear.py"), "--steps", "5")
    assert submit.returncode == 0, submit.stderr
    job_id = str(json.loads(submit.stdout)["id"])
    job = wait_until(lambda: _finished(multihost, job_id), 60, f"job {job_id} to finish", interval=0.5)
    assert job["state"] == "succeeded", _job_failure(multihost, job_id, job)
    assert sorted(job["nodes"]) == sorted(AGENTS)
    assert job["traffic"]["by_kind"]["all_reduce"] == 2 * 5 * GRAD_BYTES == 83200
    logs = multihost.procs.run(multihost.coord_host, *multihost.client("logs", job_id)).stdout
    assert "[rank 0] rank 0 step 4" in logs and "[rank 1] rank 1 step 4" in logs


def _finished(multihost: MultiHost, job_id: str) -> dict[str, Any] | None:
    job = multihost.procs.json(multihost.coord_host, *multihost.client("show", job_id))
    return job if job["state"] in ("succeeded", "failed", "cancelled") else None


def _job_failure(multihost: MultiHost, job_id: str, job: dict[str, Any]) -> str:
    try:
        logs = multihost.procs.run(multihost.coord_host, *multihost.client("logs", job_id, "--launcher")).stdout
    except subprocess.TimeoutExpired:
        logs = "(logs timed out)"
    return f"{json.dumps(job, indent=2)}\n{logs[-4000:]}"
