"""Connections: typed messages over framed TLS streams, the client's handshake, and request/reply.

One `Connection` per TCP stream. The client side (`open_session`) checks the certificate pin, then
sends `Hello` with the secret and waits for `Welcome`. `ClientSession` adds request ids on top, so
the CLI and the TUI can have several requests in flight on one connection.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from gpudeck.protocol import auth
from gpudeck.protocol.framing import MAX_FRAME, FrameError, encode_frame, read_frame
from gpudeck.protocol.handshake import HANDSHAKE_TIMEOUT, Refused, hello, welcome_of
from gpudeck.protocol.messages import Error, Message, ProtocolError, Reply, Update, Welcome, decode

OUTBOX_LIMIT = 16 * 1024 * 1024  # four largest frames: more unsent than this and the peer is not reading
STALL_LIMIT = 20.0  # a peer whose socket takes no bytes for this long is cut off
CLOSE_FLUSH = 2.0
log = logging.getLogger(__name__)


class Connection:
    """Typed messages over one stream, written by one writer task from a bounded outbox.

    `post` never waits: it queues a frame and returns, so the coordinator's control loop cannot be
    held up by a peer that stops reading (a laptop lid closed, a process stopped with ctrl+z). A peer
    whose outbox passes OUTBOX_LIMIT bytes, or whose socket takes nothing for STALL_LIMIT seconds, is
    cut off; it reconnects and is brought up to date like any new peer.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._outbox: deque[bytes] = deque()
        self._queued = 0
        self._flushed = asyncio.Event()
        self._flushed.set()
        self._writing: asyncio.Task[None] | None = None
        self.cut_off: str | None = None  # why this side gave up on the peer, once it has

    @property
    def peer_host(self) -> str:
        peer = self.writer.get_extra_info("peername")
        return str(peer[0]) if peer else ""

    @property
    def queued_bytes(self) -> int:
        """Bytes posted and not yet handed to the socket (watchers coalesce while this is non-zero)."""
        return self._queued

    def post(self, message: Message) -> bool:
        """Queue a message for the writer task; False (and the peer cut off) when it cannot be."""
        if self.cut_off is not None or self.writer.is_closing():
            return False
        return self.post_frame(encode_frame(message.to_wire()))

    def post_frame(self, frame: bytes) -> bool:
        """`post` for a frame already encoded (one update encoded once for every watcher)."""
        if self.cut_off is not None or self.writer.is_closing():
            return False
        if self._queued + len(frame) > OUTBOX_LIMIT:
            self._cut_off(f"it left {self._queued + len(frame)} bytes unread (the limit is {OUTBOX_LIMIT})")
            return False
        self._outbox.append(frame)
        self._queued += len(frame)
        self._flushed.clear()
        if self._writing is None or self._writing.done():
            self._writing = asyncio.get_running_loop().create_task(self._write_out())
        return True

    async def send(self, message: Message) -> None:
        """Post and wait until the socket took it; for peers that can afford to wait (clients, agents)."""
        if not self.post(message):
            raise ConnectionError(f"the connection is closed ({self.cut_off or 'by the peer'})")
        await self.flushed()
        if self.cut_off is not None:
            raise ConnectionError(f"the connection is closed ({self.cut_off})")

    async def flushed(self) -> None:
        """Wait until everything posted so far is in the socket, or the peer was cut off."""
        await self._flushed.wait()

    async def _write_out(self) -> None:
        try:
            while self._outbox and self.cut_off is None:
                frame = self._outbox[0]
                self.writer.write(frame)
                try:
                    await asyncio.wait_for(self.writer.drain(), STALL_LIMIT)
                except asyncio.TimeoutError:
                    self._cut_off(f"it took nothing for {STALL_LIMIT:.0f} s")
                except (OSError, ConnectionError, RuntimeError) as exc:
                    self._cut_off(f"writing failed: {exc}")
                else:
                    self._outbox.popleft()
                    self._queued -= len(frame)
        finally:
            if self.cut_off is not None:
                self._outbox.clear()
                self._queued = 0
            self._flushed.set()

    def _cut_off(self, why: str) -> None:
        if self.cut_off is None:
            self.cut_off = why
            log.info("gave up on the peer at %s: %s", self.peer_host or "?", why)
            self.writer.transport.abort()
        self._flushed.set()

    async def recv(self, limit: int = MAX_FRAME) -> Message | None:
        """The next message, or None at end of stream; `FrameError`/`ProtocolError` on bad input."""
        body = await read_frame(self.reader, limit)
        return None if body is None else decode(body)

    async def close(self) -> None:
        """Send what is queued (for at most CLOSE_FLUSH seconds), then close."""
        try:
            await asyncio.wait_for(self.flushed(), CLOSE_FLUSH)
        except asyncio.TimeoutError:
            pass
        if self._writing is not None and not self._writing.done():
            self._writing.cancel()
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), CLOSE_FLUSH)
        except (OSError, asyncio.TimeoutError, ConnectionError):
            pass


async def open_session(host: str, port: int, token: auth.JoinToken, role: str, name: str,
                       timeout: float = HANDSHAKE_TIMEOUT) -> tuple[Connection, Welcome]:
    """Connect, check the pin, prove the secret. Raises `PinMismatch`, `Refused` or `OSError`."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=auth.client_context(), server_hostname=None), timeout
    )
    conn = Connection(reader, writer)
    try:
        auth.check_pin(writer.get_extra_info("ssl_object"), token)
        await conn.send(hello(token, role, name))
        return conn, welcome_of(await asyncio.wait_for(conn.recv(), timeout))
    except BaseException:
        await conn.close()
        raise


@dataclass
class ClientSession:
    """Request/reply for clients: each request carries an id; one reader task resolves the replies."""

    conn: Connection
    welcome: Welcome | None = None  # the coordinator's handshake answer, with its limits

    def __post_init__(self) -> None:
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        # Changes pushed after a `watch` request; whoever watches must keep reading them.
        self.updates: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        # Set when the coordinator's side ended (closed, refused, or sent garbage), with `failure` saying why.
        self.closed = asyncio.Event()
        self.failure: BaseException | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read_replies())

    async def request(self, kind: Callable[..., Message], timeout: float = 30.0, **fields: Any) -> Any:
        """Send one request and return the reply's data; raise `Refused` with the coordinator's reason,
        also the reason it gave when it ended the session between two requests."""
        if self.failure is not None:
            raise self.failure
        req = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[req] = future
        try:
            await self.conn.send(kind(req=req, **fields))
            return await asyncio.wait_for(future, timeout)
        except ConnectionError as exc:
            try:  # the reader has the coordinator's last word, if it sent one
                await asyncio.wait_for(self.closed.wait(), CLOSE_FLUSH)
            except asyncio.TimeoutError:
                raise exc from None
            assert self.failure is not None  # the reader sets it before it sets `closed`
            raise self.failure from None
        finally:
            self._waiting.pop(req, None)

    async def _read_replies(self) -> None:
        failure: BaseException = ConnectionError("the coordinator closed the connection")
        try:
            while (message := await self.conn.recv()) is not None:
                self._resolve(message)
                if isinstance(message, Error) and message.req is None:
                    failure = Refused(message.message, message.code)
                    break
        except (FrameError, ProtocolError, OSError) as exc:
            failure = ConnectionError(f"lost the coordinator: {exc}")
        self.failure = failure
        self.closed.set()
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(failure)

    def _resolve(self, message: Message) -> None:
        if isinstance(message, Update):
            self.updates.put_nowait(message.data)
            return
        req = getattr(message, "req", None)
        future = self._waiting.get(req) if req is not None else None
        if future is None or future.done():
            return
        if isinstance(message, Reply):
            future.set_result(message.data)
        elif isinstance(message, Error):
            future.set_exception(Refused(message.message, message.code))

    async def close(self) -> None:
        self._reader.cancel()
        await self.conn.close()
