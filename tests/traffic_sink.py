"""A UDP socket standing in for an agent's traffic sink in tests that run ranks without a cluster."""

from __future__ import annotations

import socket
import threading

from gpudeck.protocol.traffic import TrafficReport, decode_report


class Sink:
    """A UDP socket standing in for the agent's traffic sink; keeps every decoded datagram."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.settimeout(0.1)
        self.reports: list[TrafficReport] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return "127.0.0.1:%d" % self.socket.getsockname()[1]

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                self.reports.append(decode_report(self.socket.recv(65536)))
            except TimeoutError:
                continue
        self.socket.setblocking(False)
        try:
            while True:
                self.reports.append(decode_report(self.socket.recv(65536)))
        except BlockingIOError:
            return

    def stop(self) -> None:
        """Stop receiving once the datagrams already queued are read; later calls do nothing."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        self.socket.close()

    def close(self) -> dict[int, dict[str, int]]:
        """Stop; the final totals of each rank, checked to have only grown from datagram to datagram."""
        self.stop()
        totals: dict[int, dict[str, int]] = {}
        for report in self.reports:
            previous = totals.get(report.rank, {})
            assert all(report.bytes.get(kind, 0) >= n for kind, n in previous.items()), "totals went down"
            totals[report.rank] = dict(report.bytes)
        return totals
