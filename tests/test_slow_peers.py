"""A peer that stops reading must not stop the cluster: the control loop never waits on a socket.

A host (network namespace) with 4 KiB socket buffers holds a coordinator, one real agent and 15
swarm agents (tests/swarm.py: real TLS connections speaking the agent protocol, 8 simulated GPUs
each, all busy), so every second brings a change to 120 GPUs. A watcher that never reads fills its buffers
within a second; the test waits until both ends of its connection are full (`ss`), and then until a
second watcher that does read has received more than asyncio would buffer for the stuck one (its
TLS transport takes 512 KiB before `drain` waits). Then it kills the real agent. Before the outbox,
the control loop waited in the stuck watcher's `drain`: the reading watcher got nothing more and
`gpudeck nodes` kept showing the dead node `up`; now it is down within the heartbeat deadline, and a
submit is placed and started.
"""

from __future__ import annotations

import json

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Iterator

import pytest

from gpudeck.coordinator.registry import DOWN_AFTER
from tests.cluster import ROOT, Terminal, wait_until
from tests.netns import SKIP_REASON, Host, Lab, NamespaceProcesses, netns_available

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not netns_available(), reason=SKIP_REASON),
    pytest.mark.timeout(240),
]
PORT = 7070
SWARM = 15
GPUS = 8
DOWN_WITHIN = 15.0  # DOWN_AFTER of silence plus a few control-loop ticks and one CLI call
SMALL_BUFFERS = "4096 4096 4096"
UPDATE_SILENCE = 30.0  # updates come every second; this long without one means the loop is stuck
BEYOND_BUFFERS = 768 * 1024  # more than asyncio's TLS write buffer (512 KiB) and TCP's (64 KiB) hold


class SmallBufferHost:
    """One namespace whose TCP buffers are 4 KiB, with the coordinator and 16 agents in it."""

    def __init__(self, lab: Lab, procs: NamespaceProcesses) -> None:
        self.host: Host = lab.hosts[0]
        self.procs = procs
        self.token = ""

    @property
    def address(self) -> str:
        return f"{self.host.address}:{PORT}"

    def start(self) -> None:
        for key in ("net.ipv4.tcp_wmem", "net.ipv4.tcp_rmem"):
            subprocess.run(["ip", "netns", "exec", self.host.ns, "sysctl", "-qw", f"{key}={SMALL_BUFFERS}"],
                           check=True, timeout=20)
        state = self.procs.root / "coordinator-state"
        self.procs.spawn("coordinator", self.host, "coordinator", "--host", self.host.address, "--port", str(PORT),
                         "--state-dir", str(state), "--no-mdns")
        self.token = wait_until(lambda: self._token(state), 30, "the coordinator's token")
        self.procs.spawn("victim", self.host, "agent", "--token", self.token, "--coordinator", self.address,
                         "--name", "victim", "--simulate-gpus", str(GPUS), "--no-mdns",
                         "--state-dir", str(self.procs.root / "victim"))
        self.spawn_python("swarm", "-m", "tests.swarm", "--coordinator", self.address, "--token", self.token,
                          "--agents", str(SWARM), "--gpus", str(GPUS), "--busy")
        wait_until(lambda: len([n for n in self.nodes() if n["state"] == "up"]) == SWARM + 1, 90,
                   f"{SWARM + 1} nodes up")

    def _token(self, state: Path) -> str:
        result = self.procs.run(self.host, "token", "--state-dir", str(state))
        return result.stdout.strip() if result.returncode == 0 else ""

    def spawn_python(self, name: str, *args: str, **popen: object) -> subprocess.Popen[bytes]:
        command = ["ip", "netns", "exec", self.host.ns, sys.executable, *args]
        if "stdout" in popen:
            proc = subprocess.Popen(command, env=self.procs.env(name), cwd=ROOT, **popen)  # type: ignore[call-overload]
        else:
            with open(self.procs.root / f"{name}.log", "ab") as log:
                proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.procs.env(name),
                                        cwd=ROOT)
        self.procs.procs[name] = proc
        return proc

    def client(self, command: str, *args: str) -> list[str]:
        """Client flags right after the command, so submit does not take them as the job's arguments."""
        return [command, "--coordinator", self.address, "--token", self.token, *args]

    def nodes(self) -> list[dict]:
        return self.procs.json(self.host, *self.client("nodes"))

    def node_state(self, name: str) -> str:
        return next((n["state"] for n in self.nodes() if n["name"] == name), "")

    def sockets(self) -> str:
        return subprocess.run(["ip", "netns", "exec", self.host.ns, "ss", "-tnpH"], capture_output=True,
                              text=True, timeout=20).stdout

    def stalled(self, pid: int) -> bool:
        """Both ends of `pid`'s connection to the coordinator are full: bytes it has not read, and
        bytes the coordinator could not send."""
        table = self.sockets()
        mine = re.search(rf"ESTAB\s+(\d+)\s+\d+\s+\S+:(\d+)\s+\S+:{PORT}\s+.*pid={pid},", table)
        if not mine or int(mine.group(1)) == 0:
            return False
        theirs = re.search(rf"ESTAB\s+\d+\s+(\d+)\s+\S+:{PORT}\s+\S+:{mine.group(2)}\s", table)
        return bool(theirs and int(theirs.group(1)) > 0)


@pytest.fixture
def small_host(tmp_path: Path) -> Iterator[SmallBufferHost]:
    lab = Lab(count=1)
    procs = NamespaceProcesses(tmp_path)
    setup = None
    try:
        lab.build()
        setup = SmallBufferHost(lab, procs)
        setup.start()
        yield setup
    finally:
        for proc in procs.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        procs.stop()
        lab.teardown()
        if setup is not None:
            for name in ("coordinator", "victim", "swarm"):
                print(f"--- {name} log\n{procs.logs_of(name)[-3000:]}")


def _wait_beyond_buffers(setup: SmallBufferHost) -> None:
    """Until a reading watcher has had BEYOND_BUFFERS of updates since the slow peer stalled."""
    reader = setup.spawn_python("reading", "-m", "tests.swarm", "--watcher", "reading", "--coordinator",
                                setup.address, "--token", setup.token, stdout=subprocess.PIPE)
    assert reader.stdout is not None and reader.stdout.readline().strip() == b"watching"
    received = 0
    while received < BEYOND_BUFFERS:
        ready, _, _ = select.select([reader.stdout], [], [], UPDATE_SILENCE)
        assert ready, (f"watchers got no update for {UPDATE_SILENCE:.0f} s after {received} bytes: "
                       "the control loop is stuck")
        line = reader.stdout.readline()
        assert line, "the reading watcher lost its connection"
        received = int(line.split()[1])


def _kill_victim_and_check_the_loop(setup: SmallBufferHost) -> None:
    """Once the slow peer would have blocked it, the real agent dies; the coordinator notices in
    time and still places a new job."""
    _wait_beyond_buffers(setup)
    assert setup.node_state("victim") == "up"
    setup.procs.procs["victim"].kill()
    killed = time.monotonic()
    wait_until(lambda: setup.node_state("victim") == "down", DOWN_WITHIN + 30, "the killed agent to be down",
               interval=0.2)
    took = time.monotonic() - killed
    assert took <= DOWN_WITHIN, f"the killed agent was down only after {took:.1f} s (deadline {DOWN_AFTER:.0f} s)"
    submitted = setup.procs.run(setup.host, *setup.client("submit", "--gpus", "8", "--name", "after", "--json",
                                                          "--workload", "data-parallel"))
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)["id"]  # submit's options go before --workload: what follows is its own
    wait_until(lambda: setup.procs.json(setup.host, *setup.client("show", str(job)))["state"] == "running",
               30, "the job submitted meanwhile to run")


def test_a_watcher_that_never_reads_does_not_stop_the_control_loop(small_host: SmallBufferHost):
    watcher = small_host.spawn_python("watcher", "-m", "tests.swarm", "--watcher", "stuck",
                                      "--coordinator", small_host.address, "--token", small_host.token,
                                      stdout=subprocess.PIPE)
    assert watcher.stdout is not None and watcher.stdout.readline().strip() == b"watching"
    wait_until(lambda: small_host.stalled(watcher.pid), 60, "the watcher's connection to fill up")
    _kill_victim_and_check_the_loop(small_host)


def test_a_stopped_dashboard_does_not_stop_the_control_loop(small_host: SmallBufferHost):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    env = dict(small_host.procs.env("dashboard"), TERM="xterm-256color", GPUDECK_COORDINATOR=small_host.address,
               GPUDECK_TOKEN=small_host.token)
    command = ["ip", "netns", "exec", small_host.host.ns, sys.executable, "-m", "gpudeck", "tui"]
    tui = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT, start_new_session=True)
    small_host.procs.procs["dashboard"] = tui
    os.close(slave)
    try:
        terminal = Terminal(master, 160, 40)
        assert terminal.read_until(f"{SWARM + 1}/{SWARM + 1} nodes up", timeout=60), terminal.shows()
        tui.send_signal(signal.SIGSTOP)  # ctrl+z, or a laptop lid closed
        wait_until(lambda: small_host.stalled(tui.pid), 60, "the stopped dashboard's connection to fill up")
        _kill_victim_and_check_the_loop(small_host)
    finally:
        os.close(master)
