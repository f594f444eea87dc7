"""Time and traffic per step of the three built-in workloads on two ranks, each against one process.

For one model size, one run measures, interleaved (A B C D A B C D ...) so that drift of the machine
hits all alike:

* one process training the model on the whole batch (``task.train_reference``'s loop), the baseline;
* ``data-parallel``, ``parameter-server`` (1 server + 1 worker) and ``pipeline`` (2 stages), each a
  2-rank job ``torchrun --nproc-per-node 2 -m gpudeck.train.run --workload W``, as the agents start
  them, with traffic reported to a UDP socket as under the agent.

Time per step is the workloads' own ``ms/step`` line (the slowest rank's; the first step, with its
warm-up, left out), and the baseline's likewise. Traffic is what gpudeck counts (``gpudeck show``):
bytes by kind over both ranks, divided by the steps (one-time bytes such as DDP's initial broadcast
included). Every job trains the same model on the same batches, so all end with the same loss.
Prints a Markdown table: per workload the median and best time per step, the ratios to the baseline
(median of the back-to-back pairs, and best against best) and the traffic per step.

    python bench/workload_table.py [--hidden 512] [--layers 4] [--batch-size 1024] [--steps 60] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from gpudeck.agent.procs import pids_with_env, signal_pids

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ("data-parallel", "parameter-server", "pipeline")
SINGLE = "one process"
MARKER = "GPUDECK_BENCH_RUN"
MS_PER_STEP = re.compile(r"finished \d+ (?:steps|updates); ([0-9.]+) ms/step")


def single_process(options: argparse.Namespace) -> None:
    """The baseline, run in a child process: one model, the whole batch, plain SGD; prints ms/step."""
    import torch

    from gpudeck.train.workloads import task

    torch.set_num_threads(1)
    config = task.Config(hidden=options.hidden, layers=options.layers, batch_size=options.batch_size)
    data = task.Data(config)
    model = task.build_model(config)
    optimizer = task.make_optimizer(model.parameters(), config)
    started = 0.0
    for step in range(options.steps):
        inputs, labels = data.batch(step)
        loss = task.loss_fn(model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 0:
            started = time.perf_counter()
    print(f"finished {options.steps} steps; {(time.perf_counter() - started) * 1000 / (options.steps - 1):.3f} ms/step")


class Sink:
    """Keeps the latest traffic totals of each rank, as the agent's sink does."""

    def __init__(self) -> None:
        from gpudeck.protocol.traffic import decode_report

        self.decode = decode_report
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.settimeout(0.1)
        self.totals: dict[int, dict[str, int]] = {}
        self.attempt = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.receive, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return "127.0.0.1:%d" % self.socket.getsockname()[1]

    def receive(self) -> None:
        while not self.stopped.is_set():
            try:
                report = self.decode(self.socket.recv(65536))
            except TimeoutError:
                continue
            if report.attempt == self.attempt:
                self.totals[report.rank] = dict(report.bytes)

    def expect(self, attempt: int) -> None:
        self.attempt, self.totals = attempt, {}


def kill_marked(marker: str) -> None:
    """SIGKILL whatever this run started that is still there (torchrun puts ranks in sessions of their own)."""
    signal_pids(pids_with_env(MARKER, marker), signal.SIGKILL)


def run(name: str, options: argparse.Namespace, sink: Sink, attempt: int) -> tuple[float, dict[str, int]]:
    """One run: its ms/step (slowest rank) and its traffic by kind, summed over ranks."""
    marker = uuid.uuid4().hex
    model = ["--hidden", str(options.hidden), "--layers", str(options.layers), "--batch-size", str(options.batch_size),
             "--steps", str(options.steps)]
    if name == SINGLE:
        command = [sys.executable, str(Path(__file__).resolve()), "--single", *model]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "-m", "gpudeck.train.run", "--workload", name, *model, "--log-every", str(options.steps)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUDECK_")}
    env.update({MARKER: marker, "GPUDECK_TRAFFIC_ADDR": sink.address,
                "GPUDECK_JOB_ID": "1", "GPUDECK_ATTEMPT": str(attempt)})
    sink.expect(attempt)
    try:
        result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        kill_marked(marker)
    times = [float(ms) for ms in MS_PER_STEP.findall(result.stdout)]
    if result.returncode != 0 or not times:
        raise RuntimeError(f"{name} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    time.sleep(0.3)  # the final datagrams
    traffic: dict[str, int] = {}
    for kinds in sink.totals.values():
        for kind, count in kinds.items():
            traffic[kind] = traffic.get(kind, 0) + count
    return max(times), traffic


def measure(options: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, dict[str, int]]]:
    times: dict[str, list[float]] = {name: [] for name in (SINGLE, *WORKLOADS)}
    traffic: dict[str, dict[str, int]] = {}
    sink = Sink()
    attempt = 0
    for repeat in range(options.repeats):
        for name in times:
            attempt += 1
            ms, traffic[name] = run(name, options, sink, attempt)
            times[name].append(ms)
            print(f"  run {repeat + 1}/{options.repeats}  {name:<18}{ms:9.2f} ms/step", flush=True)
    sink.stopped.set()
    return times, traffic


def print_table(options: argparse.Namespace, times: dict[str, list[float]], traffic: dict[str, dict[str, int]],
                seconds: float) -> None:
    from gpudeck.train.workloads import task

    params = task.parameter_count(task.Config(hidden=options.hidden, layers=options.layers))
    print()
    print(f"model: {params:,} parameters ({params * 4 / 1e6:.2f} MB in float32), --hidden {options.hidden} "
          f"--layers {options.layers}, batch {options.batch_size}, 2 ranks (gloo on CPU), {options.steps} steps a run")
    print()
    print("| workload | ms/step, median | ms/step, best | time vs one process, median | best vs best "
          "| traffic per step, both ranks (MB, by kind) |")
    print("|---|---:|---:|---:|---:|---|")
    for name, runs in times.items():
        kinds = ", ".join(f"{kind} {_mb(count / options.steps)}" for kind, count in
                          sorted(traffic.get(name, {}).items(), key=lambda kv: (-kv[1], kv[0])))
        ratio = statistics.median(run / base_run for run, base_run in zip(runs, times[SINGLE]))
        print(f"| {name} | {statistics.median(runs):.2f} | {min(runs):.2f} | {ratio:.2f} "
              f"| {min(runs) / min(times[SINGLE]):.2f} | {kinds or '-'} |")
    print()
    print(f"time vs one process, median: the median over the {options.repeats} repeats of workload / one process, "
          "each pair measured back to back; best vs best: the fastest run of each (other work on the machine "
          f"only ever slows a run). Took {seconds:.0f} s.")


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.3f}" if nbytes >= 500 else "<0.001"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512, help="hidden width (default 512)")
    parser.add_argument("--layers", type=int, default=4, help="Linear layers (default 4: 528 k parameters)")
    parser.add_argument("--batch-size", type=int, default=1024, help="points per step (default 1024)")
    parser.add_argument("--steps", type=int, default=60, help="steps per run (default 60)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each (default 5)")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.single:
        single_process(options)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    times, traffic = measure(options)
    print_table(options, times, traffic, time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
