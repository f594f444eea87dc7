"""Send this rank's cumulative traffic totals to the node agent over UDP.

One datagram a second from a daemon thread, plus a final one when the script ends, so the totals
the agent holds are exact at the end and a lost datagram loses only a sample. Sending never raises
into the job: a full socket buffer or an agent that is away only drops datagrams.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Mapping
from typing import Any

from gpudeck.protocol.traffic import TrafficReport, encode_report
from gpudeck.train.counter import TrafficCounter

INTERVAL_S = 1.0

Address = tuple[socket.AddressFamily, tuple[Any, ...]]


class UdpReporter:
    """A daemon thread that sends ``counter``'s totals, tagged with the job, attempt and rank."""

    def __init__(self, counter: TrafficCounter, job: int, attempt: int, rank: int, address: Address) -> None:
        family, self._address = address
        self._counter = counter
        self._job, self._attempt, self._rank = job, attempt, rank
        self._socket = socket.socket(family, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        self._lock = threading.Lock()
        self._closed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gpudeck-traffic", daemon=True)

    def start(self) -> None:
        """Start the once-a-second sends."""
        self._thread.start()

    def close(self) -> None:
        """Send the final totals and stop; later periodic sends are skipped."""
        self._stop.set()
        with self._lock:
            self._send_locked()
            self._closed = True
            self._socket.close()

    def _loop(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            with self._lock:
                if not self._closed:
                    self._send_locked()

    def _send_locked(self) -> None:
        """Snapshot and send under the lock, so datagrams leave in the order their totals grew."""
        report = TrafficReport(self._job, self._attempt, self._rank, self._counter.snapshot(), self._counter.sync())
        try:
            self._socket.sendto(encode_report(report), self._address)
        except OSError:
            pass  # a lost sample; the next datagram carries the totals again


def reporter_from_env(counter: TrafficCounter, env: Mapping[str, str] = os.environ) -> UdpReporter | None:
    """The reporter the agent asked for through the environment, or None.

    None when ``GPUDECK_TRAFFIC_ADDR`` is unset; when it is set but unusable, a warning on stderr
    and None, because counting must never stop a job from running.
    """
    target = env.get("GPUDECK_TRAFFIC_ADDR")
    if not target:
        return None
    try:
        job, attempt = int(env["GPUDECK_JOB_ID"]), int(env["GPUDECK_ATTEMPT"])
        return UdpReporter(counter, job, attempt, int(env.get("RANK", "0")), _resolve(target))
    except (KeyError, ValueError, OSError) as exc:
        print(f"gpudeck: traffic reporting disabled ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None


def _resolve(target: str) -> Address:
    """Turn ``HOST:PORT`` (``[v6]:PORT`` too) into a socket family and address."""
    host, sep, port = target.rpartition(":")
    if not sep or not host:
        raise ValueError(f"GPUDECK_TRAFFIC_ADDR must be HOST:PORT, got {target!r}")
    family, _, _, _, sockaddr = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_DGRAM)[0]
    return family, sockaddr
