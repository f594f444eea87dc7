"""Count ``torch.distributed.rpc`` traffic under the kind ``rpc``.

``rpc_sync``, ``rpc_async``, ``remote``, RRef proxies and ``DistributedOptimizer`` all end in six
C++ entry points that ``torch.distributed.rpc.api`` looks up as module globals at call time; they
are wrapped there. Counted: the tensor bytes in the arguments sent (for Python functions, exactly
the tensors torch's RPC pickler pulls out of the arguments; for builtins and TorchScript, tensors
found through lists, tuples and dicts), and the tensor bytes of each value received back: an RPC's
result once its future completes, and ``RRef.to_here()`` on a non-owner. The result is counted in
a done-callback, which runs on the RPC thread just after the caller is woken.

A tensor that appears several times in one message is counted once, as RPC's picklers send it once.
(Collectives count repeats: a tensor passed twice to a collective is sent twice.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed.rpc as rpc

from gpudeck.train.counter import TrafficCounter
from gpudeck.train.payload import unique_tensor_bytes

Payload = Callable[[tuple[Any, ...], dict[str, Any]], Any]

# entry point -> the part of its (args, kwargs) that is the user's payload (see rpc/api.py).
ENTRY_PAYLOADS: dict[str, Payload] = {
    "_invoke_rpc_builtin": lambda args, kwargs: (args[3:], kwargs),
    "_invoke_rpc_torchscript": lambda args, kwargs: args[2:4],
    "_invoke_rpc_python_udf": lambda args, kwargs: args[2],
    "_invoke_remote_builtin": lambda args, kwargs: (args[3:], kwargs),
    "_invoke_remote_torchscript": lambda args, kwargs: (args[4:], kwargs),
    "_invoke_remote_python_udf": lambda args, kwargs: args[2],
}


def install(counter: TrafficCounter) -> None:
    """Count RPC traffic into ``counter``, where this torch build has RPC at all."""
    if not rpc.is_available():
        return
    from torch._C._distributed_rpc import PyRRef
    from torch.distributed.rpc import api

    for name, payload in ENTRY_PAYLOADS.items():
        setattr(api, name, _counted_entry(getattr(api, name), payload, counter))
    PyRRef.to_here = _counted_to_here(PyRRef.to_here, counter)  # type: ignore[method-assign]  # deliberate patch


def _counted_entry(original: Callable[..., Any], payload: Payload, counter: TrafficCounter) -> Callable[..., Any]:
    """Count the arguments sent; for RPCs (which return a future) also the result received."""

    @functools.wraps(original)
    def counted(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        counter.add("rpc", unique_tensor_bytes(payload(args, kwargs)))
        if isinstance(result, torch._C.Future):
            result.add_done_callback(functools.partial(_count_result, counter))
        return result

    return counted


def _count_result(counter: TrafficCounter, future: torch._C.Future) -> None:
    """Count a completed RPC's value; a failed RPC received no tensors."""
    try:
        value = future.value()
    except Exception:  # noqa: BLE001 - the caller sees this error from its own wait(); nothing arrived to count
        return
    counter.add("rpc", unique_tensor_bytes(value))


def _counted_to_here(original: Callable[..., Any], counter: TrafficCounter) -> Callable[..., Any]:
    """Count a value fetched from its owner; on the owner ``to_here`` moves nothing."""

    @functools.wraps(original)
    def to_here(self: Any, *args: Any, **kwargs: Any) -> Any:
        value = original(self, *args, **kwargs)
        if not self.is_owner():
            counter.add("rpc", unique_tensor_bytes(value))
        return value

    return to_here
