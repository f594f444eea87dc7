"""Route every DDP model's gradient all-reduce through Python so that it is counted.

Without a communication hook, DDP's Reducer all-reduces gradient buckets in C++ and nothing in
Python sees it. So every Reducer gets, as soon as DDP builds it, one hook of ours: a trampoline
that runs whatever hook sits in its :class:`HookSlot`. The slot starts with torch's
``allreduce_hook`` (the same averaging the built-in path does), which calls ``dist.all_reduce`` and
is therefore counted by the ``ProcessGroup`` wrappers in :mod:`gpudeck.train.counting`; nothing is
counted here, so nothing is counted twice.

DDP accepts one hook per model, and user scripts (and DDP itself, for mixed precision or fused
optimizers) register theirs after construction. ``torch.distributed._register_comm_hook`` is
therefore replaced: for a Reducer that has a slot it puts the caller's hook into the slot instead,
after DDP's own checks and logging ran as usual, and a second registration raises as torch would.
The user's hook thus runs unchanged, and whatever it sends through ``torch.distributed`` is counted.
``_register_builtin_comm_hook`` (C++ hooks) puts in the equivalent Python hook from torch's
``default_hooks``, so those models are counted too.

DDP's broadcast of parameters at construction (and of buffers before each forward) is not an
all-reduce and never passes through the hook: :mod:`gpudeck.train.counting` counts it under
``broadcast``.

Known difference: under ``Join`` with uneven inputs the default path divides by the number of
ranks still active, while ``allreduce_hook`` divides by the group size, as any Python hook does.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

Hook = Callable[[Any, dist.GradBucket], torch.futures.Future]

BUILTIN_EQUIVALENTS: dict[dist.BuiltinCommHookType, Hook] = {
    dist.BuiltinCommHookType.ALLREDUCE: default_hooks.allreduce_hook,
    dist.BuiltinCommHookType.FP16_COMPRESS: default_hooks.fp16_compress_hook,
}

_SLOTS: weakref.WeakKeyDictionary[dist.Reducer, HookSlot] = weakref.WeakKeyDictionary()
GROUP = object()  # a slot state meaning "the model's process group at the time of the call"


class HookSlot:
    """The hook one Reducer runs: torch's default until the model's owner registers one.

    Torch's defaults get the model's current process group on every call, as the built-in path
    does, because ``DistributedDataParallel._update_process_group`` may swap it. The model is held
    weakly: the Reducer (C++) holds this slot, and a strong reference back would be a cycle the
    garbage collector cannot see.
    """

    __slots__ = ("model", "group", "state", "hook", "taken")

    def __init__(self, model: DistributedDataParallel) -> None:
        self.model = weakref.ref(model)
        self.group = model.process_group
        self.state: Any = GROUP
        self.hook: Hook = default_hooks.allreduce_hook
        self.taken = False

    def take(self, state: Any, hook: Hook) -> None:
        """Install the registered hook; a second registration fails like torch's own check."""
        if self.taken:
            raise RuntimeError("register_comm_hook or register_builtin_comm_hook can only be called once.")
        self.state, self.hook, self.taken = state, hook, True

    def current_state(self) -> Any:
        """The state to call the hook with."""
        if self.state is not GROUP:
            return self.state
        model = self.model()
        return self.group if model is None else model.process_group


def run_slot(slot: HookSlot, bucket: dist.GradBucket) -> torch.futures.Future:
    """The comm hook every Reducer actually holds."""
    return slot.hook(slot.current_state(), bucket)


def install() -> None:
    """Give every DDP Reducer built from now on a slot, and send later registrations into it."""
    register = dist._register_comm_hook
    register_builtin = dist._register_builtin_comm_hook
    init_helper = DistributedDataParallel._ddp_init_helper

    def init_helper_with_slot(self: DistributedDataParallel, *args: Any, **kwargs: Any) -> None:
        init_helper(self, *args, **kwargs)
        slot = HookSlot(self)
        register(self.reducer, slot, run_slot)
        _SLOTS[self.reducer] = slot

    def register_into_slot(reducer: dist.Reducer, state: Any, comm_hook: Hook) -> None:
        slot = _SLOTS.get(reducer)
        if slot is None:
            return register(reducer, state, comm_hook)
        return slot.take(state, comm_hook)

    def register_builtin_into_slot(reducer: dist.Reducer, comm_hook_type: dist.BuiltinCommHookType) -> None:
        slot = _SLOTS.get(reducer)
        if slot is None:
            return register_builtin(reducer, comm_hook_type)
        return slot.take(GROUP, BUILTIN_EQUIVALENTS[comm_hook_type])

    DistributedDataParallel._ddp_init_helper = init_helper_with_slot  # type: ignore[method-assign]  # deliberate patch
    dist._register_comm_hook = register_into_slot
    dist._register_builtin_comm_hook = register_builtin_into_slot
