"""How long from `gpudeck submit` to the first training step, against plain torchrun by hand?

One run measures both, interleaved (A B A B ...), so drift of this shared machine hits both alike:

* plain:   ``python -m torch.distributed.run --standalone --nproc-per-node 2 ddp.py`` (what the
           ``torchrun`` command runs), timed from just before Popen;
* gpudeck: ``gpudeck submit --gpus 2 ddp.py`` to a real coordinator and ONE agent with 2 simulated
           GPUs (single node, 2 ranks), on loopback, timed from just before the submit command starts
           (its Python start-up, TLS and the round trip are part of what a user waits for).

The script is a tiny 2-rank gloo DDP job that prints ``time.time()`` once its first training step
is done (forward, backward with its all-reduce, optimizer step). The first-step time is read from the
job's logs (``gpudeck logs JOB``) or from torchrun's output. One untimed warm-up pair runs first.

    python bench/launch_overhead.py [--repeats 7] [--warmup 1]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.cluster import Cluster, wait_until  # noqa: E402  (the real processes on loopback, as in the tests)

DDP_SCRIPT = """
    import time
    import torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(64, 32))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        optimizer.zero_grad()
        model(torch.randn(16, 64)).pow(2).mean().backward()
        optimizer.step()
        if step == 0:
            print(f"FIRST_STEP rank={dist.get_rank()} t={time.time():.6f}", flush=True)
    dist.destroy_process_group()
"""
FIRST_STEP = re.compile(r"FIRST_STEP rank=0 t=([0-9.]+)")
JOB_TIMEOUT = 120.0
DONE = ("succeeded", "failed", "cancelled")


def kill_everything_under(root: Path) -> None:
    """SIGKILL every process whose command line names `root` (a fresh temp dir only this run uses).

    torchrun (torch 2.13) starts each rank in a session of its own, so killing torchrun's process
    group, or the job launcher's as tests/cluster.py does, leaves the ranks running; they all name
    their script, which lies under `root`.
    """
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                command = handle.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(root) in command:
            try:
                pid = int(entry)
                if os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGKILL)  # a rank leads its own group: take its workers too
                else:
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class PlainRun:
    """Plain torchrun in a session of its own, so a failure or Ctrl-C can stop every rank."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None

    def run(self, script: Path, workdir: Path) -> dict[str, float]:
        start = time.time()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(), cwd=workdir,
            start_new_session=True)
        try:
            output, _ = self.proc.communicate(timeout=JOB_TIMEOUT)
        finally:
            self.stop()
        match = FIRST_STEP.search(output)
        if self.proc.returncode != 0 or match is None:
            raise RuntimeError(f"plain torchrun failed ({self.proc.returncode}):\n{output[-3000:]}")
        return {"first_step": float(match.group(1)) - start}

    def stop(self) -> None:
        """Stop torchrun's group; its ranks, in sessions of their own, go with kill_everything_under."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


def gpudeck_run(cluster: Cluster, script: Path) -> dict[str, float]:
    """Submit, wait for the job to end, and take rank 0's first-step time from its logs."""
    start = time.time()
    job_id = cluster.submit("--gpus", "2", str(script))
    submitted = time.time()
    record = cluster.root / "node-a" / "jobs" / f"{job_id}-1" / "job.json"
    wait_until(record.exists, JOB_TIMEOUT, f"job {job_id} to be launched", interval=0.05)
    launched = record.stat().st_mtime  # written by the agent right after it spawned torchrun
    # Wait on the agent's exit record (a stat, no CPU taken from the ranks), then on the coordinator.
    wait_until((record.parent / "exit.json").exists, JOB_TIMEOUT, f"job {job_id} to exit", interval=0.2)
    job = cluster.wait_job(job_id, DONE, timeout=JOB_TIMEOUT)
    logs = cluster.cli("logs", str(job_id)).stdout
    match = FIRST_STEP.search(logs)
    if job["state"] != "succeeded" or match is None:
        raise RuntimeError(f"gpudeck job {job_id} {job['state']}: {job.get('reason')}\n{logs[-3000:]}")
    return {"submit_cli": submitted - start, "launched": launched - start, "first_step": float(match.group(1)) - start}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each variant (default 7)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each variant first (default 1)")
    options = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up below on SIGTERM too

    results: dict[str, list[dict[str, float]]] = {"plain torchrun": [], "gpudeck": []}
    started = time.monotonic()
    plain = PlainRun()
    with tempfile.TemporaryDirectory(prefix="gpudeck-bench-") as folder:
        root = Path(folder)
        script = root / "ddp_first_step.py"
        script.write_text(textwrap.dedent(DDP_SCRIPT))
        cluster = Cluster(root / "cluster")
        cluster.root.mkdir()
        try:
            cluster.start_coordinator()
            cluster.start_agent("node-a", gpus=2)
            cluster.wait_nodes("up", 1)
            for repeat in range(-options.warmup, options.repeats):
                label = (f"warm-up {repeat + options.warmup + 1}" if repeat < 0
                         else f"run {repeat + 1}/{options.repeats}")
                for name in results:
                    timing = plain.run(script, root) if name == "plain torchrun" else gpudeck_run(cluster, script)
                    if repeat >= 0:
                        results[name].append(timing)
                    extra = "".join(f"  {k} {v:5.2f} s" for k, v in timing.items() if k != "first_step")
                    print(f"  {label:<12} {name:<15} first step after {timing['first_step']:5.2f} s{extra}", flush=True)
        except BaseException:
            for name in ("coordinator", "node-a"):
                print(f"--- {name} log (tail)\n{cluster.logs_of(name)[-2000:]}", file=sys.stderr)
            raise
        finally:
            plain.stop()
            cluster.stop()
            kill_everything_under(root)  # ranks of either variant left behind by an interrupted run
    print_table(results, time.monotonic() - started)
    return 0


def print_table(results: dict[str, list[dict[str, Any]]], seconds: float) -> None:
    print()
    print("submit (or Popen) to first training step, 2 ranks on one node, gloo on CPU")
    print(f"{'variant':<16}{'median s':>10}{'min':>8}{'max':>8}   gpudeck phases (median s from submit)")
    for name, runs in results.items():
        firsts = [r["first_step"] for r in runs]
        phases = ""
        if name == "gpudeck":
            phases = (f"   submit CLI returned {statistics.median(r['submit_cli'] for r in runs):.2f}, "
                      f"torchrun spawned {statistics.median(r['launched'] for r in runs):.2f}")
        print(f"{name:<16}{statistics.median(firsts):>10.2f}{min(firsts):>8.2f}{max(firsts):>8.2f}{phases}")
    plain = statistics.median(r["first_step"] for r in results["plain torchrun"])
    ours = statistics.median(r["first_step"] for r in results["gpudeck"])
    # Each gpudeck run follows its plain run at once: the paired difference cancels slow drift.
    paired = statistics.median(g["first_step"] - p["first_step"]
                               for p, g in zip(results["plain torchrun"], results["gpudeck"]))
    print(f"\nratio gpudeck/plain: {ours / plain:.2f}; overhead {ours - plain:+.2f} s "
          f"({ours:.2f} s vs {plain:.2f} s, median of {len(results['gpudeck'])}; "
          f"median paired difference {paired:+.2f} s); took {seconds:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
