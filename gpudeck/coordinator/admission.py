"""What a peer without the secret may cost the coordinator: a bounded number of connections, each for
a few seconds, each with a small frame cap.

The TLS handshake is started by us after a connection is admitted (not by asyncio's server, which
would hold a 256 KiB read buffer per connection for up to a minute before our code ran): the server
accepts plain TCP into a `HeldConnection`, the gate counts it in, and `tls_streams` starts TLS. At most
`total` connections wait to prove the secret, at most `per_source` of them from one address; a newcomer
over a limit pushes out the oldest waiting connection of the address that holds the most, so a flood
from one address cannot lock others out, and a real client arriving in a flood still gets in.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import ssl
from collections import OrderedDict
from typing import Callable

log = logging.getLogger(__name__)
MAX_UNPROVEN = 64
MAX_UNPROVEN_PER_SOURCE = 16
PROOF_DEADLINE = 5.0  # TLS and Hello, from accept
HELLO_FRAME_LIMIT = 4096  # a Hello is well under 1 KiB; the full frame cap is for proven peers
_M_MMAP_THRESHOLD = -3


class HeldConnection(asyncio.Protocol):
    """A new TCP connection, read from by nobody until the coordinator starts TLS on it: bytes read
    before that (a ClientHello sent at once) would be lost to TLS, which is why asyncio's own
    `StreamWriter.start_tls` stalls about one handshake in two here."""

    def __init__(self, on_connect: Callable[[asyncio.Transport], None]) -> None:
        self._on_connect = on_connect
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        # Not paused here and now: the transport has already queued its reader behind this call, and
        # Python before 3.11.5 adds it even to a paused transport. Queued after it, the pause runs in
        # this same loop iteration, before any read, and before the task that starts TLS.
        asyncio.get_running_loop().call_soon(transport.pause_reading)
        self._on_connect(transport)

    def data_received(self, data: bytes) -> None:
        """Bytes read before TLS took over could only stall its handshake: end the connection now."""
        if self._transport is not None:
            self._transport.abort()


async def tls_streams(tcp: asyncio.Transport,
                      context: ssl.SSLContext) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Start TLS (server side) on a held connection and give it streams, as `start_server` would have."""
    if tcp.is_closing():
        # Pushed out before its turn: TLS on a closed transport would wait for its handshake
        # timeout, holding the buffer all along.
        raise ConnectionError("the connection was closed before TLS started")
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    protocol = asyncio.StreamReaderProtocol(reader)
    transport = await loop.start_tls(tcp, protocol, context, server_side=True, ssl_handshake_timeout=PROOF_DEADLINE)
    if transport is None:  # closed during the handshake (pushed out, or the peer left)
        raise ConnectionError("the connection closed during the TLS handshake")
    protocol.connection_made(transport)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


def source_of(tcp: asyncio.BaseTransport) -> str:
    peer = tcp.get_extra_info("peername")
    return str(peer[0]) if peer else ""


class AdmissionGate:
    """The connections that have not yet proven the secret, oldest first."""

    def __init__(self, total: int = MAX_UNPROVEN, per_source: int = MAX_UNPROVEN_PER_SOURCE) -> None:
        self.total = total
        self.per_source = per_source
        self._waiting: OrderedDict[asyncio.WriteTransport, str] = OrderedDict()
        self.pushed_out = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def admit(self, transport: asyncio.WriteTransport, source: str) -> None:
        """Count a new connection in, first pushing out one waiting connection if a limit is reached."""
        sources = list(self._waiting.values())
        if sources.count(source) >= self.per_source:
            self._push_out(source)
        elif len(sources) >= self.total:
            self._push_out(max(set(sources), key=sources.count))
        self._waiting[transport] = source

    def proven(self, transport: asyncio.WriteTransport) -> None:
        """The peer proved the secret (or left): it no longer counts."""
        self._waiting.pop(transport, None)

    def _push_out(self, source: str) -> None:
        oldest = next(t for t, s in self._waiting.items() if s == source)
        del self._waiting[oldest]
        self.pushed_out += 1
        if self.pushed_out in (1, 100) or self.pushed_out % 10_000 == 0:
            log.warning("too many connections have not proven the join token; closing the oldest "
                        "(%d closed so far, latest from %s)", self.pushed_out, source)
        oldest.abort()


def give_freed_buffers_back() -> None:
    """Make glibc return freed large buffers (TLS keeps 256 KiB per connection) to the system.

    glibc raises its mmap threshold each time such a buffer is freed, after which buffers of that size
    come from the heap, which fragments and never shrinks: the coordinator's memory then stays at the
    high-water mark of every connection flood it has seen. A fixed threshold keeps them mmapped, so a
    closed connection's buffer is unmapped at once. Elsewhere (musl, macOS) this does nothing."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    except OSError:
        pass
