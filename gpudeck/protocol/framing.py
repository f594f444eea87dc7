"""Length-prefixed msgpack frames: a 4-byte big-endian length, then one msgpack map.

The length is checked against a cap before any of the body is read, and the unpacker has a limit on
every container and string, so a hostile peer can make us read at most one capped frame and allocate
nothing larger. Everything that goes wrong with a frame becomes a `FrameError`, which the session
answers with an error frame before it closes that one connection.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

import msgpack

if TYPE_CHECKING:
    import asyncio

HEADER = struct.Struct(">I")
MAX_FRAME = 4 * 1024 * 1024
_LIMITS = {
    "max_str_len": MAX_FRAME,
    "max_bin_len": MAX_FRAME,
    "max_array_len": 100_000,
    "max_map_len": 100_000,
    "max_ext_len": 0,
}
MAX_DEPTH = 32


class FrameError(Exception):
    """A frame that cannot be accepted; the message is safe to send back to the peer."""


def encode_frame(body: dict[str, Any]) -> bytes:
    """Pack one map into a frame, refusing to build one the receiving side would reject."""
    payload = msgpack.packb(body, use_bin_type=True)
    if len(payload) > MAX_FRAME:
        raise FrameError(f"frame of {len(payload)} bytes is over the {MAX_FRAME}-byte limit")
    return HEADER.pack(len(payload)) + payload


def check_length(length: int, limit: int = MAX_FRAME) -> None:
    """Reject a declared body length before anything of the body is read."""
    if length == 0:
        raise FrameError("empty frame")
    if length > limit:
        raise FrameError(f"frame of {length} bytes is over the {limit}-byte limit")


def _depth(value: Any, level: int = 0) -> int:
    if level > MAX_DEPTH:
        return level
    if isinstance(value, dict):
        return max((max(_depth(k, level + 1), _depth(v, level + 1)) for k, v in value.items()), default=level + 1)
    if isinstance(value, (list, tuple)):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


def decode_body(payload: bytes) -> dict[str, Any]:
    """Unpack one frame body into a map with string keys, or raise `FrameError`."""
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True, **_LIMITS)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, RecursionError) as exc:
        raise FrameError(f"malformed frame: {exc.__class__.__name__}") from None
    if not isinstance(body, dict):
        raise FrameError(f"a frame must hold a map, not {type(body).__name__}")
    if _depth(body) > MAX_DEPTH:
        raise FrameError(f"frame nested deeper than {MAX_DEPTH} levels")
    return body


class FrameDecoder:
    """Turns bytes, fed in any pieces, into frame bodies; for sockets read by chunks and for tests."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add bytes; return every body now complete. Raises `FrameError` on the first bad frame."""
        self._buffer += data
        bodies: list[dict[str, Any]] = []
        while len(self._buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buffer)
            check_length(length)
            end = HEADER.size + length
            if len(self._buffer) < end:
                break
            payload = bytes(self._buffer[HEADER.size:end])
            del self._buffer[:end]
            bodies.append(decode_body(payload))
        return bodies


async def read_frame(reader: asyncio.StreamReader, limit: int = MAX_FRAME) -> dict[str, Any] | None:
    """Read one frame body of at most `limit` bytes; None at a clean end of stream between frames.
    A peer that has not proven the secret gets a small `limit`, so announcing a large frame costs us
    nothing. (asyncio is imported here, not above: the blocking client reads frames without it.)"""
    import asyncio

    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise FrameError("connection closed inside a frame header") from None
        return None
    (length,) = HEADER.unpack(header)
    check_length(length, limit)
    try:
        payload = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise FrameError("connection closed inside a frame body") from None
    return decode_body(payload)
