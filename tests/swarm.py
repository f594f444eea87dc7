"""Many agents in one process, for scale tests and `bench/coordinator_scale.py`.

Each agent is its own TLS connection that proves the join token and speaks the agent's protocol
(register, telemetry every second with readings of the simulated GPU backend, job started and
exited), so the coordinator cannot tell them from `gpudeck agent` processes. What they do not do is
run ranks: a launch is answered at once with "started", and the ranks "run" until killed, or for
`--run-for` seconds when given. One process instead of 64 is what fits on a 2-core machine.

    python -m tests.swarm --coordinator 127.0.0.1:7070 --token TOKEN --agents 16 --gpus 8

`--watcher stuck` instead opens one watching client with a tiny receive buffer that stops reading
after its snapshot: a dashboard on a laptop whose lid was closed; `--watcher reading` one that
reads on and prints how many bytes of updates it has received.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket

from gpudeck.agent.gpus import SimulatedBackend
from gpudeck.protocol.auth import JoinToken
from gpudeck.protocol import auth
from gpudeck.protocol.framing import HEADER, decode_body, encode_frame
from gpudeck.protocol.messages import PROTOCOL_VERSION, Hello, Watch
from gpudeck.protocol.node_messages import JobExited, JobStarted, Kill, Launch, Register, Telemetry
from gpudeck.protocol.payloads import GpuReading
from gpudeck.config import split_address
from gpudeck.protocol.session import Connection, open_session

TELEMETRY_INTERVAL = 1.0


class SwarmAgent:
    """One agent's connection; its jobs end only when killed, or after `run_for` seconds."""

    def __init__(self, name: str, gpus: int, run_for: float | None, busy: bool) -> None:
        self.name = name
        self.backend = SimulatedBackend(gpus, seed=hash(name) & 0xFFFF)
        self.run_for = run_for
        if busy:
            for index in range(gpus):
                self.backend.assign(index, [os.getpid()])
        self.running: dict[tuple[int, int], tuple[asyncio.Task[None] | None, list[int]]] = {}

    async def run(self, host: str, port: int, token: JoinToken, handshakes: asyncio.Semaphore) -> None:
        async with handshakes:
            conn, _ = await open_session(host, port, token, "agent", self.name)
        await conn.send(Register(hostname=socket.gethostname(), address="127.0.0.1", simulated=True,
                                 gpus=self._gpus(), jobs=[]))
        beat = asyncio.create_task(self._telemetry(conn))
        try:
            while (message := await conn.recv()) is not None:
                if isinstance(message, Launch):
                    await self._launch(conn, message)
                elif isinstance(message, Kill):
                    await self._end(conn, (message.job, message.attempt), -15, "killed")
        finally:
            beat.cancel()

    def _gpus(self) -> list[GpuReading]:
        return self.backend.read()  # processes are this swarm's own: not foreign

    async def _telemetry(self, conn: Connection) -> None:
        while True:
            await conn.send(Telemetry(gpus=self._gpus()))
            await asyncio.sleep(TELEMETRY_INTERVAL)

    async def _launch(self, conn: Connection, order: Launch) -> None:
        key = (order.job, order.attempt)
        if key in self.running:
            return
        timer = asyncio.create_task(self._finish_later(conn, key)) if self.run_for is not None else None
        self.running[key] = (timer, order.gpus)
        for index in order.gpus:
            self.backend.assign(index, [os.getpid()])
        await conn.send(JobStarted(job=order.job, attempt=order.attempt, pid=os.getpid()))

    async def _finish_later(self, conn: Connection, key: tuple[int, int]) -> None:
        await asyncio.sleep((self.run_for or 0.0) * random.uniform(0.5, 1.5))  # jobs end spread out
        await self._end(conn, key, 0, "")

    async def _end(self, conn: Connection, key: tuple[int, int], code: int, detail: str) -> None:
        if key not in self.running:
            return
        timer, gpus = self.running.pop(key)
        if timer is not None and timer is not asyncio.current_task():
            timer.cancel()
        for index in gpus:
            self.backend.assign(index, [])
        await conn.send(JobExited(job=key[0], attempt=key[1], exit_code=code, detail=detail, retry=False,
                                  failed_at=None))


async def run_swarm(address: str, token: str, agents: int, gpus: int, prefix: str, run_for: float | None,
                    busy: bool) -> None:
    host, port = split_address(address)
    join = JoinToken.parse(token)
    swarm = [SwarmAgent(f"{prefix}{index:02d}", gpus, run_for, busy) for index in range(agents)]
    # From one address, at most 16 connections may wait to prove the token (the admission gate):
    # agents join a few at a time, as agents on many machines would.
    handshakes = asyncio.Semaphore(4)
    await asyncio.gather(*(agent.run(host, port, join, handshakes) for agent in swarm))


def watcher(address: str, token: str, keep_reading: bool) -> None:
    """Watch and read the snapshot, printing "watching"; then never read again (a dashboard on a
    laptop whose lid was closed), or read on and print the bytes of updates received so far."""
    host, port = split_address(address)
    join = JoinToken.parse(token)
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: it sets the window
    raw.connect((host, port))
    tls = auth.client_context().wrap_socket(raw, server_hostname=None)
    auth.check_pin(tls, join)
    tls.sendall(encode_frame(Hello(secret=join.secret, role="client", name="watcher",
                                   version=PROTOCOL_VERSION).to_wire()))
    _read_frame(tls)  # the welcome
    tls.sendall(encode_frame(Watch(req=1).to_wire()))
    while decode_body(_read_frame(tls)).get("kind") != "reply":
        pass
    print("watching", flush=True)
    if not keep_reading:
        signal.pause()
    received = 0
    while True:
        received += len(_read_frame(tls))
        print(f"updates {received}", flush=True)


def _read_frame(tls: socket.socket) -> bytes:
    (length,) = HEADER.unpack(_read_exactly(tls, HEADER.size))
    return _read_exactly(tls, length)


def _read_exactly(tls: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = tls.recv(count - len(data))
        if not chunk:
            raise ConnectionError("the coordinator closed the connection")
        data += chunk
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coordinator", required=True, help="HOST:PORT")
    parser.add_argument("--token", required=True)
    parser.add_argument("--agents", type=int, default=16)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--prefix", default="swarm-")
    parser.add_argument("--run-for", type=float, default=None,
                        help="seconds a launched job runs on average, spread over half to one and a half times that "
                        "(default: until killed)")
    parser.add_argument("--busy", action="store_true",
                        help="GPUs report load from the start, so every reading changes every second")
    parser.add_argument("--watcher", choices=("stuck", "reading"),
                        help="instead of agents, one watcher that stops reading after its snapshot, or reads on")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    if args.watcher:
        watcher(args.coordinator, args.token, keep_reading=args.watcher == "reading")
        return
    asyncio.run(run_swarm(args.coordinator, args.token, args.agents, args.gpus, args.prefix, args.run_for, args.busy))


if __name__ == "__main__":
    main()
