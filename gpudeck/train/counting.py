"""Count the payload bytes this rank hands to torch.distributed, by kind of operation.

Where the counting happens, and why there:

* Collectives and point-to-point ops are counted on the methods of the ``ProcessGroup`` class (the
  pybind class every ``torch.distributed`` function ends in: ``dist.all_reduce`` calls
  ``group.allreduce``, ``dist.isend`` calls ``group.send``, the coalescing manager calls
  ``group.allreduce_coalesced``). Replacing module functions such as ``torch.distributed.isend``
  would break ``torch.distributed.pipelining`` and ``batch_isend_irecv``, which compare a
  ``P2POp``'s op against torch's own ``isend``/``irecv``; the class methods are below those checks.
* ``dist._broadcast_coalesced`` (C++) is how DDP broadcasts parameters at construction and buffers
  before each forward; it never reaches a ``ProcessGroup`` method from Python, so it is counted on
  the ``torch.distributed`` module attribute, under ``broadcast``.
* DDP's gradient all-reduce runs in C++; :mod:`gpudeck.train.ddp` routes it through a Python comm
  hook so that it reaches ``ProcessGroup.allreduce`` and is counted here, once.
* RPC is counted in :mod:`gpudeck.train.rpc_counting`.

Not visible from Python, hence not counted: functional collectives (``torch.ops._c10d_functional``,
used by DTensor and compiled DDP), distributed autograd's gradient messages, and the small
collectives DDP's constructor runs in C++ to compare parameter shapes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from gpudeck.train import ddp, rpc_counting
from gpudeck.train.counter import TrafficCounter
from gpudeck.train.payload import tensor_bytes

# ProcessGroup method -> (kind, index of the payload argument after self, its keyword names).
# The payload is what this rank hands over: the input of gathers, reductions and all-to-alls,
# the receive buffer of recv, and this rank's own chunk (the output) of scatter.
PG_PAYLOADS: dict[str, tuple[str, int, tuple[str, ...]]] = {
    "allreduce": ("all_reduce", 0, ("tensors", "tensor")),
    "allreduce_coalesced": ("all_reduce", 0, ("tensors",)),
    "broadcast": ("broadcast", 0, ("tensors", "tensor")),
    "reduce": ("reduce", 0, ("tensors", "tensor")),
    "allgather": ("all_gather", 1, ("input_tensors", "input_tensor")),
    "_allgather_base": ("all_gather", 1, ("input",)),
    "all_gather_single": ("all_gather", 1, ("input",)),
    "allgather_coalesced": ("all_gather", 1, ("input_list",)),
    "allgather_into_tensor_coalesced": ("all_gather", 1, ("inputs",)),
    "all_gather_single_coalesced": ("all_gather", 1, ("inputs",)),
    "gather": ("gather", 1, ("input_tensors", "input_tensor")),
    "scatter": ("scatter", 0, ("output_tensors", "output_tensor")),
    "reduce_scatter": ("reduce_scatter", 1, ("input_tensors", "input")),
    "_reduce_scatter_base": ("reduce_scatter", 1, ("inputTensor",)),
    "reduce_scatter_single": ("reduce_scatter", 1, ("inputTensor",)),
    "reduce_scatter_single_coalesced": ("reduce_scatter", 1, ("inputs",)),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter", 1, ("inputs",)),
    "alltoall": ("all_to_all", 1, ("input_tensors",)),
    "alltoall_base": ("all_to_all", 1, ("input",)),
    "all_to_all_single": ("all_to_all", 1, ("input",)),
    "send": ("send", 0, ("tensors",)),
    "recv": ("recv", 0, ("tensors",)),
    "recv_anysource": ("recv", 0, ("arg0",)),
}


def install(counter: TrafficCounter) -> None:
    """Start counting into ``counter``. Call once per process, before the user's script runs."""
    for name, (kind, index, keywords) in PG_PAYLOADS.items():
        _count_method(dist.ProcessGroup, name, kind, index, keywords, counter)
    dist._broadcast_coalesced = _counted_broadcast_coalesced(dist._broadcast_coalesced, counter)
    ddp.install()
    rpc_counting.install(counter)


def _count_method(
    cls: type, name: str, kind: str, index: int, keywords: tuple[str, ...], counter: TrafficCounter
) -> None:
    """Replace ``cls.name`` by a wrapper that counts the payload argument once the call succeeds."""
    original = getattr(cls, name)

    @functools.wraps(original)
    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        counter.entered()
        try:
            work = original(self, *args, **kwargs)
        except BaseException:
            counter.completed()
            raise
        counter.add(kind, tensor_bytes(_argument(args, kwargs, index, keywords)))
        _when_done(work, counter)
        return work

    setattr(cls, name, counted)


def _when_done(work: Any, counter: TrafficCounter) -> None:
    """Count the collective complete when its work is: until then this rank waits in it (for its
    peers and the transfer). The work's future says so without waiting (DDP's reducer waits on it in
    C++, never through Python's Work.wait); where a backend gives none, the call itself is all that
    is measured. On NCCL the future completes once the kernels are queued, so waits read near zero
    there and no straggler is named, while completed counts still show a hang."""
    try:
        future = work.get_future()
    except (AttributeError, RuntimeError):
        counter.completed()
        return
    future.add_done_callback(lambda _: counter.completed())


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, keywords: tuple[str, ...]) -> Any:
    """The argument at ``index`` whether it was passed by position or by one of its names."""
    if len(args) > index:
        return args[index]
    return next((kwargs[key] for key in keywords if key in kwargs), None)


def _counted_broadcast_coalesced(original: Callable[..., Any], counter: TrafficCounter) -> Callable[..., Any]:
    """Wrap ``dist._broadcast_coalesced(group, tensors, buffer_size, src)``; counted on every rank."""

    @functools.wraps(original)
    def counted(group: Any, tensors: Any, *args: Any, **kwargs: Any) -> Any:
        counter.entered()
        try:
            result = original(group, tensors, *args, **kwargs)
        finally:
            counter.completed()  # synchronous: it returns once done
        counter.add("broadcast", tensor_bytes(tensors))
        return result

    return counted
