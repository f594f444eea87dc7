"""Peers without the join token, as an attacker would open them: idle TCP connections, connect and
close, TLS followed by a huge announced frame, and a slowloris that trickles its TLS hello. Shared by
the hostile-peer tests and `bench/unauthenticated_load.py`; every connection goes to loopback only."""

from __future__ import annotations

import socket
import ssl
import struct
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise LookupError(f"process {pid} has no VmRSS")


def _connect(port: int) -> socket.socket | None:
    try:
        return socket.create_connection((LOOPBACK, port), timeout=10)
    except OSError:
        return None


def open_idle(port: int, count: int) -> list[socket.socket]:
    """`count` TCP connections that never send a byte."""
    return [s for s in (_connect(port) for _ in range(count)) if s is not None]


def connect_and_close(port: int, count: int) -> None:
    for _ in range(count):
        sock = _connect(port)
        if sock is not None:
            sock.close()


def _tls() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def announce_big_frames(port: int, count: int, length: int = 4 * 1024 * 1024,
                        body: int = 64 * 1024) -> list[socket.socket]:
    """TLS connections that each announce a `length`-byte frame before any secret and send part of it."""
    held: list[socket.socket] = []
    for _ in range(count):
        sock = _connect(port)
        if sock is None:
            continue
        try:
            tls = _tls().wrap_socket(sock)
            tls.sendall(struct.pack(">I", length) + b"\0" * body)
            held.append(tls)
        except OSError:
            sock.close()
    return held


def answer_to_big_frame(port: int) -> bytes:
    """What the coordinator says to a peer that announces a 4 MiB frame before the secret."""
    with _tls().wrap_socket(socket.create_connection((LOOPBACK, port), timeout=10)) as tls:
        tls.sendall(struct.pack(">I", 4 * 1024 * 1024))
        return read_until_closed(tls)


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def slowloris(port: int, count: int) -> list[socket.socket]:
    """Connections that start a TLS hello and then send one byte at a time (see `trickle`)."""
    held = []
    for sock in open_idle(port, count):
        try:
            sock.sendall(b"\x16\x03\x01")  # the start of a TLS record carrying a ClientHello
            held.append(sock)
        except OSError:
            sock.close()
    return held


def trickle(socks: list[socket.socket]) -> int:
    """One more byte on each connection; returns how many the coordinator still keeps open."""
    open_ = 0
    for sock in socks:
        try:
            sock.sendall(b"\x00")
            open_ += 1
        except OSError:
            continue
    return open_


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the other side has closed this connection (without waiting for it to)."""
    sock.setblocking(False)
    try:
        return sock.recv(65536) == b""
    except (BlockingIOError, ssl.SSLWantReadError):
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def wait_closed_by_peer(socks: list[socket.socket], timeout: float) -> bool:
    """Whether the coordinator closed every one of these within `timeout` (it must, by its deadline)."""
    deadline = time.monotonic() + timeout
    pending = list(socks)
    while pending and time.monotonic() < deadline:
        pending = [s for s in pending if not closed_by_peer(s)]
        if pending:
            time.sleep(0.2)
    return not pending
