"""How many bytes a payload handed to torch.distributed holds: the sum over its tensors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


def iter_tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in ``value``, looking through lists, tuples and dict values."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from iter_tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from iter_tensors(item)


def tensor_bytes(value: Any) -> int:
    """Bytes of every tensor in ``value`` (numel times element size), repeats included."""
    return sum(tensor.numel() * tensor.element_size() for tensor in iter_tensors(value))


def unique_tensor_bytes(value: Any) -> int:
    """Bytes of the distinct tensors in ``value``: a pickler sends a repeated tensor once."""
    unique = {id(tensor): tensor for tensor in iter_tensors(value)}
    return sum(tensor.numel() * tensor.element_size() for tensor in unique.values())
