"""A real cluster for tests: a coordinator and agents as separate `python -m gpudeck` processes on
loopback, driven through the same command line a user types."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyte

from gpudeck.agent.procs import Leader, job_pids, pids_with_env, run_marker, signal_pids
from gpudeck.protocol.auth import JoinToken, PinMismatch
from gpudeck.protocol.blocking import BlockingSession
from gpudeck.protocol.handshake import Refused
from gpudeck.protocol.messages import ListNodes, Message, ShowJob

ROOT = Path(__file__).resolve().parent.parent
# A user's install has none of these; one in the developer's shell would hide, as it once did, that the
# warm interpreter did not work without them. The product sets what its processes need.
THREAD_SETTINGS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "GOTO_NUM_THREADS")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_job_ports() -> str:
    """The rendezvous ports of this test worker's clusters: its share of the default 29500-29999.
    The suite runs in pytest-xdist workers whose clusters share this machine's loopback, which two
    real clusters never do; a job's port is drawn at random from the range, so two workers' jobs could
    draw one port in the same moment. A later `--job-ports` in `start_coordinator(extra)` wins."""
    first, last = 29500, 29999
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    share = (last - first + 1) // workers
    return f"{first + index * share}-{first + (index + 1) * share - 1}"


# How often the waits for a node's or a job's state ask the coordinator: an ask is one request on a
# connection of the harness's own (`Cluster.request`), a few milliseconds of CPU, so a wait ends
# within a tenth of a second of the state it waits for.
ASK_EVERY = 0.1


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Terminal:
    """A program's terminal as a person reads it: the output is replayed into pyte, a terminal
    emulator, so a text the dashboard drew in pieces (Textual rewrites only what changed, with style
    codes between the characters) is found once the screen shows it, not only if its bytes came in
    one run. `raw` keeps the bytes, for what is printed after the dashboard left the screen."""

    def __init__(self, fd: int, columns: int, lines: int) -> None:
        self.fd = fd
        self.raw = bytearray()
        self.screen = pyte.Screen(columns, lines)
        self.stream = pyte.ByteStream(self.screen)

    def shows(self) -> str:
        return "\n".join(line.rstrip() for line in self.screen.display)

    def read_until(self, text: str, timeout: float) -> bool:
        """Read until the screen or the bytes hold `text` (True), or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if not ready:
                continue
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                return self._holds(text)
            self.raw.extend(chunk)
            self.stream.feed(chunk)
            if self._holds(text):
                return True
        return False

    def _holds(self, text: str) -> bool:
        return text.encode() in self.raw or text in self.shows()


@dataclass
class Cluster:
    root: Path
    port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    token: str = ""
    coordinator_state: Path | None = None  # default: root/coord

    @property
    def coordinator_dir(self) -> Path:
        return self.coordinator_state or self.root / "coord"

    @property
    def env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if key not in THREAD_SETTINGS}
        env.update({"GPUDECK_HOME": str(self.root / "home"), "PYTHONUNBUFFERED": "1"})
        env.pop("GPUDECK_COORDINATOR", None)
        env.pop("GPUDECK_TOKEN", None)
        return env

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        self._keep_out_of_projects(f"{name}.log", f"{name}/")
        log = open(self.root / f"{name}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "gpudeck", *args], stdout=log, stderr=subprocess.STDOUT,
                                env=self.env, cwd=self.root)
        self.procs[name] = proc
        return proc

    def _keep_out_of_projects(self, *patterns: str) -> None:
        """A submit from the cluster's folder ships that folder as the job's project, and the processes'
        state folders and logs are there: they stay out of it (.gpudeckignore), as a user's would not
        be in their project. A live SQLite WAL shipped this way failed a submit ("changed while it was
        uploaded")."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".gpudeckignore", "a") as ignore:
            ignore.write("".join(f"{pattern}\n" for pattern in patterns))

    def start_coordinator(self, *extra: str) -> None:
        self._keep_out_of_projects("coord/")
        self.spawn("coordinator", "coordinator", "--host", "127.0.0.1", "--port", str(self.port),
                   "--state-dir", str(self.coordinator_dir), "--no-mdns", "--job-ports", worker_job_ports(), *extra)
        self.token = wait_until(self._read_token, 20, "the coordinator's token")
        wait_until(self._accepting, 20, "the coordinator to listen")

    def _read_token(self) -> str:
        result = self.cli("token", "--state-dir", str(self.coordinator_dir), check=False, client=False)
        return result.stdout.strip() if result.returncode == 0 else ""

    def _accepting(self) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def start_agent(self, name: str, gpus: int = 2, *extra: str) -> None:
        """An agent; without warm interpreters unless `extra` asks for them (each imports torch: two
        seconds of CPU at every agent start, which tests of other things should not pay)."""
        warm = [] if "--warm" in extra else ["--warm", "0"]
        self.spawn(name, "agent", "--coordinator", f"127.0.0.1:{self.port}", "--token", self.token, "--name", name,
                   "--simulate-gpus", str(gpus), "--no-mdns", "--state-dir", str(self.root / name), *warm, *extra)

    def cli(self, *args: str, check: bool = True, client: bool = True, timeout: float = 60,
            token: str | None = None) -> subprocess.CompletedProcess[str]:
        """gpudeck as a client of this cluster, with the join token or a user's `token`."""
        flags = ["--coordinator", f"127.0.0.1:{self.port}", "--token", token or self.token] if client else []
        result = subprocess.run([sys.executable, "-m", "gpudeck", *args, *flags], capture_output=True, text=True,
                                env=self.env, cwd=self.root, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"gpudeck {' '.join(args)} exited {result.returncode}: {result.stderr}")
        return result

    def marker(self, node: str, job_id: int, attempt: int = 1) -> str:
        """The marker every process of that job attempt on that node carries (see agent.procs)."""
        return run_marker(JoinToken.parse(self.token).cluster, node, job_id, attempt)

    def job_pids(self, node: str, job_id: int, attempt: int = 1) -> list[int]:
        """The live processes of that job attempt on that node: by marker, and in the sessions its
        ranks lead (a rank forked from a warm interpreter has no marker in /proc)."""
        return job_pids(self.marker(node, job_id, attempt), _leaders(self.root / node / "jobs" / f"{job_id}-{attempt}"))

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def request(self, kind: type[Message], **fields: Any) -> Any:
        """One request on a connection of the harness's own, answered as `gpudeck ... --json` prints the
        reply. The waits below ask several times a second, and a `gpudeck` process for each ask was most
        of a waiting test's own CPU; what tests check of the command line goes through `cli`."""
        try:
            with BlockingSession.open("127.0.0.1", self.port, JoinToken.parse(self.token), "tests") as session:
                return json.loads(json.dumps(session.request(kind, **fields)))
        except (OSError, Refused, PinMismatch) as exc:
            raise AssertionError(f"the coordinator did not answer {kind.__name__}: {exc}") from None

    def nodes(self) -> list[dict[str, Any]]:
        return self.request(ListNodes)["nodes"]

    def wait_nodes(self, state: str, count: int, timeout: float = 30) -> list[dict[str, Any]]:
        def reached() -> list[dict[str, Any]] | None:
            nodes = [n for n in self.nodes() if n["state"] == state]
            return nodes if len(nodes) == count else None

        return wait_until(reached, timeout, f"{count} nodes {state}", interval=ASK_EVERY)

    def job(self, job_id: int) -> dict[str, Any]:
        return self.request(ShowJob, job=job_id)

    def wait_job(self, job_id: int, states: tuple[str, ...], timeout: float = 90) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            job = self.job(job_id)
            return job if job["state"] in states else None

        return wait_until(reached, timeout, f"job {job_id} to be {' or '.join(states)}", interval=ASK_EVERY)

    def submit(self, *args: str) -> int:
        return self.submit_json(*args)["id"]

    def submit_json(self, *args: str, cwd: Path | None = None, token: str | None = None) -> dict[str, Any]:
        """Submit from `cwd` (default: the cluster's root), with the join token or a user's `token`,
        and return the job as `submit --json` prints it; client flags go before the script so they
        are not taken as its arguments."""
        flags = ["--coordinator", f"127.0.0.1:{self.port}", "--token", token or self.token]
        result = subprocess.run([sys.executable, "-m", "gpudeck", "submit", "--json", *flags, *args],
                                capture_output=True, text=True, env=self.env, cwd=cwd or self.root, timeout=60)
        if result.returncode != 0:
            raise AssertionError(f"submit exited {result.returncode}: {result.stderr}")
        return json.loads(result.stdout)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def logs_of(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        stop_processes(self.procs, self.root)


def stop_processes(procs: dict[str, subprocess.Popen[bytes]], root: Path) -> None:
    """SIGTERM, then SIGKILL what lingers, then the job ranks (they outlive agents by design)."""
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs.values():
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    procs.clear()
    _kill_leftover_jobs(root)


def _kill_leftover_jobs(root: Path) -> None:
    """Job ranks outlive agents by design (and torchrun puts each in a session of its own); a test
    must not leave any behind, so every process whose job logs go under `root` is killed, and every
    process in the sessions of the ranks the agents under `root` recorded."""
    signal_pids(pids_with_env("GPUDECK_LOG_DIR", f"{root}/", prefix=True), signal.SIGKILL)
    leaders = [leader for record in root.glob("*/jobs/*/job.json") for leader in _leaders(record.parent)]
    if leaders:
        signal_pids(job_pids("-", leaders), signal.SIGKILL)


def _leaders(job_dir: Path) -> list[Leader]:
    try:
        return [Leader(pid, started)
                for pid, started in json.loads((job_dir / "job.json").read_text()).get("leaders", [])]
    except (OSError, ValueError):
        return []
