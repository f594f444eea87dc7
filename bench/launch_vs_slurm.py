"""How soon does a job start, and how many small jobs go through, against Slurm on the same machine?

One run, interleaved (gpudeck, then the baseline, repeated), so drift of this shared machine hits
both alike. gpudeck: a real coordinator and one agent with 2 simulated GPUs on loopback, as `gpudeck
up` runs them (a warm interpreter per node, the default); timed from just before the `gpudeck
submit` command starts, so its own start, TLS and the round trip count. The baselines:

* Slurm 22.05 from Debian's packages (bench/slurm.py: one node on loopback, tuned for latency),
  `sbatch --wrap "python SCRIPT"`; without Slurm this says so and uses a bare `python SCRIPT`
  started by hand;
* for the DDP figure, `torchrun --standalone --nproc-per-node 2 SCRIPT` started by hand.

Figures (median ratio gpudeck / baseline; lower is better except for throughput):
1. submit -> first line of a script that does not import torch;
2. submit -> first line of a script whose first line is `import torch` (timed after the import);
3. submit -> first DDP step of a 2-rank gloo job;
4. 200 trivial jobs (`submit --gpus 1 -- true`, `sbatch --wrap true`) on a 2-GPU (2-CPU) node,
   queued while the node is held and then let go: jobs per second until the last has ended.

    python bench/launch_vs_slurm.py [--repeats 6] [--jobs 200]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import slurm  # noqa: E402
from tests.cluster import Cluster, wait_until  # noqa: E402

NO_TORCH = """
    import time
    print(f"FIRST_LINE {time.time():.6f}", flush=True)
"""
TORCH_FIRST = """
    import torch
    import time
    print(f"FIRST_LINE {time.time():.6f}", flush=True)
"""
TIMEOUT = 300.0
DONE = ("succeeded", "failed", "cancelled")

DDP_SCRIPT = """
    import time
    import torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(64, 32))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        optimizer.zero_grad()
        model(torch.randn(16, 64)).pow(2).mean().backward()
        optimizer.step()
        if step == 0:
            print(f"FIRST_STEP rank={dist.get_rank()} t={time.time():.6f}", flush=True)
    dist.destroy_process_group()
"""
FIRST_STEP = re.compile(r"FIRST_STEP rank=0 t=([0-9.]+)")


def kill_everything_under(root: Path) -> None:
    """SIGKILL every process whose command line names `root` (a fresh temp dir only this run uses).

    torchrun (torch 2.13) starts each rank in a session of its own, so killing torchrun's process
    group, or the job launcher's as tests/cluster.py does, leaves the ranks running; they all name
    their script, which lies under `root`.
    """
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                command = handle.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(root) in command:
            try:
                pid = int(entry)
                if os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGKILL)  # a rank leads its own group: take its workers too
                else:
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class PlainRun:
    """Plain torchrun in a session of its own, so a failure or Ctrl-C can stop every rank."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None

    def run(self, script: Path, workdir: Path) -> dict[str, float]:
        start = time.time()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(), cwd=workdir,
            start_new_session=True)
        try:
            output, _ = self.proc.communicate(timeout=TIMEOUT)
        finally:
            self.stop()
        match = FIRST_STEP.search(output)
        if self.proc.returncode != 0 or match is None:
            raise RuntimeError(f"plain torchrun failed ({self.proc.returncode}):\n{output[-3000:]}")
        return {"first_step": float(match.group(1)) - start}

    def stop(self) -> None:
        """Stop torchrun's group; its ranks, in sessions of their own, go with kill_everything_under."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


def first_line(text: str) -> float:
    for line in text.splitlines():
        if "FIRST_LINE " in line:
            return float(line.rsplit(" ", 1)[1])
    raise RuntimeError(f"no first line in:\n{text[-2000:]}")


class Gpudeck:
    def __init__(self, root: Path) -> None:
        self.cluster = Cluster(root / "cluster")
        self.cluster.root.mkdir()
        self.project = root / "project"

    def start(self) -> None:
        self.cluster.start_coordinator()
        self.cluster.start_agent("node-a", 2, "--warm", "1")
        self.cluster.wait_nodes("up", 1)
        wait_until(lambda: self.cluster.nodes()[0]["warm"]["ready"], TIMEOUT, "the warm interpreter", interval=0.2)

    def first_line(self, script: str, gpus: int = 1) -> float:
        start = time.time()
        job = self.cluster.submit_json("--gpus", str(gpus), script, cwd=self.project)["id"]
        self._finished(job)
        return first_line(self.cluster.cli("logs", str(job)).stdout) - start

    def first_step(self, script: str) -> float:
        start = time.time()
        job = self.cluster.submit_json("--gpus", "2", script, cwd=self.project)["id"]
        self._finished(job)
        match = FIRST_STEP.search(self.cluster.cli("logs", str(job)).stdout)
        if match is None:
            raise RuntimeError(f"job {job} printed no first step")
        return float(match.group(1)) - start

    def _finished(self, job: int) -> None:
        state = self.cluster.wait_job(job, DONE, timeout=TIMEOUT)
        if state["state"] != "succeeded":
            raise RuntimeError(f"gpudeck job {job} {state['state']}: {state.get('reason')}")

    def throughput(self, jobs: int) -> float:
        self.cluster.cli("drain", "node-a")
        ids = [self.cluster.submit_json("--gpus", "1", "--", "true", cwd=self.project)["id"] for _ in range(jobs)]
        start = time.time()
        self.cluster.cli("drain", "node-a", "--off")
        last = ids[-1]
        wait_until(lambda: self.cluster.job(last)["state"] in DONE, TIMEOUT, "the last trivial job", interval=0.1)
        views = {j["id"]: j for j in self.cluster.json("jobs")}
        failed = [j for j in ids if views[j]["state"] != "succeeded"]
        if failed:
            raise RuntimeError(f"{len(failed)} trivial gpudeck jobs did not succeed: {views[failed[0]]}")
        return jobs / (max(views[j]["ended_at"] for j in ids) - start)

    def stop(self) -> None:
        self.cluster.stop()


class SlurmBaseline:
    def __init__(self, root: Path) -> None:
        self.slurm = slurm.LoopbackSlurm(root / "slurm", cpus=2)
        self.project = root / "project"

    def start(self) -> None:
        self.slurm.start()

    def first_line(self, script: str) -> float:
        start = time.time()
        job = self.slurm.sbatch("-D", str(self.project), "--wrap", f"{sys.executable} {script}")
        output = self.slurm.output(job)
        wait_until(lambda: output.exists() and "FIRST_LINE" in output.read_text(), TIMEOUT, f"Slurm job {job}",
                   interval=0.01)
        return first_line(output.read_text()) - start

    def throughput(self, jobs: int) -> float:
        ids = [self.slurm.sbatch("--hold", "--wrap", "true") for _ in range(jobs)]
        start = time.time()
        subprocess.run(["scontrol", "release", ",".join(map(str, ids))], env=self.slurm.env, check=True)
        wait_until(lambda: self.slurm.active_jobs() == 0, TIMEOUT, "every Slurm job to end", interval=0.05)
        return jobs / (time.time() - start)

    def stop(self) -> None:
        self.slurm.stop()


class BarePython:
    """Without Slurm: the script started by hand, which no scheduler can beat."""

    def __init__(self, root: Path) -> None:
        self.project = root / "project"

    def start(self) -> None:
        pass

    def first_line(self, script: str) -> float:
        start = time.time()
        output = subprocess.run([sys.executable, script], cwd=self.project, capture_output=True, text=True, check=True)
        return first_line(output.stdout) - start

    def throughput(self, jobs: int) -> float:
        start = time.time()
        for _ in range(jobs // 2):
            first, second = subprocess.Popen(["true"]), subprocess.Popen(["true"])
            first.wait()
            second.wait()
        return jobs / (time.time() - start)

    def stop(self) -> None:
        pass


def interleaved(repeats: int, ours: Callable[[], float], theirs: Callable[[], float], label: str) -> tuple[list[float], list[float]]:
    a, b = [], []
    ours()  # one untimed run of each first: files into the page cache, a first connection
    theirs()
    for repeat in range(repeats):
        a.append(ours())
        b.append(theirs())
        print(f"  {label:<34} run {repeat + 1}/{repeats}: gpudeck {a[-1] * 1000:7.0f} ms, baseline {b[-1] * 1000:7.0f} ms",
              flush=True)
    return a, b


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=6, help="timed runs of each figure (default 6)")
    parser.add_argument("--jobs", type=int, default=200, help="trivial jobs for the throughput figure (default 200)")
    options = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    why_not = slurm.missing()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpudeck-bench-") as folder:
        root = Path(folder)
        project = root / "project"
        project.mkdir()
        for name, text in (("no_torch.py", NO_TORCH), ("torch_first.py", TORCH_FIRST), ("ddp.py", DDP_SCRIPT)):
            (project / name).write_text(textwrap.dedent(text))
        ours = Gpudeck(root)
        baseline = SlurmBaseline(root) if not why_not else BarePython(root)
        name = "Slurm sbatch" if not why_not else "python3 by hand"
        if why_not:
            print(f"Slurm is not available ({why_not}): measuring against a bare python3 started by hand")
        plain = PlainRun()
        try:
            ours.start()
            baseline.start()
            for label, script in (("first line, no torch", "no_torch.py"), ("first line, import torch first", "torch_first.py")):
                a, b = interleaved(options.repeats, lambda: ours.first_line(script), lambda: baseline.first_line(script), label)
                rows.append((label, name, a, b, "lower"))
            a, b = interleaved(options.repeats, lambda: ours.first_step("ddp.py"),
                               lambda: plain.run(project / "ddp.py", project)["first_step"], "first DDP step, 2 ranks")
            rows.append(("first DDP step, 2 ranks", "torchrun by hand", a, b, "lower"))
            a, b = [ours.throughput(options.jobs)], [baseline.throughput(options.jobs)]
            print(f"  {options.jobs} trivial jobs: gpudeck {a[0]:.1f}/s, baseline {b[0]:.1f}/s", flush=True)
            rows.append((f"{options.jobs} trivial jobs, jobs/s", name, a, b, "higher"))
        except BaseException:
            print(f"--- agent log (tail)\n{ours.cluster.logs_of('node-a')[-2000:]}", file=sys.stderr)
            raise
        finally:
            plain.stop()
            ours.stop()
            baseline.stop()
            kill_everything_under(root)
    print_table(rows)
    return 0


def print_table(rows: list[tuple[str, str, list[float], list[float], str]]) -> None:
    print()
    print("| figure | baseline | gpudeck (median) | baseline (median) | ratio gpudeck/baseline |")
    print("|---|---|---|---|---|")
    for label, name, ours, theirs, better in rows:
        a, b = statistics.median(ours), statistics.median(theirs)
        unit = (lambda v: f"{v:.1f}/s") if better == "higher" else (lambda v: f"{v * 1000:,.0f} ms")
        print(f"| {label} | {name} | {unit(a)} | {unit(b)} | {a / b:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
