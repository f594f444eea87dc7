"""gpudeck doctor across three "hosts" in network namespaces, with the faults it exists to find made
real by the kernel's traffic control on one host's veth: a slow link (an HTB rate), job ports that
do not answer (a u32 match on the job ports sending into a queue of length 0, as a firewall that
drops them would), and a rendezvous no other node can reach. There is no iptables or nft here; tc
is what the lab has. Agents find the coordinator over mDNS, so what each sees is real too.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.cluster import wait_until
from tests.netns import SKIP_REASON, Host, Lab, NamespaceProcesses, netns_available, print_logs_if_failed, running_lab

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(not netns_available() or subprocess.run(["which", "tc"], capture_output=True).returncode != 0,
                       reason=SKIP_REASON + ", and tc (iproute2) to shape and drop traffic"),
    pytest.mark.timeout(180),
]
PORT = 7070
JOB_PORTS = (29696, 29703)  # eight ports: one u32 match with mask 0xfff8 covers them all
NODES = ("ns-node-1", "ns-node-2", "ns-node-3")  # node-rank order: the check's rendezvous is on ns-node-1


class DoctorLab:
    def __init__(self, lab: Lab, procs: NamespaceProcesses) -> None:
        self.lab, self.procs = lab, procs
        self.token = ""

    def start(self) -> None:
        first = self.lab.hosts[0]
        state = self.procs.root / "coordinator-state"
        self.procs.spawn("coordinator", first, "coordinator", "--host", first.address, "--port", str(PORT),
                         "--state-dir", str(state), "--job-ports", "-".join(map(str, JOB_PORTS)))
        self.token = wait_until(lambda: self._token(state), 20, "the coordinator's token")
        for name, host in zip(NODES, self.lab.hosts):
            self.procs.spawn(name, host, "agent", "--token", self.token, "--name", name, "--simulate-gpus", "1",
                             "--warm", "0", "--state-dir", str(self.procs.root / name))
        wait_until(self._all_up, 60, "three agents to join over mDNS")

    def _token(self, state: Any) -> str:
        result = self.procs.run(self.lab.hosts[0], "token", "--state-dir", str(state))
        return result.stdout.strip() if result.returncode == 0 else ""

    def _all_up(self) -> bool:
        nodes = self.procs.json(self.lab.hosts[0], "nodes", "--coordinator", f"{self.lab.hosts[0].address}:{PORT}",
                                "--token", self.token)
        return sorted(n["name"] for n in nodes if n["state"] == "up") == list(NODES)

    def doctor(self) -> tuple[int, dict[str, Any]]:
        """`gpudeck doctor --json` from the coordinator's host: its exit code and report."""
        result = self.procs.run(self.lab.hosts[0], "doctor", "--json", "--size", "1M", "--timeout", "5s",
                                "--coordinator", f"{self.lab.hosts[0].address}:{PORT}", "--token", self.token,
                                timeout=150)
        assert result.stdout, result.stderr
        return result.returncode, json.loads(result.stdout)


def tc(host: Host, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", host.ns, "tc", *args], check=True, capture_output=True, timeout=20)


def shape(host: Host, rate: str) -> None:
    """Everything `host` sends goes through one HTB class of `rate`."""
    tc(host, "qdisc", "add", "dev", host.ifname, "root", "handle", "1:", "htb", "default", "10")
    tc(host, "class", "add", "dev", host.ifname, "parent", "1:", "classid", "1:10", "htb", "rate", rate)


def drop_job_ports(host: Host) -> None:
    """What `host` sends from a job port is dropped (a queue of length 0): its listeners there never
    answer, while its own connections out (from ports the kernel picks) pass."""
    shape(host, "10gbit")
    tc(host, "class", "add", "dev", host.ifname, "parent", "1:", "classid", "1:20", "htb", "rate", "10gbit")
    tc(host, "qdisc", "add", "dev", host.ifname, "parent", "1:20", "handle", "20:", "pfifo", "limit", "0")
    tc(host, "filter", "add", "dev", host.ifname, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
       "match", "ip", "sport", str(JOB_PORTS[0]), "0xfff8", "flowid", "1:20")


@contextmanager
def fault(host: Host, make: Callable[[Host], None]) -> Iterator[None]:
    """`make` the fault on `host` for the block's length: its veth's queueing is reset after."""
    make(host)
    try:
        yield
    finally:
        tc(host, "qdisc", "del", "dev", host.ifname, "root")


@pytest.fixture(scope="module")
def doctor_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DoctorLab]:
    with running_lab(tmp_path_factory.mktemp("doctor-netns"), 3) as (lab, procs):
        running = DoctorLab(lab, procs)
        running.start()
        yield running


@pytest.fixture(autouse=True)
def _logs_on_failure(doctor_lab: DoctorLab, request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    print_logs_if_failed(request, doctor_lab.procs, ("coordinator", *NODES), tail=3000)


def _pairs(report: dict[str, Any]) -> dict[tuple[str, ...], dict[str, Any]]:
    return {tuple(pair["nodes"]): pair for pair in report["pairs"]}


def test_a_slow_link_is_named_and_the_node_behind_it(doctor_lab: DoctorLab) -> None:
    with fault(doctor_lab.lab.hosts[2], lambda host: shape(host, "40mbit")):
        code, report = doctor_lab.doctor()
    pairs = _pairs(report)
    fast = pairs[("ns-node-1", "ns-node-2")]["busbw"]
    for slow in (("ns-node-1", "ns-node-3"), ("ns-node-2", "ns-node-3")):
        assert pairs[slow]["busbw"] < 0.1 * fast
        assert any(text.startswith(f"the link {' ↔ '.join(slow)} is slow: ") for text in report["problems"])
    assert "every link of ns-node-3 is slow: look at ns-node-3's network first (cable, port speed, MTU)" \
        in report["problems"]
    assert code == 1 and report["all"]["nodes"] == list(NODES) and report["all"]["busbw"] < 0.1 * fast
    hosts = {name: host for name, host in zip(NODES, doctor_lab.lab.hosts)}
    assert {(r["source"], r["target"]): (r["interface"], r["address"], r["ports_reachable"])
            for r in report["paths"]} == {(a, b): (hosts[a].ifname, hosts[a].address, True)
                                          for a in NODES for b in NODES if a != b}
    for node in report["nodes"]:  # every agent sees the others' adverts and the coordinator's
        assert node["mdns"]["agent"] == [name for name in NODES if name != node["name"]]
        assert len(node["mdns"]["coordinator"]) == 1
    assert report["warnings"] == []


def test_job_ports_that_do_not_answer_are_named_while_gloo_still_connects(doctor_lab: DoctorLab) -> None:
    with fault(doctor_lab.lab.hosts[2], drop_job_ports):
        code, report = doctor_lab.doctor()
    blocked = {(r["source"], r["target"]) for r in report["paths"] if not r["ports_reachable"]}
    assert blocked == {("ns-node-1", "ns-node-3"), ("ns-node-2", "ns-node-3")}
    assert code == 1 and any(text.startswith("ns-node-1 cannot reach ns-node-3 on the job ports (ns-node-3:")
                             and text.endswith("no answer in 3 s); jobs across them will hang in their rendezvous")
                             for text in report["problems"])
    # gloo's own connections use ports the kernel picks, outside the job range: they still pass
    assert all(pair["error"] is None and pair["busbw"] > 0 for pair in report["pairs"])


def test_nodes_that_cannot_reach_the_rendezvous_are_reported_and_the_check_still_ends(doctor_lab: DoctorLab) -> None:
    first = doctor_lab.lab.hosts[0]
    with fault(first, drop_job_ports):
        code, report = doctor_lab.doctor()
    assert code == 1 and [n["reached"] for n in report["nodes"]] == [True, False, False]
    assert report["problems"] == [f"{name} did not reach the check's rendezvous on ns-node-1 ({first.address}): "
                                  "it never answered" for name in NODES[1:]]
    assert report["pairs"] == [] and report["paths"] == []
