"""The coordinator at the size gpudeck is for: 64 nodes of 8 GPUs, 10,000 queued jobs, 5 dashboards.

Two runs of the same coordinator in one invocation, one after the other:
- idle: 1 agent of 8 simulated GPUs, an empty queue, 5 watchers;
- scale: 64 agents of 8 simulated GPUs, every GPU held by a running job (64 jobs of 8 GPUs, each
  running 60 s, so about one ends and the next starts every second), 10,000 more jobs queued
  behind them, 5 watchers.
In both, a client submits 20 jobs per second during the measuring window (they queue too).

The agents are `tests/swarm.py`: one process whose agents each open their own TLS connection, prove the
token and speak the agent protocol (register, telemetry with simulated readings every second, job
started and exited); 64 agent processes do not fit on a 2-core machine next to the coordinator. The
watchers are `tests/swarm.py --watcher reading`, one process each, reading every update. The
coordinator runs in its own process (this file's `--serve`), the real `Coordinator` with a timer
around `JobControl.schedule`: one scheduling pass (the queue read, the scheduler, the reasons
stored, launches queued) is one sample; passes that found nothing new are not counted, and full
passes (over the whole queue, after a GPU was freed or taken) are also shown on their own.

Printed: a scheduling pass (p50, p99), submit latency (p50, p99), `gpudeck jobs --json` (the CLI
process from start to exit, 3 runs), the coordinator's CPU share (utime+stime over the window) and
RSS, and the bytes per second one watcher receives, for both runs and as scale/idle ratios.
Goals: a pass under 50 ms at 10,000 pending; submit p99 at most 2x idle; under a quarter of a core;
watcher bytes that grow with what changes (here: 64 busy nodes' readings), not with the queue.

    python bench/coordinator_scale.py [--window 30] [--queued 10000] [--agents 64]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpudeck.client import connect  # noqa: E402
from gpudeck.config import Endpoint  # noqa: E402
from gpudeck.model import JobSpec, RunSpec  # noqa: E402
from gpudeck.protocol.auth import JoinToken  # noqa: E402
from gpudeck.protocol.messages import ListNodes, Submit  # noqa: E402
from tests.cluster import free_port, wait_until  # noqa: E402

GPUS = 8
WATCHERS = 5
SUBMITS_PER_SECOND = 20
FILL_CONCURRENCY = 64
RUN_FOR = 60.0  # seconds a job runs: about one of the 64 ends (and a queued one starts) every second


def serve(state_dir: Path, port: int) -> None:
    """The coordinator, with every scheduling pass timed into state_dir/passes (ms per line)."""
    import logging

    from gpudeck.coordinator.server import Coordinator, CoordinatorConfig

    logging.basicConfig(level=logging.WARNING)
    out = open(state_dir / "passes", "a", buffering=1)
    pauses = open(state_dir / "gc", "a", buffering=1)
    began = [0.0]

    def collected(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            pauses.write(f"{(time.perf_counter() - began[0]) * 1000:.3f} {info['generation']}\n")

    gc.callbacks.append(collected)

    async def main() -> None:
        coordinator = Coordinator(CoordinatorConfig(state_dir, host="127.0.0.1", port=port, use_mdns=False))
        await coordinator.start()
        schedule = coordinator.jobs.schedule

        def timed() -> str:
            start, cpu = time.perf_counter(), time.thread_time()
            kind = schedule()
            out.write(f"{(time.perf_counter() - start) * 1000:.3f} {kind.replace(' ', '-')} "
                      f"{(time.thread_time() - cpu) * 1000:.3f}\n")
            return kind

        coordinator.jobs.schedule = timed  # type: ignore[method-assign]
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await coordinator.stop()

    asyncio.run(main())


@dataclass
class Run:
    name: str
    agents: int
    queued: int
    root: Path
    port: int = field(default_factory=free_port)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    token: str = ""
    results: dict[str, float] = field(default_factory=dict)

    @property
    def state(self) -> Path:
        return self.root / self.name

    def spawn(self, *args: str, stdout: Any = None) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{self.name}-{len(self.procs)}.log", "ab")
        proc = subprocess.Popen([sys.executable, *args], stdout=stdout or log, stderr=log, cwd=ROOT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


async def _session(run: Run):  # noqa: ANN202 - an async context manager
    return connect([Endpoint("127.0.0.1", run.port, "bench")], JoinToken.parse(run.token))


async def _submit_many(run: Run, count: int, gpus: int) -> None:
    spec = JobSpec(name="queued", gpus=gpus, run=RunSpec(workload="data-parallel")).to_wire()
    async with await _session(run) as session:
        remaining = iter(range(count))

        async def worker() -> None:
            for _ in remaining:
                await session.request(Submit, timeout=120, spec=spec)

        await asyncio.gather(*(worker() for _ in range(FILL_CONCURRENCY)))


async def _nodes_up(run: Run) -> int:
    async with await _session(run) as session:
        data = await session.request(ListNodes)
    return sum(1 for node in data["nodes"] if node["state"] == "up")


async def _steady_submits(run: Run, seconds: float) -> list[float]:
    """SUBMITS_PER_SECOND submits for `seconds`, on one connection; the latency of each, in ms."""
    spec = JobSpec(name="steady", gpus=GPUS, run=RunSpec(workload="data-parallel")).to_wire()
    latencies: list[float] = []
    async with await _session(run) as session:
        async def one() -> None:
            start = time.perf_counter()
            await session.request(Submit, timeout=60, spec=spec)
            latencies.append((time.perf_counter() - start) * 1000)

        tasks = []
        begin = time.monotonic()
        for n in range(int(seconds * SUBMITS_PER_SECOND)):
            await asyncio.sleep(max(0.0, begin + n / SUBMITS_PER_SECOND - time.monotonic()))
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return latencies


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _watcher_bytes(log: Path) -> int:
    last = 0
    for line in log.read_text().splitlines():
        if line.startswith("updates "):
            last = int(line.split()[1])
    return last


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def measure(run: Run, window: float) -> None:
    run.state.mkdir(parents=True)
    coordinator = run.spawn(__file__, "--serve", str(run.state), str(run.port))
    run.token = wait_until(lambda: (run.state / "token").exists() and (run.state / "token").read_text().strip(),
                           60, "the coordinator's token")
    wait_until(lambda: (run.state / "endpoint.json").exists(), 60, "the coordinator to listen")
    run.spawn("-m", "tests.swarm", "--coordinator", f"127.0.0.1:{run.port}", "--token", run.token,
              "--agents", str(run.agents), "--gpus", str(GPUS), "--run-for", str(RUN_FOR))
    wait_until(lambda: asyncio.run(_nodes_up(run)) == run.agents, 120, f"{run.agents} agents up")
    if run.queued:
        asyncio.run(_submit_many(run, run.agents, GPUS))  # every GPU held by a running job
        started = time.monotonic()
        asyncio.run(_submit_many(run, run.queued, GPUS))
        print(f"  {run.name}: queued {run.queued} jobs in {time.monotonic() - started:.0f} s", flush=True)
    logs = []
    for n in range(WATCHERS):
        log = run.root / f"{run.name}-watcher-{n}.out"
        logs.append(log)
        run.spawn("-m", "tests.swarm", "--watcher", "reading", "--coordinator", f"127.0.0.1:{run.port}",
                  "--token", run.token, stdout=open(log, "wb"))
    wait_until(lambda: all(_watcher_bytes(log) > 0 or "watching" in log.read_text() for log in logs), 120,
               "the watchers' snapshots")
    time.sleep(3)  # past the snapshots, into steady state
    passes_before = len((run.state / "passes").read_text().splitlines())
    bytes_before = [_watcher_bytes(log) for log in logs]
    cpu_before, started = _cpu_seconds(coordinator.pid), time.monotonic()
    latencies = asyncio.run(_steady_submits(run, window))
    elapsed = time.monotonic() - started
    cpu = (_cpu_seconds(coordinator.pid) - cpu_before) / elapsed
    watched = statistics.median((_watcher_bytes(log) - before) / elapsed for log, before in zip(logs, bytes_before))
    passes = [line.split() for line in (run.state / "passes").read_text().splitlines()[passes_before:]]
    worked = [float(ms) for ms, kind, _ in passes if kind != "none"]
    full = [float(ms) for ms, kind, _ in passes if kind == "full"]
    full_cpu = [float(cpu) for _, kind, cpu in passes if kind == "full"]
    gc_pauses = [line.split() for line in (run.state / "gc").read_text().splitlines()]
    listing = []
    for _ in range(3):
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "gpudeck", "jobs", "--json", "--coordinator",
                                 f"127.0.0.1:{run.port}", "--token", run.token], capture_output=True, text=True,
                                cwd=ROOT, timeout=300)
        listing.append((time.perf_counter() - start) * 1000)
        if result.returncode != 0:
            raise RuntimeError(f"gpudeck jobs --json failed: {result.stderr.strip()}")
        count = len(json.loads(result.stdout))
    run.results = {
        "pass_p50": statistics.median(worked), "pass_p99": _percentile(worked, 0.99), "passes": len(worked),
        "full_p50": statistics.median(full) if full else float("nan"), "full_p99": _percentile(full, 0.99),
        "full_passes": len(full), "full_cpu_p50": statistics.median(full_cpu) if full_cpu else float("nan"),
        "full_cpu_p99": _percentile(full_cpu, 0.99),
        "gc_max": max((float(ms) for ms, _ in gc_pauses), default=0.0),
        "gc_full": sum(1 for _, generation in gc_pauses if generation == "2"),
        "submit_p50": statistics.median(latencies), "submit_p99": _percentile(latencies, 0.99),
        "jobs_json": statistics.median(listing), "jobs_listed": count,
        "cpu": cpu * 100, "rss": _rss_mib(coordinator.pid), "watcher": watched,
    }


ROWS = [
    ("scheduling passes that did work", "passes", "{:.0f}"),
    ("scheduling pass p50 (ms)", "pass_p50", "{:.1f}"),
    ("scheduling pass p99 (ms)", "pass_p99", "{:.1f}"),
    ("full passes (whole queue)", "full_passes", "{:.0f}"),
    ("full pass p50 (ms)", "full_p50", "{:.1f}"),
    ("full pass p99 (ms)", "full_p99", "{:.1f}"),
    ("full pass CPU time p50 (ms)", "full_cpu_p50", "{:.1f}"),
    ("full pass CPU time p99 (ms)", "full_cpu_p99", "{:.1f}"),
    ("longest garbage collection (ms)", "gc_max", "{:.1f}"),
    ("full collections (whole run)", "gc_full", "{:.0f}"),
    ("submit latency p50 (ms)", "submit_p50", "{:.1f}"),
    ("submit latency p99 (ms)", "submit_p99", "{:.1f}"),
    ("`gpudeck jobs --json` (ms)", "jobs_json", "{:.0f}"),
    ("jobs listed", "jobs_listed", "{:.0f}"),
    ("coordinator CPU (% of a core)", "cpu", "{:.1f}"),
    ("coordinator RSS (MiB)", "rss", "{:.0f}"),
    ("bytes/s to one watcher", "watcher", "{:.0f}"),
]


def print_table(idle: Run, scale: Run, window: float) -> None:
    print(f"\n{scale.agents} agents x {GPUS} simulated GPUs, {scale.queued} queued, {WATCHERS} watchers, "
          f"{SUBMITS_PER_SECOND} submits/s for {window:.0f} s; idle: 1 agent, empty queue\n")
    print(f"| {'':32} | {'idle':>10} | {'scale':>10} | {'scale/idle':>10} |")
    print(f"|{'-' * 34}|{'-' * 11}:|{'-' * 11}:|{'-' * 11}:|")
    for label, key, fmt in ROWS:
        a, b = idle.results[key], scale.results[key]
        ratio = f"{b / a:.2f}" if a else "-"
        print(f"| {label:32} | {fmt.format(a):>10} | {fmt.format(b):>10} | {ratio:>10} |")
    r = scale.results
    print(f"\ngoals: pass < 50 ms at {scale.queued} pending: p99 {r['pass_p99']:.1f} ms (full passes: p99 "
          f"{r['full_p99']:.1f} ms); submit p99 <= 2x idle: "
          f"{r['submit_p99'] / idle.results['submit_p99']:.2f}x; CPU < 25 %: {r['cpu']:.1f} %")


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        serve(Path(sys.argv[2]), int(sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=float, default=30.0, help="measuring window in seconds")
    parser.add_argument("--queued", type=int, default=10_000)
    parser.add_argument("--agents", type=int, default=64)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpudeck-scale-") as tmp:
        idle, scale = Run("idle", 1, 0, Path(tmp)), Run("scale", options.agents, options.queued, Path(tmp))
        runs = [idle, scale]
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
        try:
            for run in runs:
                print(f"measuring {run.name} ...", flush=True)
                measure(run, options.window)
                run.stop()
        finally:
            for run in runs:
                run.stop()
        print_table(idle, scale, options.window)
    return 0


if __name__ == "__main__":
    sys.exit(main())
