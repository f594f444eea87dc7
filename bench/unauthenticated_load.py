"""What may a peer without the token cost the coordinator? Its memory and its answer time under floods.

One run starts a real coordinator and one agent (2 simulated GPUs) on loopback, then attacks the
coordinator from this process, in phases, with what `tests/hostile.py` opens: 1,000 idle TCP
connections, 1,500 connect-and-close, 100 TLS connections that announce a 4 MiB frame before any
secret and send 64 KiB of it, and a slowloris of 200 connections trickling a TLS hello. Meanwhile a
client with the token asks for the node list (TCP, TLS, Hello, `nodes`: what `gpudeck nodes` does,
without its interpreter start) every 0.2 s. The baseline is the same client's answer time, and the
coordinator's RSS, before any attack, in the same run. Goals: RSS within +50 MiB of the start after
every phase; every answer within 1 s.

    python bench/unauthenticated_load.py [--hold 6]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpudeck.config import Endpoint  # noqa: E402
from gpudeck.client import connect  # noqa: E402
from gpudeck.protocol.auth import JoinToken  # noqa: E402
from gpudeck.protocol.messages import ListNodes  # noqa: E402
from tests import hostile  # noqa: E402
from tests.cluster import Cluster  # noqa: E402  (the real processes on loopback, as in the tests)

RSS_GOAL_MIB = 50.0
LATENCY_GOAL_S = 1.0


class Prober(threading.Thread):
    """Asks for the node list every 0.2 s with the token, recording how long each answer took."""

    def __init__(self, port: int, token: str) -> None:
        super().__init__(daemon=True)
        self.endpoint = Endpoint("127.0.0.1", port, "bench")
        self.token = JoinToken.parse(token)
        self.samples: list[float] = []
        self.failures = 0
        self.running = True

    async def _once(self) -> None:
        async with connect([self.endpoint], self.token) as session:
            await session.request(ListNodes, timeout=10)

    def run(self) -> None:
        while self.running:
            start = time.monotonic()
            try:
                asyncio.run(self._once())
                self.samples.append(time.monotonic() - start)
            except Exception:  # noqa: BLE001 - a refused or failed probe is counted, not fatal
                self.failures += 1
            time.sleep(0.2)

    def take(self) -> tuple[list[float], int]:
        samples, failures = self.samples, self.failures
        self.samples, self.failures = [], 0
        return samples, failures


def phases(port: int, hold: float) -> list[tuple[str, Callable[[], None]]]:
    def held(opener: Callable[[], list]) -> Callable[[], None]:
        def run() -> None:
            socks = opener()
            time.sleep(hold)
            hostile.close_all(socks)
        return run

    def loris() -> None:
        socks = hostile.slowloris(port, 200)
        for _ in range(int(hold)):
            hostile.trickle(socks)
            time.sleep(1)
        hostile.close_all(socks)

    return [
        ("no attack (baseline)", lambda: time.sleep(hold)),
        ("1,000 idle connections", held(lambda: hostile.open_idle(port, 1000))),
        ("1,500 connect-and-close", lambda: hostile.connect_and_close(port, 1500)),
        ("100 unfinished 4 MiB frames", held(lambda: hostile.announce_big_frames(port, 100))),
        ("slowloris, 200 connections", loris),
        ("after, all closed", lambda: time.sleep(hold)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hold", type=float, default=6.0, help="seconds each held attack lasts (default: 6)")
    args = parser.parse_args()
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="gpudeck-bench-")))
    try:
        cluster.start_coordinator()
        cluster.start_agent("node-a")
        cluster.wait_nodes("up", 1)
        pid = cluster.procs["coordinator"].pid
        start_rss = hostile.rss_mib(pid)
        prober = Prober(cluster.port, cluster.token)
        prober.start()
        rows, base = [], None
        for name, attack in phases(cluster.port, args.hold):
            peak = start_rss
            done = threading.Event()

            def watch(done: threading.Event = done) -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, hostile.rss_mib(pid))
                    time.sleep(0.1)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            attack()
            done.set()
            watcher.join()
            samples, failures = prober.take()
            p50 = statistics.median(samples) if samples else float("nan")
            base = base or p50
            rows.append((name, peak - start_rss, hostile.rss_mib(pid) - start_rss, p50,
                         max(samples, default=float("nan")), p50 / base, failures))
        prober.running = False
        assert base is not None  # phases() is never empty
        print(f"coordinator RSS at the start: {start_rss:.0f} MiB; baseline answer p50 {base * 1000:.0f} ms")
        print(f"{'phase':<30} {'peak +MiB':>9} {'after +MiB':>10} {'p50 ms':>7} {'max ms':>7} {'p50/base':>8} "
              f"{'failed':>6}")
        for name, peak, after, p50, worst, ratio, failures in rows:
            print(f"{name:<30} {peak:>9.0f} {after:>10.0f} {p50 * 1000:>7.0f} {worst * 1000:>7.0f} {ratio:>8.2f} "
                  f"{failures:>6}")
        worst_growth = max(r[2] for r in rows)
        worst_answer = max(r[4] for r in rows)
        print(f"summary: RSS at most +{worst_growth:.0f} MiB after a phase (goal +{RSS_GOAL_MIB:.0f}); slowest answer "
              f"{worst_answer * 1000:.0f} ms (goal {LATENCY_GOAL_S * 1000:.0f}); "
              f"failed answers {sum(r[6] for r in rows)}")
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
