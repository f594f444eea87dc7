"""What does an idle agent cost its node? Memory and CPU of `gpudeck agent --simulate-gpus 8`.

One run starts a real coordinator and one agent with 8 simulated GPUs on loopback (as the tests do),
and side by side a baseline: a bare interpreter that imports the same libraries and does nothing,

    python -c "import asyncio, zeroconf, msgpack, cryptography; asyncio.run(asyncio.sleep(...))"

After a warm-up it samples, once a second over a measuring window, VmRSS from /proc/PID/status and the
CPU time utime+stime (all threads) from /proc/PID/stat. It reports the agent's RSS against the goal of
60 MB (MB here = MiB), its CPU extrapolated to seconds per hour and % of one core against the goal of
1 %, the agent/baseline RSS ratio, and the coordinator's numbers for information. With --repeats N
every process is started afresh N times and the table shows medians over the repeats.

    python bench/agent_footprint.py [--seconds 60] [--warmup 5] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.cluster import Cluster  # noqa: E402  (the real processes on loopback, as in the tests)

RSS_GOAL_MB = 60.0
CPU_GOAL_PERCENT = 1.0
MB = 1024 * 1024
TICK = os.sysconf("SC_CLK_TCK")
BASELINE_CODE = "import asyncio, zeroconf, msgpack, cryptography; asyncio.run(asyncio.sleep(86400))"


def status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of the process (fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


@dataclass
class Samples:
    pid: int
    rss_mb: list[float] = field(default_factory=list)
    anon_mb: list[float] = field(default_factory=list)
    cpu_start: float = 0.0
    cpu_end: float = 0.0
    threads: int = 0

    def sample(self) -> None:
        self.rss_mb.append(status_kb(self.pid, "VmRSS") / 1024)
        self.anon_mb.append(status_kb(self.pid, "RssAnon") / 1024)
        self.threads = status_kb(self.pid, "Threads")

    def cpu_percent(self, seconds: float) -> float:
        return 100 * (self.cpu_end - self.cpu_start) / seconds


def measure_once(seconds: float, warmup: float, gpus: int) -> tuple[dict[str, Samples], float]:
    """Start everything, warm up, sample for `seconds`; always stop every process started."""
    baseline: subprocess.Popen[bytes] | None = None
    with tempfile.TemporaryDirectory(prefix="gpudeck-bench-") as folder:
        cluster = Cluster(Path(folder))
        try:
            cluster.start_coordinator()
            cluster.start_agent("node-a", gpus=gpus)
            baseline = subprocess.Popen([sys.executable, "-c", BASELINE_CODE], env=cluster.env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            cluster.wait_nodes("up", 1)
            time.sleep(warmup)
            pids = {"agent": cluster.procs["node-a"].pid, "baseline": baseline.pid,
                    "coordinator": cluster.procs["coordinator"].pid}
            for name, proc in (("agent", cluster.procs["node-a"]), ("baseline", baseline),
                               ("coordinator", cluster.procs["coordinator"])):
                if proc.poll() is not None:
                    raise RuntimeError(f"the {name} exited early with code {proc.returncode}")
            samples = {name: Samples(pid) for name, pid in pids.items()}
            for s in samples.values():
                s.cpu_start = cpu_seconds(s.pid)
            started = time.monotonic()
            deadline = started + seconds
            while (now := time.monotonic()) < deadline:
                for s in samples.values():
                    s.sample()
                time.sleep(min(1.0, max(0.0, deadline - now)))
            for s in samples.values():
                s.cpu_end = cpu_seconds(s.pid)
                s.sample()
            return samples, time.monotonic() - started
        except BaseException:
            print(f"--- agent log (tail)\n{cluster.logs_of('node-a')[-2000:]}", file=sys.stderr)
            raise
        finally:
            if baseline is not None:
                baseline.kill()
                baseline.wait()
            cluster.stop()  # also kills any job ranks left behind (none are started here)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60, help="measuring window in seconds (default 60)")
    parser.add_argument("--warmup", type=float, default=5,
                        help="seconds after the agent is up before measuring (default 5)")
    parser.add_argument("--repeats", type=int, default=1, help="fresh starts of every process (default 1)")
    parser.add_argument("--gpus", type=int, default=8, help="simulated GPUs of the agent (default 8)")
    options = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up on SIGTERM too

    began = time.monotonic()
    runs: list[dict[str, dict[str, float]]] = []
    for repeat in range(options.repeats):
        samples, window = measure_once(options.seconds, options.warmup, options.gpus)
        run = {name: {"rss": statistics.median(s.rss_mb), "rss_max": max(s.rss_mb),
                      "anon": statistics.median(s.anon_mb),
                      "cpu": s.cpu_percent(window), "threads": s.threads}
               for name, s in samples.items()}
        runs.append(run)
        print(f"  run {repeat + 1}/{options.repeats}: " + ", ".join(
            f"{name} {r['rss']:.1f} MB {r['cpu']:.3f} % CPU" for name, r in run.items()) + f" over {window:.0f} s",
            flush=True)
    print_table(runs, options, time.monotonic() - began)
    return 0


def print_table(runs: list[dict[str, dict[str, float]]], options: argparse.Namespace, took: float) -> None:
    def med(name: str, key: str) -> float:
        return statistics.median(run[name][key] for run in runs)

    print()
    print(f"idle processes, {options.seconds:.0f} s window after {options.warmup:.0f} s warm-up, "
          f"median of {len(runs)} start(s); MB = MiB")
    print(f"{'process':<40}{'VmRSS MB':>10}{'max':>8}{'RssAnon':>9}{'threads':>9}{'CPU s/h':>9}{'% core':>8}")
    labels = {"agent": f"gpudeck agent --simulate-gpus {options.gpus}", "baseline": "baseline (bare imports)",
              "coordinator": "gpudeck coordinator (info)"}
    for name, label in labels.items():
        cpu = med(name, "cpu")
        print(f"{label:<40}{med(name, 'rss'):>10.1f}{med(name, 'rss_max'):>8.1f}{med(name, 'anon'):>9.1f}"
              f"{med(name, 'threads'):>9.0f}{cpu * 36:>9.2f}{cpu:>8.3f}")
    rss, cpu = med("agent", "rss"), med("agent", "cpu")
    ratio = rss / med("baseline", "rss")
    verdict_rss = "meets" if rss <= RSS_GOAL_MB else "MISSES"
    verdict_cpu = "meets" if cpu <= CPU_GOAL_PERCENT else "MISSES"
    print(f"\nagent RSS {rss:.1f} MB ({verdict_rss} <= {RSS_GOAL_MB:.0f} MB; {ratio:.2f}x the baseline), "
          f"CPU {cpu:.3f} % of a core = {cpu * 36:.1f} s/h ({verdict_cpu} <= {CPU_GOAL_PERCENT:.0f} %); "
          f"took {took:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
