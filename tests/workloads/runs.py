"""Running the built-in workloads for tests: torchrun, a traffic sink, checkpoints, killing midway."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import torch

from gpudeck.agent.procs import pids_with_env, signal_pids
from tests.traffic_sink import Sink

LOSS_LINE = re.compile(r"rank (\d+) step (\d+) (eval )?loss ([0-9.]+)")
MARKER = "GPUDECK_WORKLOAD_TEST_RUN"


def env(**extra: str) -> dict[str, str]:
    """The ranks' environment. OMP_NUM_THREADS=1: these tests run torchrun by hand, some as several
    one-rank "nodes" on this machine, to which torchrun gives no thread setting; one thread a rank keeps
    them from oversubscribing two cores, as torchrun's own default does for a node of several ranks."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GPUDECK_")}
    return {**clean, "OMP_NUM_THREADS": "1", "GPUDECK_JOB_ID": "7", "GPUDECK_ATTEMPT": "1", **extra}


def command(workload: str, ranks: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
            "-m", "gpudeck.train.run", "--workload", workload, *args]


def torchrun(workload: str, ranks: int, args: list[str], cwd: Path, sink: Sink | None = None,
             timeout: float = 120) -> str:
    """Run a workload to the end; its output (both ranks' lines), after checking it exited 0."""
    extra = {"GPUDECK_TRAFFIC_ADDR": sink.address} if sink is not None else {}
    result = subprocess.run(command(workload, ranks, args), env=env(**extra), cwd=cwd, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stdout


def torchrun_nodes(workload: str, checkpoint_dirs: list[Path], args: list[str], cwd: Path, sink: Sink | None = None,
                   timeout: float = 120) -> str:
    """Run a workload as one rank on each of several "nodes" (torchrun per node, as the agents start
    it), node i with its own GPUDECK_CHECKPOINT_DIR; the nodes' output, after checking all exited 0."""
    port = _free_port()
    extra = {"GPUDECK_TRAFFIC_ADDR": sink.address} if sink is not None else {}
    processes = []
    for node, folder in enumerate(checkpoint_dirs):
        launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(checkpoint_dirs)),
                  "--node-rank", str(node), "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
                  "--master-port", str(port), "-m", "gpudeck.train.run", "--workload", workload, *args]
        processes.append(subprocess.Popen(launch, env=env(GPUDECK_CHECKPOINT_DIR=str(folder), **extra), cwd=cwd,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [process.communicate(timeout=timeout)[0] for process in processes]
    assert all(process.returncode == 0 for process in processes), "\n".join(o[-3000:] for o in outputs)
    return "".join(outputs)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_and_kill(workload: str, ranks: int, args: list[str], cwd: Path, checkpoint_dir: Path, after_step: int,
                 timeout: float = 60) -> None:
    """Start a workload and SIGKILL every one of its processes once a whole checkpoint of ``after_step``
    or later is on disk (every piece of it: a pipeline's stages each save their own, and the run
    resumes from the newest step all of them hold), as when a node is lost; fails if the run ends
    before that."""
    marker = uuid.uuid4().hex
    process = subprocess.Popen(command(workload, ranks, args), env=env(**{MARKER: marker}), cwd=cwd,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None  # stdout=PIPE
    deadline = time.monotonic() + timeout
    try:
        while not any(step >= after_step for step in whole_checkpoint_steps(checkpoint_dir)):
            assert process.poll() is None, "the run ended before it could be killed: " + process.stdout.read().decode()
            assert time.monotonic() < deadline, "no checkpoint appeared in time"
            time.sleep(0.02)
    finally:
        kill_marked(marker)
        process.wait(timeout=30)
        process.stdout.close()


def run_and_stop(workload: str, ranks: int, args: list[str], cwd: Path, checkpoint_dir: Path, after_step: int,
                 timeout: float = 60) -> str:
    """Start a workload and SIGTERM its ranks (not torchrun) once a checkpoint of ``after_step`` or
    later is on disk, as gpudeck stops a preempted job; the run's output once it has ended."""
    marker = uuid.uuid4().hex
    process = subprocess.Popen(command(workload, ranks, args), env=env(**{MARKER: marker}), cwd=cwd,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None  # stdout=PIPE
    deadline = time.monotonic() + timeout
    try:
        while not any(step >= after_step for step in checkpoint_steps(checkpoint_dir)):
            assert process.poll() is None, "the run ended before it could be stopped: " + process.stdout.read()
            assert time.monotonic() < deadline, "no checkpoint appeared in time"
            time.sleep(0.02)
        signal_pids([pid for pid in pids_with_env(MARKER, marker) if b"gpudeck.train.run" in _cmdline(pid)],
                    signal.SIGTERM)
        return process.communicate(timeout=timeout)[0]
    finally:
        kill_marked(marker)
        if process.poll() is None:
            process.wait(timeout=30)


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def kill_marked(marker: str) -> None:
    """SIGKILL whatever this run started that is still there (torchrun puts ranks in sessions of their own)."""
    signal_pids(pids_with_env(MARKER, marker), signal.SIGKILL)


def checkpoint_steps(directory: Path) -> list[int]:
    return [int(path.stem.rsplit("-", 1)[1]) for path in directory.glob("*.pt")] if directory.is_dir() else []


def whole_checkpoint_steps(directory: Path) -> list[int]:
    """The steps every piece has a checkpoint of (a piece: the model, the server, a pipeline stage;
    its files are named alike but for the step), as far as the pieces that saved any step show."""
    pieces_of: dict[int, set[str]] = {}
    for path in directory.glob("*.pt") if directory.is_dir() else []:
        piece, step = path.stem.rsplit("-", 1)
        pieces_of.setdefault(int(step), set()).add(piece)
    pieces = set().union(*pieces_of.values())
    return [step for step, held in pieces_of.items() if held == pieces]


def final_model(directory: Path, steps: int) -> dict[str, torch.Tensor]:
    """The whole model's parameters in the checkpoints of ``steps`` (pipeline stages merged)."""
    merged: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob(f"*-{steps:08d}.pt")):
        merged.update(torch.load(path, map_location="cpu", weights_only=True)["state"]["model"])
    assert merged, f"no checkpoint of step {steps} in {sorted(p.name for p in directory.iterdir())}"
    return merged


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def losses(output: str, rank: int, eval_only: bool = False) -> dict[int, float]:
    """step -> loss printed by ``rank`` (eval losses when ``eval_only``)."""
    return {int(step): float(value) for r, step, ev, value in LOSS_LINE.findall(output)
            if int(r) == rank and bool(ev) == eval_only}

