"""A workload rank's place in the job: its process group, device, log lines and step timing."""

from __future__ import annotations

import argparse
import os
import signal
import time
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Callable, Protocol

import torch
import torch.distributed as dist


@dataclass
class Session:
    """This rank in a job that torchrun started: NCCL on a GPU where there is one, else gloo on the CPU."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str

    def log(self, text: str) -> None:
        """One line of this rank's output, as ``gpudeck logs`` shows it."""
        print(f"rank {self.rank} {text}", flush=True)


def start(args: argparse.Namespace) -> Session:
    """Join the job's default process group (torchrun's environment says where the others are)."""
    missing = [name for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
               if name not in os.environ]
    if missing:
        raise SystemExit("a workload runs under torchrun (gpudeck submit --workload does that): "
                         f"{', '.join(missing)} not set")
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available() and not args.cpu:
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
        dist.init_process_group(backend, device_id=device)
    else:
        device, backend = torch.device("cpu"), "gloo"
        dist.init_process_group(backend)
    session = Session(rank, world, local_rank, device, backend)
    session.log(f"of {world}: {backend} on {device}")
    return session


def stop() -> None:
    """Leave the process group."""
    if dist.is_initialized():
        dist.destroy_process_group()


def run(args: argparse.Namespace, train: Callable[[argparse.Namespace, Session], object]) -> int:
    """A workload's whole life in this rank: join the job, train, leave also when training fails."""
    session = start(args)
    try:
        train(args, session)
    finally:
        stop()
    return 0


def started(work: dist.Work | None) -> dist.Work:
    """A point-to-point operation's handle: torch types it as maybe None, which it is only for a rank
    outside the group it names."""
    assert work is not None
    return work


@dataclass
class StepTimer:
    """Wall time per step over the steps this process ran, the first (warm-up) one left out."""

    device: torch.device
    steps: int = 0
    _first_done: float | None = None
    _last_done: float | None = None

    def step_done(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if self._first_done is None:
            self._first_done = now
        self._last_done = now
        self.steps += 1

    def summary(self) -> str:
        """``finished N steps; M ms/step`` (the figure bench/workload_table.py reads)."""
        if self.steps < 2 or self._first_done is None or self._last_done is None:
            return f"finished {self.steps} steps"
        per_step = (self._last_done - self._first_done) / (self.steps - 1)
        return f"finished {self.steps} steps; {per_step * 1000:.3f} ms/step"


class Steps(Protocol):
    """What a workload trains step by step: where it resumes, one step, one checkpoint."""

    start: int

    def step(self, step: int) -> torch.Tensor | None: ...  # the loss, None on a rank that has none

    def save(self, step: int, stopping: bool = False) -> None: ...  # stopping: saved because asked to stop


STOPPED = 128 + signal.SIGTERM  # the exit code of a rank that stopped when asked, as if SIGTERM had ended it


class Stopping:
    """SIGTERM asks a rank to stop: gpudeck sends it to a cancelled or preempted job and waits
    $GPUDECK_PREEMPT_GRACE seconds (30 by default) before SIGKILL. Inside this context the signal only
    sets `asked`; the workload finishes the step it is in, saves a checkpoint of it (`stop_after`) and
    exits, so a preempted job resumes where it was stopped instead of at its last periodic checkpoint."""

    def __init__(self) -> None:
        self.asked = False

    def __enter__(self) -> "Stopping":
        self._before = signal.signal(signal.SIGTERM, self._ask)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        signal.signal(signal.SIGTERM, self._before)

    def _ask(self, signum: int, frame: FrameType | None) -> None:
        self.asked = True

    def stop_after(self, done: int, save: Callable[..., None], session: Session) -> None:
        """When asked to stop: save the checkpoint of `done` steps and exit with STOPPED."""
        if self.asked:
            save(done, stopping=True)
            session.log(f"stopped after step {done - 1} as asked (SIGTERM); saved the checkpoint of step {done}")
            raise SystemExit(STOPPED)


def train_steps(trainer: Steps, args: argparse.Namespace, session: Session) -> bool:
    """Steps from the checkpoint to --steps, logging the loss and saving as the options say, until
    done or asked to stop (see `Stopping`); False when the checkpoint is already at or past the end."""
    if trainer.start >= args.steps:
        session.log(f"nothing to do: the checkpoint of step {trainer.start} is at or past --steps {args.steps}")
        return False
    if trainer.start:
        session.log(f"resuming from the checkpoint of step {trainer.start}")
    timer = StepTimer(session.device)
    with Stopping() as stopping:
        for step in range(trainer.start, args.steps):
            loss = trainer.step(step)
            timer.step_done()
            done = step + 1
            if loss is not None and (step % args.log_every == 0 or done == args.steps):
                session.log(f"step {step} loss {loss.item():.6f}")
            if done % args.checkpoint_every == 0 or done == args.steps:
                trainer.save(done)
            elif done < args.steps:
                stopping.stop_after(done, trainer.save, session)
            if args.step_sleep:
                time.sleep(args.step_sleep)
    session.log(timer.summary())
    return True
