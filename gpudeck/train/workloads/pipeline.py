"""pipeline: the model cut into stages, one per rank, trained with a GPipe schedule.

Rank s holds the consecutive layers of stage s (:func:`~gpudeck.train.workloads.task.stage_bounds`).
Each step's batch is cut into ``--micro-batches`` parts. Forward: stage s receives micro-batch m's
activation from stage s-1, runs its layers and sends the result on to stage s+1 without waiting
(``isend``), so it can start on micro-batch m+1 while its neighbour works on m: the stages overlap.
The last stage computes the loss of each micro-batch (``sum of losses / batch size``, so the micro-
batch gradients add up to the gradient of the whole batch's mean loss). Backward runs over the
micro-batches in reverse, the gradient of each activation sent back to the stage before. Then every
stage takes one SGD step on its own parameters: the result equals the unsplit model trained on the
whole batch.

The first stage makes the inputs and the last stage the labels itself (the data is a function of
the seed and the step), so only activations and their gradients travel: per step and stage
boundary, ``batch size x hidden x element size`` bytes forward (``send`` on stage s, ``recv`` on s+1)
and as many backward. Plus ``all_gather`` for the checkpoint agreement. Hand-written rather than
``torch.distributed.pipelining`` so that every transfer is in sight, counted exactly, and easy to
copy; the schedule is the same as that package's ``ScheduleGPipe``.

The last stage prints the loss. Each rank checkpoints its own stage (parameters and momentum).

    gpudeck submit --nodes 2 --gpus-per-node 1 --workload pipeline --steps 300 --micro-batches 4
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.distributed as dist

from gpudeck.train.workloads import options, session as sessions, task
from gpudeck.train.workloads.checkpoint import Checkpoints

NAME = "pipeline"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """This workload's options (the shared ones and its own)."""
    return options.parse(NAME, argv)


def main(argv: Sequence[str]) -> int:
    return sessions.run(parse_args(argv), train)


class Stage:
    """One rank's stage: its layers, optimizer, and the GPipe step."""

    def __init__(self, args: argparse.Namespace, session: sessions.Session) -> None:
        self.args, self.session = args, session
        self.config = config = options.config(args)
        if not 1 <= args.micro_batches <= config.batch_size:
            raise SystemExit(f"--micro-batches must be between 1 and --batch-size ({config.batch_size})")
        self.index, self.stages = session.rank, session.world
        self.first, self.last = self.index == 0, self.index == self.stages - 1
        if config.layers < self.stages:
            raise SystemExit(f"a pipeline of {self.stages} stages (ranks) needs --layers {self.stages} or more")
        bounds = task.stage_bounds(config.layers, self.stages)[self.index]
        self.module = task.stage_module(task.build_model(config), bounds).to(session.device)
        self.optimizer = task.make_optimizer(self.module.parameters(), config)
        self.data = task.Data(config, session.device)
        self.sizes = task.micro_batch_sizes(config.batch_size, args.micro_batches)
        self.checkpoints = Checkpoints(args.checkpoint_dir, NAME, {
            "config": {k: v for k, v in vars(config).items() if k not in ("lr", "momentum")},
            "world": session.world})
        self.piece = f"stage-{self.index}"
        self.start, states = self.checkpoints.restore(session, {f"stage-{s}": {s} for s in range(self.stages)})
        if states:
            self.module.load_state_dict(states[self.piece]["model"])
            self.optimizer.load_state_dict(states[self.piece]["optimizer"])

    def _activation(self, rows: int) -> torch.Tensor:
        return torch.empty(rows, self.config.hidden, dtype=task.torch_dtype(self.config), device=self.session.device)

    def step(self, step: int) -> torch.Tensor | None:
        """One training step; returns the batch's loss on the last stage, None elsewhere."""
        previous, following = self.index - 1, self.index + 1
        count = len(self.sizes)
        if self.first or self.last:
            inputs, labels = self.data.batch(step)
            input_parts, label_parts = task.micro_batches(inputs, count), task.micro_batches(labels, count)
        sends: list[dist.Work] = []
        in_flight: list[torch.Tensor] = []  # what the pending sends read from
        stage_inputs: list[torch.Tensor] = []
        stage_outputs: list[torch.Tensor] = []
        # Forward, the next micro-batch's activation arriving while this one is computed.
        incoming = None if self.first else self._receive(self.sizes[0], previous)
        for m in range(count):
            if self.first:
                x = input_parts[m]
            else:
                x = self._wait(incoming).requires_grad_()
                if m + 1 < count:
                    incoming = self._receive(self.sizes[m + 1], previous)
            y = self.module(x)
            stage_inputs.append(x)
            stage_outputs.append(y)
            if not self.last:
                in_flight.append(y.detach())
                sends.append(sessions.started(dist.isend(in_flight[-1], following)))
        # Backward over the micro-batches in reverse, likewise receiving ahead.
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=task.torch_dtype(self.config), device=self.session.device)
        incoming = None if self.last else self._receive(self.sizes[-1], following)
        for m in reversed(range(count)):
            if self.last:
                loss = task.loss_fn(stage_outputs[m], label_parts[m]) * (self.sizes[m] / self.config.batch_size)
                loss.backward()
                total += loss.detach()
            else:
                gradient = self._wait(incoming)
                if m > 0:
                    incoming = self._receive(self.sizes[m - 1], following)
                stage_outputs[m].backward(gradient)
            if not self.first:
                sends.append(sessions.started(dist.isend(task.grad_of(stage_inputs[m]), previous)))
        for work in sends:
            work.wait()
        self.optimizer.step()
        return total if self.last else None

    @staticmethod
    def _wait(incoming: tuple[torch.Tensor, dist.Work] | None) -> torch.Tensor:
        assert incoming is not None
        buffer, work = incoming
        work.wait()
        return buffer

    def _receive(self, rows: int, source: int) -> tuple[torch.Tensor, dist.Work]:
        buffer = self._activation(rows)
        return buffer, sessions.started(dist.irecv(buffer, source))

    def save(self, step: int, stopping: bool = False) -> None:
        self.checkpoints.save(self.piece, step, {"model": self.module.state_dict(),
                                                 "optimizer": self.optimizer.state_dict()})


def train(args: argparse.Namespace, session: sessions.Session) -> Stage:
    stage = Stage(args, session)
    sessions.train_steps(stage, args, session)
    return stage
