"""data-parallel: every rank holds the whole model and trains on its shard of each batch (DDP).

DistributedDataParallel broadcasts rank 0's parameters when it wraps the model, then all-reduces
(averages) the gradients of every step in buckets, so every rank applies the same update: N ranks
on shards of B/N points equal one process on the whole batch of B points. On GPUs the buckets are
all-reduced while backward goes on; on the CPU the whole model is one bucket (:meth:`Trainer.bucket_mb`).

Traffic per rank: ``all_reduce`` = the model's gradient bytes every step (parameters x element
size); ``broadcast`` = the parameter bytes once, at start; ``all_gather`` = the checkpoint
agreement (see :mod:`~gpudeck.train.workloads.checkpoint`).

Each rank prints its shard's loss; rank 0 prints the evaluation loss at the end. Checkpoints hold
the model and the optimizer's momentum and are written by the first rank of every node, so any
node can give them back to the others after a restart.

    gpudeck submit --nodes 2 --gpus-per-node 1 --workload data-parallel --steps 300
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from torch.nn.parallel import DistributedDataParallel

from gpudeck.train.workloads import options, session as sessions, task
from gpudeck.train.workloads.checkpoint import Checkpoints

NAME = "data-parallel"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """This workload's options (the shared ones and its own)."""
    return options.parse(NAME, argv)


def main(argv: Sequence[str]) -> int:
    return sessions.run(parse_args(argv), train)


class Trainer:
    """The model, optimizer and data of one data-parallel rank; :meth:`step` trains one batch."""

    def __init__(self, args: argparse.Namespace, session: sessions.Session) -> None:
        self.args, self.session = args, session
        self.config = options.config(args)
        if self.config.batch_size % session.world:
            raise SystemExit(f"--batch-size {self.config.batch_size} must be a multiple of the {session.world} ranks")
        self.data = task.Data(self.config, session.device)
        self.model = task.build_model(self.config).to(session.device)
        self.optimizer = task.make_optimizer(self.model.parameters(), self.config)
        self.checkpoints = Checkpoints(args.checkpoint_dir, NAME, {
            "config": {k: v for k, v in vars(self.config).items() if k not in ("lr", "momentum")},
            "world": session.world})
        self.start, states = self.checkpoints.restore(session, {"model": set(range(session.world))})
        if states:
            self.model.load_state_dict(states["model"]["model"])
            self.optimizer.load_state_dict(states["model"]["optimizer"])
        self.ddp = DistributedDataParallel(self.model, bucket_cap_mb=self.bucket_mb(),
                                           device_ids=[session.device] if session.device.type == "cuda" else None)

    def bucket_mb(self) -> float | None:
        """--bucket-mb, or by default: on the CPU the whole model in one bucket, all-reduced once backward
        is done (there backward and all-reduce compete for the same cores, so overlapping them slows
        both: 23 ms a step instead of 27 for a 2 M parameter model on 2 cores, and the all-reduce gets
        half the bandwidth, see bench/allreduce_bandwidth.py); on GPUs DDP's default buckets, each
        all-reduced while backward goes on."""
        if self.args.bucket_mb is not None:
            return self.args.bucket_mb
        if self.session.device.type == "cuda":
            return None
        return sum(p.numel() * p.element_size() for p in self.model.parameters()) / 2**20 + 1

    def step(self, step: int) -> torch.Tensor:
        """Forward, backward (with the gradient all-reduce) and update on this rank's shard of ``step``."""
        inputs, labels = task.shard(self.data.batch(step), self.session.rank, self.session.world)
        loss = task.loss_fn(self.ddp(inputs), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def save(self, step: int, stopping: bool = False) -> None:
        """Every rank holds the same model: one rank per node writes it, but every rank that stops
        when asked does, since the rank that would have may already be gone (see `Stopping`)."""
        if self.session.local_rank == 0 or stopping:
            self.checkpoints.save("model", step, {"model": self.model.state_dict(),
                                                  "optimizer": self.optimizer.state_dict()})


def train(args: argparse.Namespace, session: sessions.Session) -> Trainer:
    trainer = Trainer(args, session)
    if sessions.train_steps(trainer, args, session) and session.rank == 0:
        session.log(f"eval loss {task.eval_loss(trainer.model, trainer.data):.6f}")
    return trainer
