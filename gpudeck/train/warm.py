"""A warm interpreter: torch imported once, ahead of any job, and a rank forked from it per request.

Importing torch takes seconds (2.1 s on a 2-core machine); a rank forked from an interpreter that
has done it starts its script at once, the way DataLoader workers fork after ``import torch``. The
agent (gpudeck.agent.warm) starts this module with one end of a socket pair in ``GPUDECK_WARM_FD``
and sends one JSON line per rank: ``{"argv": [...], "env": {...}, "cwd": ..., "log": ...}``; the
answer is ``{"pid": P}``, the pid of the rank's exit recorder, or ``{"error": ...}``.

Why forking here is safe, and what each fork does:

* no CUDA before the fork: torch is imported, never used; every request checks that CUDA was not
  initialised and that this interpreter still has one thread, and refuses (and this interpreter
  ends) otherwise, so the agent starts that rank cold;
* the recorder (first fork) leads a session of its own, as the agent's shell does for a cold rank,
  outlives the signals that stop its rank and leaves ``rank-R.exit`` (128 + N for signal N);
* the rank (second fork) gets the job's environment, folder, log on fds 1 and 2 and default signal
  handlers, reseeds what a fresh interpreter seeds from the OS (``random``, torch's default
  generator, numpy's global state when torch loaded numpy) and sizes the thread pools as a cold
  interpreter would have sized them at its import (``pool_sizes``);
* then it runs ``gpudeck.train.run`` as ``python -m gpudeck.train.run ARGV`` would, and exits through
  the interpreter's normal end (atexit, flushed streams).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Mapping

import threadpoolctl
import torch
import torch.distributed

from gpudeck.train import counting, run

PRELOADED = (torch.distributed, counting)  # imported here so that no rank pays for them
# The pools torch and numpy loaded (libgomp, numpy's OpenBLAS), found once here: each rank resizes them.
POOLS = threadpoolctl.ThreadpoolController()

FD = "GPUDECK_WARM_FD"
MAX_REQUEST = 4 * 1024 * 1024
_STOPPING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def serve(channel: socket.socket) -> dict[str, Any]:
    """Answer requests until the agent closes its end (then exit); return only in a forked rank."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # recorders are reaped by the kernel
    reader = channel.makefile("rb")
    channel.sendall(json.dumps({"ready": os.getpid()}).encode() + b"\n")
    while line := reader.readline(MAX_REQUEST):
        request = json.loads(line)
        problem = _unsafe()
        if problem:
            channel.sendall(json.dumps({"error": problem}).encode() + b"\n")
            sys.exit(1)
        pid = os.fork()
        if pid == 0:
            reader.close()
            channel.close()
            return _record(request)
        channel.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    sys.exit(0)


def _unsafe() -> str:
    if torch.cuda.is_initialized():
        return "CUDA was initialised in the warm interpreter"
    threads = _threads()
    if threads != 1:
        return f"the warm interpreter has {threads} threads"
    return ""


def _threads() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def _record(request: dict[str, Any]) -> dict[str, Any]:
    """In the recorder: lead a session, fork the rank, and leave its status when it is gone."""
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # the interpreter's own output goes to the agent's file: not this rank's
        os.dup2(null, fd)
    os.close(null)
    for number in _STOPPING:
        signal.signal(number, lambda *_: None)  # the stop is for the rank; its status must still be written
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    pid = os.fork()
    if pid == 0:
        _become_rank(request)
        return request
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    code = 128 - code if code < 0 else code
    exit_file = request["env"]["GPUDECK_RANK_EXIT"]
    try:
        with open(exit_file + ".partial", "w") as handle:
            handle.write(f"{code}\n")
        os.replace(exit_file + ".partial", exit_file)
    finally:
        os._exit(code)


def _become_rank(request: dict[str, Any]) -> None:
    for number in _STOPPING:
        signal.signal(number, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    env: dict[str, str] = request["env"]
    os.environ.clear()
    os.environ.update(env)
    os.chdir(request["cwd"])
    for folder in reversed([p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]):
        if folder not in sys.path:
            sys.path.insert(1, folder)
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    random.seed()
    torch.seed()  # a fresh interpreter's generator starts from the OS's entropy: this one's was the template's
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()
    intra_op, blas = pool_sizes(env, len(os.sched_getaffinity(0)), _physical_cores())
    POOLS.select(user_api="openmp").limit(limits=intra_op)
    POOLS.select(user_api="blas").limit(limits=blas)


def pool_sizes(env: Mapping[str, str], cpus: int, cores: int) -> tuple[int, int]:
    """The sizes a cold interpreter with `env` gives torch's intra-op pool and numpy's BLAS when it
    imports them, on `cpus` usable CPUs of `cores` physical cores.

    This interpreter imported both with every pool held at one thread (the agent starts it so:
    forking a process that has threads is unsafe), so each rank sets the sizes it would have read.
    As measured on torch 2.13: torch takes MKL's count, MKL_NUM_THREADS, else OMP_NUM_THREADS, else
    the physical cores, and never more than those; OpenBLAS takes OPENBLAS_NUM_THREADS, else
    GOTO_NUM_THREADS, else OMP_NUM_THREADS, else the CPUs, and never more than those. The pools are
    set through OpenMP and OpenBLAS directly: torch.set_num_threads would also start a pthreadpool
    that a cold rank never has."""
    intra_op = _first_count(env, "MKL_NUM_THREADS", "OMP_NUM_THREADS") or cores
    blas = _first_count(env, "OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS") or cpus
    return min(intra_op, cores), min(blas, cpus)


def _first_count(env: Mapping[str, str], *names: str) -> int:
    """The first of `names` set to a positive count (OpenMP's "4,2" counts as 4), or 0."""
    for name in names:
        first = env.get(name, "").split(",")[0].strip()
        if first.isdigit() and int(first) > 0:
            return int(first)
    return 0


def _physical_cores() -> int:
    """Physical cores among the CPUs this process may use (hyperthreads count once, as MKL counts)."""
    usable = os.sched_getaffinity(0)
    cores = set()
    for cpu in usable:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


if __name__ == "__main__":
    rank = serve(socket.socket(fileno=int(os.environ.pop(FD))))
    sys.argv = ["-m gpudeck.train.run", *rank["argv"]]
    sys.exit(run.main(rank["argv"]))
