"""A blocking client session, for a command that sends a few requests and exits (`gpudeck submit`).

Such a process needs no event loop, and asyncio's import and loop were a sixth of a submit's start,
the part of a shell loop of submits that was the CLI's own (issue 25). It speaks what
`session.ClientSession` speaks: the same frames, pin check, handshake and replies. The dashboard and
the commands that follow a stream or watch keep that one.
"""

from __future__ import annotations

import itertools
import socket
import ssl
import time
from collections import deque
from typing import Any

from gpudeck.protocol import auth
from gpudeck.protocol.framing import FrameDecoder, FrameError, encode_frame
from gpudeck.protocol.handshake import HANDSHAKE_TIMEOUT, Refused, hello, welcome_of
from gpudeck.protocol.messages import Error, Message, ProtocolError, Reply, Welcome, decode

READ_SIZE = 256 * 1024


class BlockingSession:
    """Request/reply on one TLS socket. Requests carry ids as in `ClientSession`, so several may be
    sent before the first is answered (`send`, then `reply` for each id, in any order)."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self._sock = sock
        self._decoder = FrameDecoder()
        self._received: deque[Message] = deque()
        self._answers: dict[int, Reply | Error] = {}
        self._ids = itertools.count(1)
        self.welcome: Welcome | None = None

    @classmethod
    def open(cls, host: str, port: int, token: auth.JoinToken, name: str,
             timeout: float = HANDSHAKE_TIMEOUT) -> BlockingSession:
        """Connect, check the pin, prove the secret. Raises `PinMismatch`, `Refused` or `OSError`."""
        raw = socket.create_connection((host, port), timeout)
        try:
            session = cls(auth.client_context().wrap_socket(raw, server_hostname=None))
        except BaseException:
            raw.close()
            raise
        try:
            auth.check_pin(session._sock, token)
            session._sock.sendall(encode_frame(hello(token, "client", name).to_wire()))
            session.welcome = welcome_of(session._next(time.monotonic() + timeout))
        except BaseException:
            session.close()
            raise
        return session

    def request(self, kind: type[Message], timeout: float = 30.0, **fields: Any) -> Any:
        """Send one request and return the reply's data; `Refused` with the coordinator's reason."""
        return self.reply(self.send(kind, **fields), timeout)

    def send(self, kind: type[Message], **fields: Any) -> int:
        """Send a request without waiting for its answer; its id, for `reply`."""
        req = next(self._ids)
        self._sock.sendall(encode_frame(kind(req=req, **fields).to_wire()))  # type: ignore[call-arg]
        return req

    def reply(self, req: int, timeout: float = 30.0) -> Any:
        """The data of request `req`'s reply, reading (and keeping) the answers that come before it."""
        deadline = time.monotonic() + timeout
        while req not in self._answers:
            message = self._next(deadline)
            if isinstance(message, Error) and message.req is None:
                raise Refused(message.message, message.code)
            if isinstance(message, (Reply, Error)) and message.req is not None:
                self._answers[message.req] = message
            elif message is None:
                raise ConnectionError("the coordinator closed the connection")
        answer = self._answers.pop(req)
        if isinstance(answer, Error):
            raise Refused(answer.message, answer.code)
        return answer.data

    def _next(self, deadline: float) -> Message | None:
        """The next message, None at the end of the stream; `TimeoutError` once `deadline` passes."""
        while not self._received:
            self._sock.settimeout(max(deadline - time.monotonic(), 0.001))
            data = self._sock.recv(READ_SIZE)
            if not data:
                return None
            try:
                self._received.extend(decode(body) for body in self._decoder.feed(data))
            except (FrameError, ProtocolError) as exc:
                raise ConnectionError(f"lost the coordinator: {exc}") from None
        return self._received.popleft()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> BlockingSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
