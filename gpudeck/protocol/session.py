"""Connections: typed messages over framed TLS streams, the client's handshake, and request/reply.

One `Connection` per TCP stream. The client side (`open_session`) checks the certificate pin, then
sends `Hello` with the secret and waits for `Welcome`. `ClientSession` adds request ids on top, so
the CLI and the TUI can have several requests in flight on one connection.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import Any

from gpudeck.protocol import auth
from gpudeck.protocol.framing import MAX_FRAME, FrameError, encode_frame, read_frame
from gpudeck.protocol.messages import (
    PROTOCOL_VERSION,
    Error,
    Hello,
    Message,
    ProtocolError,
    Reply,
    Update,
    Welcome,
    decode,
)

HANDSHAKE_TIMEOUT = 10.0


class Refused(Exception):
    """The coordinator answered with an error; the text is its reason, for a person."""

    def __init__(self, message: str, code: str = "refused") -> None:
        super().__init__(message)
        self.code = code


class Connection:
    """Typed messages over one stream; writes are serialised so frames never interleave."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._write_lock = asyncio.Lock()

    @property
    def peer_host(self) -> str:
        peer = self.writer.get_extra_info("peername")
        return str(peer[0]) if peer else ""

    async def send(self, message: Message) -> None:
        frame = encode_frame(message.to_wire())
        async with self._write_lock:
            self.writer.write(frame)
            await self.writer.drain()

    async def recv(self, limit: int = MAX_FRAME) -> Message | None:
        """The next message, or None at end of stream; `FrameError`/`ProtocolError` on bad input."""
        body = await read_frame(self.reader, limit)
        return None if body is None else decode(body)

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2.0)
        except (OSError, asyncio.TimeoutError, ConnectionError):
            pass


def split_address(address: str, default_port: int | None = None) -> tuple[str, int]:
    """`HOST:PORT` (or `[v6]:PORT`) into its parts, with a sentence when it is not one."""
    host, sep, port = address.rpartition(":")
    if not sep and default_port is not None:
        return address, default_port
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not HOST:PORT (for example 192.168.1.10:7070)")
    return host, int(port)


async def open_session(host: str, port: int, token: auth.JoinToken, role: str, name: str,
                       timeout: float = HANDSHAKE_TIMEOUT) -> tuple[Connection, Welcome]:
    """Connect, check the pin, prove the secret. Raises `PinMismatch`, `Refused` or `OSError`."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=auth.client_context(), server_hostname=None), timeout
    )
    conn = Connection(reader, writer)
    try:
        auth.check_pin(writer.get_extra_info("ssl_object"), token)
        await conn.send(Hello(secret=token.secret, role=role, name=name, version=PROTOCOL_VERSION))
        answer = await asyncio.wait_for(conn.recv(), timeout)
    except BaseException:
        await conn.close()
        raise
    if isinstance(answer, Welcome):
        return conn, answer
    await conn.close()
    if isinstance(answer, Error):
        raise Refused(answer.message, answer.code)
    raise ConnectionError("the coordinator closed the connection during the handshake")


@dataclass
class ClientSession:
    """Request/reply for clients: each request carries an id; one reader task resolves the replies."""

    conn: Connection

    def __post_init__(self) -> None:
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        # Changes pushed after a `watch` request; whoever watches must keep reading them.
        self.updates: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        # Set when the coordinator's side ended (closed, refused, or sent garbage), with `failure` saying why.
        self.closed = asyncio.Event()
        self.failure: BaseException | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read_replies())

    async def request(self, kind: type[Message], timeout: float = 30.0, **fields: Any) -> Any:
        """Send one request and return the reply's data; raise `Refused` with the coordinator's reason."""
        req = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[req] = future
        try:
            await self.conn.send(kind(req=req, **fields))
            return await asyncio.wait_for(future, timeout)
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
