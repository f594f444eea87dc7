"""The data-parallel workload's all-reduce bus bandwidth against torch's own all_reduce (the ceiling).

One 2-rank job (``torchrun ... -m gpudeck.train.run``, so traffic counting is on, as under the
agent) runs the data-parallel workload's own trainer (``gpudeck.train.workloads.data_parallel``)
with a timing DDP communication hook that does what torch's ``allreduce_hook`` does (divide the
bucket by the world size, all-reduce it) and times the all-reduce from its launch to the completion
of its future. In windows interleaved with those training steps, the same
ranks time plain ``dist.all_reduce`` on tensors of exactly the bucket sizes, back to back: what
torch itself achieves for that size in that run.

Each timing is taken on every rank and the smallest of the ranks' times is kept, which removes the
time the first rank to arrive waits for the other (skew, not bandwidth). Bus bandwidth is
``bytes * 2 (n - 1) / n / seconds`` (nccl-tests' convention; for 2 ranks, bytes per second). The
summary is the ratio plain / workload of the summed median times over all buckets, that is of the
bandwidths, workload / plain all_reduce (goal >= 0.9).

    python bench/allreduce_bandwidth.py [--hidden 1024] [--layers 4] [--bucket-mb MB] [--repeats 10] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

from gpudeck.agent.procs import pids_with_env, signal_pids

GOAL = 0.9
MARKER = "GPUDECK_BENCH_RUN"


# --- inside the ranks ---------------------------------------------------------------------------


def worker(options: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from gpudeck.train.workloads import data_parallel, session as sessions, task

    args = data_parallel.parse_args([
        "--hidden", str(options.hidden), "--layers", str(options.layers), "--batch-size", str(options.batch_size),
        "--steps", str(options.steps * options.repeats + options.warmup),
        *(["--bucket-mb", str(options.bucket_mb)] if options.bucket_mb else [])])
    args.checkpoint_dir = None
    torch.set_num_threads(1)
    session = sessions.start(args)
    trainer = data_parallel.Trainer(args, session)
    # (step, bucket or call, bytes) -> seconds of each all-reduce
    records: dict[tuple[int, int, int], float] = {}
    plain: dict[tuple[int, int, int], float] = {}
    step = 0

    def timed_hook(state, bucket):  # unannotated: DDP checks real annotations, and this file has string ones
        """torch's allreduce_hook (divide by the world size, all-reduce), timing the all-reduce alone."""
        tensor = bucket.buffer()
        key = (step, bucket.index(), tensor.numel() * tensor.element_size())
        tensor.div_(session.world)
        started = time.perf_counter()

        def done(future: torch.futures.Future) -> torch.Tensor:
            records[key] = time.perf_counter() - started
            return future.value()[0]

        return dist.all_reduce(tensor, async_op=True).get_future().then(done)

    trainer.ddp.register_comm_hook(None, timed_hook)
    for _ in range(options.warmup):
        trainer.step(step)
        step += 1
    records.clear()
    dtype = task.DTYPES[args.dtype]
    sizes: list[int] = []
    for _ in range(options.repeats):
        for _ in range(options.steps):
            trainer.step(step)
            step += 1
        sizes = sizes or sorted({nbytes for _, _, nbytes in records}, reverse=True)
        for nbytes in sizes:
            tensor = torch.randn(nbytes // dtype.itemsize, dtype=dtype)
            dist.all_reduce(tensor)  # warm this size
            for call in range(options.steps):
                started = time.perf_counter()
                dist.all_reduce(tensor)
                plain[(step, call, nbytes)] = time.perf_counter() - started
    gathered: list[tuple[dict, dict]] = [({}, {}) for _ in range(session.world)]
    dist.all_gather_object(gathered, (records, plain))
    if session.rank == 0:
        report(gathered, session.world, options)
    sessions.stop()


def report(gathered: list[tuple[dict, dict]], world: int, options: argparse.Namespace) -> None:
    """The per-bucket table and the summary, from every rank's timings."""
    bus = 2 * (world - 1) / world

    def fastest(which: int) -> dict[int, list[float]]:
        """Bytes -> seconds of each operation, the smallest over the ranks."""
        timings = [ranks[which] for ranks in gathered]
        by_size: dict[int, list[float]] = {}
        for key in set.intersection(*(set(t) for t in timings)):
            by_size.setdefault(key[2], []).append(min(t[key] for t in timings))
        return by_size

    workload, plain = fastest(0), fastest(1)
    print()
    print(f"{'bucket MB':>10}{'count':>7}{'workload GB/s':>15}{'all_reduce GB/s':>17}{'ratio':>8}")
    total_bytes = total_workload = total_plain = 0.0
    for nbytes in sorted(workload, reverse=True):
        w, p = statistics.median(workload[nbytes]), statistics.median(plain[nbytes])
        print(f"{nbytes / 1e6:>10.3f}{len(workload[nbytes]):>7}{nbytes * bus / w / 1e9:>15.3f}"
              f"{nbytes * bus / p / 1e9:>17.3f}{p / w:>8.3f}")
        total_bytes, total_workload, total_plain = total_bytes + nbytes, total_workload + w, total_plain + p
    ratio = total_plain / total_workload
    print()
    buckets = f", --bucket-mb {options.bucket_mb}" if options.bucket_mb else ""
    print(f"model: --hidden {options.hidden} --layers {options.layers} (float32){buckets}, {world} ranks, gloo on CPU")
    print(f"all buckets: workload {total_bytes * bus / total_workload / 1e9:.3f} GB/s, "
          f"torch all_reduce {total_bytes * bus / total_plain / 1e9:.3f} GB/s bus bandwidth")
    print(f"ratio workload / all_reduce: {ratio:.3f}  ({'meets' if ratio >= GOAL else 'misses'} the goal of >= {GOAL})",
          flush=True)


# --- the launcher ---------------------------------------------------------------------------------


def kill_marked(marker: str) -> None:
    """SIGKILL whatever this run started that is still there (torchrun puts ranks in sessions of their own)."""
    signal_pids(pids_with_env(MARKER, marker), signal.SIGKILL)


def launch(options: argparse.Namespace, forwarded: list[str]) -> int:
    marker = uuid.uuid4().hex
    env = {**os.environ, MARKER: marker}
    env.pop("GPUDECK_TRAFFIC_ADDR", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "gpudeck.train.run", str(Path(__file__).resolve()), "--worker", *forwarded]
    started = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        result = subprocess.run(command, env=env, cwd=Path(__file__).resolve().parent.parent, timeout=600)
    finally:
        kill_marked(marker)
    print(f"took {time.monotonic() - started:.0f} s")
    return result.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024, help="hidden width of the model (default 1024)")
    parser.add_argument("--layers", type=int, default=4, help="Linear layers (default 4: 2.1 M parameters, 8.4 MB)")
    parser.add_argument("--batch-size", type=int, default=64, help="points per step over both ranks (default 64)")
    parser.add_argument("--steps", type=int, default=20, help="training steps (and all_reduce calls per size) "
                                                              "per window (default 20)")
    parser.add_argument("--repeats", type=int, default=10, help="interleaved windows of each (default 10)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed training steps first (default 5)")
    parser.add_argument("--bucket-mb", type=float, help="the workload's --bucket-mb (default: its own choice)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    options, _ = parser.parse_known_args()
    if options.worker:
        worker(options)
        return 0
    return launch(options, sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
