"""Downloads of the outputs a node keeps, relayed: a client asks the coordinator for a chunk, the
coordinator asks the node's agent, and the agent's answer goes back as the reply to the client.

Each client has at most IN_FLIGHT chunks outstanding (the CLI asks one file, one chunk at a time, a
few ahead), so a client costs a bounded number of tickets; a node that leaves fails its tickets at once.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

from gpudeck.protocol.messages import Error, Reply
from gpudeck.protocol.node_messages import OutputChunk, SendOutput
from gpudeck.protocol.session import Connection

IN_FLIGHT = 8

Send = Callable[[str, SendOutput], bool]


@dataclass(frozen=True)
class _Ticket:
    client: Connection
    req: int
    node: str


class OutputRelay:
    def __init__(self, send: Send) -> None:
        self.send = send
        self._tickets: dict[int, _Ticket] = {}
        self._numbers = itertools.count(1)

    def ask(self, client: Connection, req: int, node: str, job: int, attempt: int, path: str, offset: int) -> None:
        """Ask `node` for a chunk; refuse at once when the client has too many asked or the node is away."""
        if sum(1 for t in self._tickets.values() if t.client is client) >= IN_FLIGHT:
            client.post(Error(message=f"at most {IN_FLIGHT} output chunks may be asked for at once", code="refused",
                              req=req))
            return
        ticket = next(self._numbers)
        self._tickets[ticket] = _Ticket(client, req, node)
        if not self.send(node, SendOutput(ticket=ticket, job=job, attempt=attempt, path=path, offset=offset)):
            del self._tickets[ticket]
            client.post(Error(message=f"{node} is not connected: its outputs can be fetched once it is back",
                              code="refused", req=req))

    def answered(self, node: str, chunk: OutputChunk) -> None:
        ticket = self._tickets.get(chunk.ticket)
        if ticket is None or ticket.node != node:
            return  # a client that left, or a node answering for another: nothing to relay
        del self._tickets[chunk.ticket]
        if chunk.error:
            ticket.client.post(Error(message=chunk.error, code="refused", req=ticket.req))
        else:
            ticket.client.post(Reply(req=ticket.req, data={"data": chunk.data, "size": chunk.size}))

    def node_left(self, node: str) -> None:
        for number, ticket in list(self._tickets.items()):
            if ticket.node == node:
                del self._tickets[number]
                ticket.client.post(Error(message=f"{node} disconnected during the download; try again",
                                         code="refused", req=ticket.req))

    def client_left(self, client: Connection) -> None:
        for number in [n for n, t in self._tickets.items() if t.client is client]:
            del self._tickets[number]
