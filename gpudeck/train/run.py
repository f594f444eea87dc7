"""Run a user's unmodified training script in this rank and count the traffic it makes.

``torchrun ... -m gpudeck.train.run SCRIPT.py ARG...`` behaves like ``torchrun ... SCRIPT.py ARG...``
(the script runs as ``__main__`` with ``sys.argv = [SCRIPT.py, ARG...]`` and its own folder first
on ``sys.path``; its exit status is this process's), and in addition:

* with ``GPUDECK_LOG_DIR`` set, fds 1 and 2 go to ``$GPUDECK_LOG_DIR/rank-$RANK.log`` (append), so
  native output from torch, gloo or NCCL lands there too;
* bytes handed to torch.distributed are counted by kind (:mod:`gpudeck.train.counting`), from the
  moment the script imports torch (:mod:`gpudeck.train.autocount`): nothing imports it before the
  script's first line, so a script that never does starts in the time of a bare interpreter;
* with ``GPUDECK_TRAFFIC_ADDR`` set, totals go to the agent once a second and once at the end
  (:mod:`gpudeck.train.reporter`);
* with ``GPUDECK_LOG_DIR`` set, the rank's own exit status and final totals are left in
  ``rank-$RANK.end.json`` there (:mod:`gpudeck.protocol.rank_end`), since torchrun reports every
  failure as exit 1.

``torchrun ... -m gpudeck.train.run --workload NAME ARG...`` runs a built-in workload instead
(:mod:`gpudeck.train.workloads`): ``main(ARGS)`` of its module, with the same log redirection,
counting, reporting and exit status (what ``main`` returns; an uncaught exception gives 1).
"""

from __future__ import annotations

import io
import os
import runpy
import sys
import time
import types
from collections.abc import Mapping
from typing import cast

from gpudeck.protocol import rank_end
from gpudeck.protocol.rank_end import RankEnd, exit_status
from gpudeck.train.autocount import after_torch, install_counting
from gpudeck.train.counter import TrafficCounter
from gpudeck.train.reporter import reporter_from_env

USAGE = ("usage: python -m gpudeck.train.run SCRIPT [ARG...]\n"
         "       python -m gpudeck.train.run --workload NAME [ARG...]")


def main(argv: list[str]) -> int:
    """Run ``argv[0]`` (or ``--workload argv[1]``) with the arguments after it; return its exit
    status (SystemExit passes through)."""
    if not argv or argv[0] in ("-h", "--help") or argv == ["--workload"]:
        print(USAGE, file=sys.stderr)
        return 2
    workload = argv[1] if argv[0] == "--workload" else None
    redirect_output(os.environ)
    if workload is not None:
        from gpudeck.train.workloads import MODULES

        if workload not in MODULES:
            print(f"gpudeck: there is no built-in workload {workload!r} (built-in workloads: "
                  f"{', '.join(sorted(MODULES))})", file=sys.stderr)
            return 2
    elif not os.path.exists(argv[0]):
        print(f"{sys.executable}: can't open file {argv[0]!r}: no such file", file=sys.stderr)
        return 2
    counter = TrafficCounter()
    after_torch(lambda: install_counting(counter))  # the script's first line runs before torch is imported
    reporter = reporter_from_env(counter)
    if reporter is not None:
        reporter.start()
    status = 1
    try:
        status = run_workload(workload, argv[2:]) if workload is not None else run_script(argv[0], argv[1:])
        return status
    except SystemExit as exc:
        status = exit_status(exc.code)
        raise
    finally:
        close_process_group()
        if reporter is not None:
            reporter.close()
        record_end(os.environ, status, counter)


def close_process_group() -> None:
    """Destroy the default process group a script left open. Python's teardown would do it
    anyway, but after a script run through runpy that teardown races gloo's threads: about one exit
    in ten aborted with "terminate called without an active exception" (status -6, not the
    script's)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    try:
        dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - the script's own status matters more than a clean teardown
        print(f"gpudeck: could not close the script's process group ({type(exc).__name__}: {exc})",
              file=sys.stderr)


def record_end(env: Mapping[str, str], status: int, counter: TrafficCounter) -> None:
    """Leave this rank's own exit status and final totals for the agent (see rank_end)."""
    log_dir = env.get("GPUDECK_LOG_DIR")
    if not log_dir:
        return
    try:
        rank_end.write(log_dir, RankEnd(rank=int(env.get("RANK", "0")), exit_code=status, time=time.time(),
                                        traffic=dict(counter.snapshot())))
    except (OSError, ValueError) as exc:
        print(f"gpudeck: could not record how this rank ended ({exc})", file=sys.stderr)


def redirect_output(env: Mapping[str, str]) -> None:
    """Point fds 1 and 2 at this rank's log file, with dup2 so native writes follow."""
    log_dir = env.get("GPUDECK_LOG_DIR")
    if not log_dir:
        return
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, f"rank-{int(env.get('RANK', '0'))}.log")
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    cast(io.TextIOWrapper, sys.stdout).reconfigure(line_buffering=True)  # typeshed says TextIO; it is the interpreter's


def run_script(path: str, args: list[str]) -> int:
    """Run the script as ``python path args`` would; an uncaught exception is printed and gives 1."""
    sys.argv = [path, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(path))
    try:
        runpy.run_path(path, run_name="__main__")
    except Exception as exc:  # noqa: BLE001 - the script's uncaught exception is printed and gives 1
        exc.with_traceback(_script_frames(exc.__traceback__, path))
        sys.excepthook(type(exc), exc, exc.__traceback__)
        return 1
    return 0


def run_workload(name: str, args: list[str]) -> int:
    """Run a built-in workload's ``main(args)``; an uncaught exception is printed and gives 1."""
    from gpudeck.train.workloads import load

    sys.argv = [f"gpudeck.train.workloads:{name}", *args]
    try:
        status = load(name).main(args)
    except Exception as exc:  # noqa: BLE001 - the workload's uncaught exception is printed and gives 1
        sys.excepthook(type(exc), exc, exc.__traceback__)
        return 1
    return int(status or 0)


def _script_frames(tb: types.TracebackType | None, path: str) -> types.TracebackType | None:
    """Drop this wrapper's and runpy's frames, so the traceback reads as under plain python."""
    while tb is not None and tb.tb_frame.f_code.co_filename != path:
        tb = tb.tb_next
    return tb


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
