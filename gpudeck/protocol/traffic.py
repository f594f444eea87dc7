"""The traffic datagram: what a rank tells its node agent about the bytes it handed to torch.distributed.

One msgpack map per UDP datagram, carrying cumulative totals so that a lost datagram loses only a
sample: ``{"v": 2, "job": int, "attempt": int, "rank": int, "bytes": {kind: int}, "sync": {name: int}}``,
where ``sync`` is the rank's collective progress (SYNC_KEYS: collectives entered and completed,
microseconds waited in them and their span; empty before the first collective).

It lives in the shared kernel because both sides use it: the ranks (gpudeck.train) encode, the
agent's traffic sink decodes. It imports only msgpack and the standard library.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import msgpack

VERSION = 2
SYNC_KEYS = frozenset({"entered", "ops", "wait_us", "span_us"})
MAX_DATAGRAM = 8192
MAX_KINDS = 64
MAX_BYTES = 2**63 - 1
_KIND = re.compile(r"[a-z][a-z0-9_]{0,63}")
_KEYS = frozenset({"v", "job", "attempt", "rank", "bytes", "sync"})


@dataclass(frozen=True)
class TrafficReport:
    """Cumulative payload bytes one rank of one job attempt handed to torch.distributed, by kind."""

    job: int
    attempt: int
    rank: int
    bytes: Mapping[str, int] = field(default_factory=dict)
    sync: Mapping[str, int] = field(default_factory=dict)


def encode_report(report: TrafficReport) -> bytes:
    """Encode ``report`` as one datagram payload."""
    return msgpack.packb(
        {
            "v": VERSION,
            "job": report.job,
            "attempt": report.attempt,
            "rank": report.rank,
            "bytes": dict(report.bytes),
            "sync": dict(report.sync),
        }
    )


def decode_report(data: bytes) -> TrafficReport:
    """Decode and validate one datagram; anything malformed raises ValueError.

    The sink reads datagrams from any local process, so every field is checked: a bad datagram must
    become one dropped sample, never a crash or a row with nonsense in it.
    """
    if len(data) > MAX_DATAGRAM:
        raise ValueError(f"datagram of {len(data)} bytes exceeds {MAX_DATAGRAM}")
    try:
        body = msgpack.unpackb(
            data, raw=False, max_str_len=256, max_bin_len=0, max_array_len=0,
            max_map_len=MAX_KINDS, max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ValueError(f"not a msgpack datagram: {exc}") from exc
    if not isinstance(body, dict) or set(body) != _KEYS:
        raise ValueError(f"expected a map with keys {sorted(_KEYS)}")
    if type(body["v"]) is not int or body["v"] != VERSION:
        raise ValueError(f"unsupported version {body['v']!r}")
    return TrafficReport(
        job=_count(body["job"], "job"),
        attempt=_count(body["attempt"], "attempt"),
        rank=_count(body["rank"], "rank"),
        bytes=MappingProxyType(_kinds(body["bytes"])),
        sync=MappingProxyType(_sync(body["sync"])),
    )


def _count(value: Any, name: str) -> int:
    """Return ``value`` if it is a non-negative int that fits SQLite's INTEGER (bools are not ints here)."""
    if type(value) is not int or not 0 <= value <= MAX_BYTES:
        raise ValueError(f"{name} must be an integer in [0, 2**63), got {value!r}")
    return value


def _sync(value: Any) -> dict[str, int]:
    """Validate the progress map: all of SYNC_KEYS, or nothing, each a non-negative count."""
    if not isinstance(value, dict) or (value and set(value) != SYNC_KEYS):
        raise ValueError(f"sync must be a map with keys {sorted(SYNC_KEYS)}, or empty")
    for name, count in value.items():
        _count(count, f"sync[{name}]")
    return dict(value)


def _kinds(value: Any) -> dict[str, int]:
    """Validate the by-kind map: snake_case names to non-negative byte counts."""
    if not isinstance(value, dict):
        raise ValueError("bytes must be a map")
    for kind, count in value.items():
        if not isinstance(kind, str) or not _KIND.fullmatch(kind):
            raise ValueError(f"bad kind name {kind!r}")
        _count(count, f"bytes[{kind}]")
    return dict(value)
