"""The command-line options of the built-in workloads (``gpudeck submit --workload W [OPTION...]``).

This module does not import torch: ``gpudeck submit`` checks a workload's options with these parsers
before the job is queued (:func:`problem`), so a mistyped option is refused at once instead of
failing every rank once the job runs, and the ranks parse with the same parsers (:func:`parse`), so
the two cannot disagree.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

DTYPE_NAMES = ("float32", "float64")


@dataclass(frozen=True)
class Config:
    """What determines the model, the data and the optimisation; the same on every rank."""

    hidden: int = 64
    layers: int = 4
    batch_size: int = 64
    lr: float = 0.02
    momentum: float = 0.9
    seed: int = 0
    dtype: str = "float32"


def _data_parallel(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bucket-mb", type=float, metavar="MB",
                        help="DDP gradient bucket size (default: the whole model in one bucket on the CPU, "
                             "DDP's default on GPUs)")


def _parameter_server(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=("sync", "async"), default="sync",
                        help="sync: average every worker's gradient each step; async: apply each as it arrives "
                             "(default: sync)")


def _pipeline(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--micro-batches", type=int, default=4, metavar="M",
                        help="micro-batches per step, at most --batch-size (default: 4)")


# Each workload's description and the options only it takes, by the name `--workload` takes.
WORKLOADS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "data-parallel": ("DDP: the whole model on every rank, gradients all-reduced every step", _data_parallel),
    "parameter-server": ("one server rank holds the parameters; workers pull them and push gradients "
                         "(sync or async)", _parameter_server),
    "pipeline": ("the model cut into one stage per rank; activations and gradients pass between neighbours "
                 "(GPipe)", _pipeline),
}


class _Refusal(Exception):
    """What argparse would have printed before exiting with 2, for `problem` to return."""


class _CheckingParser(argparse.ArgumentParser):
    """A parser that raises instead of exiting on a usage error, so the submitting CLI can report it in
    its own words."""

    def error(self, message: str) -> NoReturn:
        raise _Refusal(message)


def parser(name: str, kind: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parser of workload `name`'s options: those every workload takes, then its own."""
    description, own = WORKLOADS[name]
    built = kind(prog=f"gpudeck submit --workload {name}", description=description)
    defaults = Config()
    built.add_argument("--steps", type=int, default=300, help="optimizer steps to train (default: 300)")
    built.add_argument("--batch-size", type=int, default=defaults.batch_size,
                       help="points per step, split among the ranks that compute gradients "
                            f"(default: {defaults.batch_size})")
    built.add_argument("--lr", type=float, default=defaults.lr, help=f"learning rate (default: {defaults.lr})")
    built.add_argument("--momentum", type=float, default=defaults.momentum,
                       help=f"SGD momentum (default: {defaults.momentum})")
    built.add_argument("--hidden", type=int, default=defaults.hidden,
                       help=f"width of the hidden layers (default: {defaults.hidden})")
    built.add_argument("--layers", type=int, default=defaults.layers,
                       help=f"number of Linear layers, at least 2 (default: {defaults.layers})")
    built.add_argument("--dtype", choices=DTYPE_NAMES, default=defaults.dtype,
                       help=f"parameter and activation type (default: {defaults.dtype})")
    built.add_argument("--seed", type=int, default=defaults.seed,
                       help="seeds the data and the initial parameters (default: 0)")
    built.add_argument("--checkpoint-dir", default=os.environ.get("GPUDECK_CHECKPOINT_DIR") or None,
                       help="save checkpoints here and resume from them (default: $GPUDECK_CHECKPOINT_DIR, "
                            "which gpudeck sets to a folder of the job's on each node; unset: no checkpoints)")
    built.add_argument("--checkpoint-every", type=int, default=50, metavar="N",
                       help="save a checkpoint every N steps and at the end (default: 50)")
    built.add_argument("--log-every", type=int, default=10, metavar="N",
                       help="print the loss every N steps and at the end (default: 10)")
    built.add_argument("--step-sleep", type=float, default=0.0, metavar="SECONDS",
                       help="sleep this long after each step, to slow a demonstration down (default: 0)")
    built.add_argument("--cpu", action="store_true", help="train on the CPU with gloo even where CUDA is available")
    own(built)
    return built


def parse(name: str, argv: Sequence[str]) -> argparse.Namespace:
    """Workload `name`'s options from `argv`; a usage error exits with 2, as any program's would."""
    options = parser(name)
    args = options.parse_args(list(argv))
    wrong = _value_problem(args)
    if wrong:
        options.error(wrong)
    return args


def problem(name: str, argv: Sequence[str]) -> str | None:
    """Why `argv` are not options workload `name` takes, or None; what `gpudeck submit` asks before it
    queues the job. `--help` among them prints the workload's options and exits, as it would at run time."""
    try:
        return _value_problem(parser(name, _CheckingParser).parse_args(list(argv)))
    except _Refusal as refusal:
        return str(refusal)


def option_names(name: str) -> list[str]:
    """The long options workload `name` takes, in the order its help lists them."""
    return [action.option_strings[-1] for action in parser(name)._actions
            if action.option_strings and action.dest != "help"]


def _value_problem(args: argparse.Namespace) -> str | None:
    for option in ("steps", "batch_size", "hidden", "checkpoint_every", "log_every"):
        if getattr(args, option) < (0 if option == "steps" else 1):
            return f"--{option.replace('_', '-')} must be positive"
    if args.layers < 2:
        return "--layers must be at least 2"
    return None


def config(args: argparse.Namespace) -> Config:
    """The model, data and optimizer settings out of parsed options."""
    return Config(hidden=args.hidden, layers=args.layers, batch_size=args.batch_size, lr=args.lr,
                  momentum=args.momentum, seed=args.seed, dtype=args.dtype)
