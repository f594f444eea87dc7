"""Several "hosts" on one machine: network namespaces joined by a bridge, for multi-host tests.

Everything lives inside namespaces this module creates, including the bridge (in a "switch"
namespace), so nothing is added to the root namespace and no multicast can reach the machine's real
interfaces: mDNS inside a host namespace only sees lo and its veth into the bridge. The bridge has
mcast_snooping off so multicast floods between namespaces with no extra route (see FIELD-NOTES).
Deleting the namespaces destroys the bridge and every veth with them.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.cluster import THREAD_SETTINGS, stop_processes

SKIP_REASON = "needs root and iproute2 to build network namespaces"


def netns_available() -> bool:
    """Root and a working `ip netns`; anything else cannot build the lab."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    try:
        return subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def ip(*args: str) -> None:
    """Run one iproute2 command; a failure says which one, since a half-built lab is hard to debug."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")


@dataclass(frozen=True)
class Host:
    """One namespace with one address on the lab's subnet."""

    ns: str
    ifname: str
    address: str


@dataclass
class Lab:
    """A bridge in a switch namespace and `count` host namespaces, each on a private /24."""

    count: int
    suffix: str = field(default_factory=lambda: secrets.token_hex(3))
    subnet: str = field(default_factory=lambda: f"10.213.{secrets.randbelow(250) + 1}")
    hosts: list[Host] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"gdsw-{self.suffix}"

    def build(self) -> None:
        """Create the switch and the hosts; on any failure the caller's `teardown` removes what exists."""
        self._add_namespace(self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for index in range(1, self.count + 1):
            self.hosts.append(self._add_host(index))

    def _add_namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self.namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")  # the agent's traffic sink and torchrun use loopback

    def _add_host(self, index: int) -> Host:
        host = Host(ns=f"gdh{index}-{self.suffix}", ifname=f"gd{index}{self.suffix}", address=f"{self.subnet}.{index}")
        self._add_namespace(host.ns)
        port = f"sw{index}{self.suffix}"
        ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", host.ifname, "netns", host.ns)
        ip("-n", self.switch, "link", "set", port, "master", "br0")
        ip("-n", self.switch, "link", "set", port, "up")
        ip("-n", host.ns, "addr", "add", f"{host.address}/24", "dev", host.ifname)
        ip("-n", host.ns, "link", "set", host.ifname, "up")
        return host

    def teardown(self) -> None:
        """Delete every namespace this lab made (the bridge and veths go with them); never raises."""
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)
        self.namespaces.clear()


@dataclass
class NamespaceProcesses:
    """`python -m gpudeck` processes run with `ip netns exec`, each with its own GPUDECK_HOME."""

    root: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def env(self, name: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUDECK_") and k not in THREAD_SETTINGS}
        home = self.root / "homes" / name
        home.mkdir(parents=True, exist_ok=True)
        env.update({"GPUDECK_HOME": str(home), "PYTHONUNBUFFERED": "1"})
        return env

    def command(self, host: Host, *args: str) -> list[str]:
        # `ip netns exec` execs the command, so the Popen pid is python's own and signals reach it.
        return ["ip", "netns", "exec", host.ns, sys.executable, "-m", "gpudeck", *args]

    def spawn(self, name: str, host: Host, *args: str) -> subprocess.Popen[bytes]:
        with open(self.root / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(self.command(host, *args), stdout=log, stderr=subprocess.STDOUT,
                                    env=self.env(name), cwd=self.root)
        self.procs[name] = proc
        return proc

    def run(self, host: Host, *args: str, home: str = "client",
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(host, *args), capture_output=True, text=True, env=self.env(home),
                              cwd=self.root, timeout=timeout)

    def json(self, host: Host, *args: str, home: str = "client") -> Any:
        result = self.run(host, *args, "--json", home=home)
        if result.returncode != 0:
            raise AssertionError(f"gpudeck {' '.join(args)} exited {result.returncode}: {result.stderr}")
        return json.loads(result.stdout)

    def logs_of(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        stop_processes(self.procs, self.root)


@contextmanager
def running_lab(root: Path, count: int) -> Iterator[tuple[Lab, NamespaceProcesses]]:
    """A built lab of `count` hosts and the processes the caller starts in it, all stopped and
    torn down at the end, also on failure."""
    lab, procs = Lab(count=count), NamespaceProcesses(root)
    try:
        lab.build()
        yield lab, procs
    finally:
        procs.stop()
        lab.teardown()


def print_logs_if_failed(request: Any, procs: NamespaceProcesses, names: tuple[str, ...], tail: int = 4000) -> None:
    """After a test (from an autouse fixture): its processes' logs, when it failed or did not run."""
    report = getattr(request.node, "rep_call", None)
    if report is None or report.failed:
        for name in names:
            print(f"--- {name} log\n{procs.logs_of(name)[-tail:]}")
