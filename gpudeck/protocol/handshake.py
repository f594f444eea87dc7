"""The client's side of the handshake, and what a refusal is, for both client sessions: the asyncio one
(the dashboard, agents, commands that follow a stream) and the blocking one (one-shot commands), so
they say and understand the same things. Nothing here imports asyncio."""

from __future__ import annotations

from gpudeck.protocol import auth
from gpudeck.protocol.messages import PROTOCOL_VERSION, Error, Hello, Message, Welcome

HANDSHAKE_TIMEOUT = 10.0


class Refused(Exception):
    """The coordinator answered with an error; the text is its reason, for a person."""

    def __init__(self, message: str, code: str = "refused") -> None:
        super().__init__(message)
        self.code = code


def hello(token: auth.JoinToken, role: str, name: str) -> Hello:
    """The first frame, sent only once the certificate pin was checked."""
    return Hello(secret=token.secret, role=role, name=name, version=PROTOCOL_VERSION)


def welcome_of(answer: Message | None) -> Welcome:
    """The coordinator's answer to `hello`, or `Refused` with its reason, or `ConnectionError`."""
    if isinstance(answer, Welcome):
        return answer
    if isinstance(answer, Error):
        raise Refused(answer.message, answer.code)
    raise ConnectionError("the coordinator closed the connection during the handshake")
