"""The node's traffic sink: a loopback UDP socket where the job ranks on this node report their bytes.

Ranks send cumulative totals, so the sink keeps the largest figure seen per counter; a lost or
reordered datagram loses a sample, never bytes. A malformed datagram is counted and dropped.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Mapping
from pathlib import Path

from gpudeck.protocol.traffic import decode_report

log = logging.getLogger(__name__)
ByRank = dict[int, dict[str, int]]


class TrafficSink:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((host, port))
        self._sock.setblocking(False)
        self._totals: dict[tuple[int, int], ByRank] = {}
        self._sync: dict[tuple[int, int], ByRank] = {}  # collective progress, rank -> SYNC_KEYS -> count
        self.dropped = 0

    @classmethod
    def reusing(cls, port_file: Path) -> "TrafficSink":
        """A sink on the port the last agent of this node used, when it is free: ranks that outlive
        an agent restart keep sending to the address they were given at launch."""
        try:
            sink = cls(port=int(port_file.read_text()))
        except (OSError, ValueError):
            sink = cls()
        port_file.write_text(str(sink.address.rpartition(":")[2]))
        return sink

    @property
    def address(self) -> str:
        host, port = self._sock.getsockname()
        return f"{host}:{port}"

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_reader(self._sock.fileno(), self.drain)

    def drain(self) -> None:
        """Take every datagram waiting now; called by the loop and before a job's final report."""
        while True:
            try:
                data = self._sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            try:
                report = decode_report(data)
            except ValueError as exc:
                self.dropped += 1
                log.debug("dropped a traffic datagram: %s", exc)
                continue
            ranks = self._totals.get((report.job, report.attempt))
            if ranks is not None:
                _raise(ranks.setdefault(report.rank, {}), report.bytes)
                if report.sync:
                    _raise(self._sync.setdefault((report.job, report.attempt), {}).setdefault(report.rank, {}),
                           report.sync)

    def expect(self, job: int, attempt: int) -> None:
        """Accept reports for a job attempt running on this node; others are ignored."""
        self._totals.setdefault((job, attempt), {})

    def merge(self, job: int, attempt: int, totals: ByRank) -> None:
        """Take final totals the ranks left in their end files; counters only ever grow."""
        ranks = self._totals.setdefault((job, attempt), {})
        for rank, kinds in totals.items():
            _raise(ranks.setdefault(rank, {}), kinds)

    def totals(self, job: int, attempt: int) -> ByRank:
        return {rank: dict(kinds) for rank, kinds in self._totals.get((job, attempt), {}).items()}

    def sync(self, job: int, attempt: int) -> ByRank:
        return {rank: dict(counts) for rank, counts in self._sync.get((job, attempt), {}).items()}

    def forget(self, job: int, attempt: int) -> None:
        self._totals.pop((job, attempt), None)
        self._sync.pop((job, attempt), None)

    def close(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if loop is not None:
            loop.remove_reader(self._sock.fileno())
        self._sock.close()


def _raise(counters: dict[str, int], kinds: Mapping[str, int]) -> None:
    """Cumulative counters only grow: keep the larger of what is held and what is reported."""
    for kind, count in kinds.items():
        counters[kind] = max(counters.get(kind, 0), count)
