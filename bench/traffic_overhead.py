"""Does counting traffic slow training? DDP steps/s under plain torchrun vs under gpudeck.train.run.

One run measures both, interleaved (A B A B ...), so drift of the machine hits both alike: a
2-rank gloo DDP job on CPU trains a small MLP (about 4 ms a step on 2 cores), and rank 0 times
windows of steps after a warm-up (launch and start-up are excluded). A run's figure is the median
of its windows, so a short burst of other work on the machine moves it little. The wrapped runs
report to a UDP socket once a second, as under the agent. Prints a table and the ratio
wrapped / plain of the medians and of the best runs (goal: at least 0.98).

    python bench/traffic_overhead.py [--repeats 4] [--windows 16] [--window-steps 50]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

GOAL = 0.98
PLAIN, WRAPPED = "plain torchrun", "gpudeck.train.run"

TRAIN_SCRIPT = """
    import sys, time
    import torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(
        torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    ))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    inputs, targets = torch.randn(32, 256), torch.randint(0, 10, (32,))

    def step():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()

    windows, window_steps = int(sys.argv[1]), int(sys.argv[2])
    for _ in range(20):
        step()
    dist.barrier()
    rates = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(window_steps):
            step()
        rates.append(window_steps / (time.perf_counter() - start))
    if dist.get_rank() == 0:
        print("WINDOW_STEPS_PER_S", *(f"{rate:.3f}" for rate in rates), flush=True)
    dist.destroy_process_group()
"""


def run_job(script: Path, options: argparse.Namespace, wrapped: bool, sink_port: int) -> float:
    """Launch one 2-rank job; return the median of rank 0's window rates, in steps/s."""
    wrapper = ["-m", "gpudeck.train.run"] if wrapped else []
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        *wrapper, str(script), str(options.windows), str(options.window_steps),
    ]
    env = {
        **os.environ, "GPUDECK_TRAFFIC_ADDR": f"127.0.0.1:{sink_port}",
        "GPUDECK_JOB_ID": "1", "GPUDECK_ATTEMPT": "0",
    }
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    for line in result.stdout.splitlines():
        if line.startswith("WINDOW_STEPS_PER_S "):
            return statistics.median(float(rate) for rate in line.split()[1:])
    raise RuntimeError(f"job failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")


def measure(options: argparse.Namespace) -> dict[str, list[float]]:
    """Alternate plain and wrapped runs; steps/s of each run by variant."""
    results: dict[str, list[float]] = {PLAIN: [], WRAPPED: []}
    with tempfile.TemporaryDirectory() as folder, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        script = Path(folder) / "ddp_mlp.py"
        script.write_text(textwrap.dedent(TRAIN_SCRIPT))
        for repeat in range(options.repeats):
            for name in (PLAIN, WRAPPED):
                rate = run_job(script, options, name == WRAPPED, sink.getsockname()[1])
                results[name].append(rate)
                print(f"  run {repeat + 1}/{options.repeats}  {name:<18} {rate:8.1f} steps/s", flush=True)
    return results


def print_table(results: dict[str, list[float]], seconds: float) -> None:
    """Median and best run per variant, and both ratios against the goal.

    Other work on the machine only ever slows a run, so the best run of each variant is the
    steadiest estimate of its own cost; the median shows what a busy machine gives.
    """
    print()
    print(f"{'variant':<20}{'median steps/s':>16}{'best steps/s':>14}{'worst steps/s':>15}")
    for name, rates in results.items():
        print(f"{name:<20}{statistics.median(rates):>16.1f}{max(rates):>14.1f}{min(rates):>15.1f}")
    print()
    for label, pick in (("median", statistics.median), ("best", max)):
        ratio = pick(results[WRAPPED]) / pick(results[PLAIN])
        verdict = "meets" if ratio >= GOAL else "misses"
        print(f"ratio wrapped/plain, {label:<6}: {ratio:.3f}  ({verdict} the goal of >= {GOAL})")
    print(f"took {seconds:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4, help="runs of each variant (default 4)")
    parser.add_argument("--windows", type=int, default=16, help="timed windows per run (default 16)")
    parser.add_argument("--window-steps", type=int, default=50, help="steps per window (default 50)")
    options = parser.parse_args()
    started = time.monotonic()
    results = measure(options)
    print_table(results, time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
