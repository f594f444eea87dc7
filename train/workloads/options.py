"""The command-line options every built-in workload takes (``gpudeck submit --workload W [OPTION...]``)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence

from gpudeck.train.workloads.task import DTYPES, Config


def parse(name: str, description: str, argv: Sequence[str],
          extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """Parse a workload's arguments; ``extra`` adds the workload's own options."""
    parser = argparse.ArgumentParser(prog=f"gpudeck submit --workload {name}", description=description)
    defaults = Config()
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps to train (default: 300)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help="points per step, split among the ranks that compute gradients "
                             f"(default: {defaults.batch_size})")
    parser.add_argument("--lr", type=float, default=defaults.lr, help=f"learning rate (default: {defaults.lr})")
    parser.add_argument("--momentum", type=float, default=defaults.momentum,
                        help=f"SGD momentum (default: {defaults.momentum})")
    parser.add_argument("--hidden", type=int, default=defaults.hidden,
                        help=f"width of the hidden layers (default: {defaults.hidden})")
    parser.add_argument("--layers", type=int, default=defaults.layers,
                        help=f"number of Linear layers, at least 2 (default: {defaults.layers})")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=defaults.dtype,
                        help=f"parameter and activation type (default: {defaults.dtype})")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seeds the data and the initial parameters (default: 0)")
    parser.add_argument("--checkpoint-dir", default=os.environ.get("GPUDECK_CHECKPOINT_DIR") or None,
                        help="save checkpoints here and resume from them (default: $GPUDECK_CHECKPOINT_DIR, "
                             "which gpudeck sets to a folder of the job's on each node; unset: no checkpoints)")
    parser.add_argument("--checkpoint-every", type=int, default=50, metavar="N",
                        help="save a checkpoint every N steps and at the end (default: 50)")
    parser.add_argument("--log-every", type=int, default=10, metavar="N",
                        help="print the loss every N steps and at the end (default: 10)")
    parser.add_argument("--step-sleep", type=float, default=0.0, metavar="SECONDS",
                        help="sleep this long after each step, to slow a demonstration down (default: 0)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU with gloo even where CUDA is available")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(list(argv))
    for option in ("steps", "batch_size", "hidden", "checkpoint_every", "log_every"):
        if getattr(args, option) < (0 if option == "steps" else 1):
            parser.error(f"--{option.replace('_', '-')} must be positive")
    if args.layers < 2:
        parser.error("--layers must be at least 2")
    return args


def config(args: argparse.Namespace) -> Config:
    """The model, data and optimizer settings out of parsed options."""
    return Config(hidden=args.hidden, layers=args.layers, batch_size=args.batch_size, lr=args.lr,
                  momentum=args.momentum, seed=args.seed, dtype=args.dtype)
