"""How soon does a job start, and how many small jobs go through, against Slurm on the same machine?

One run, interleaved (gpudeck, then the baseline, repeated), so drift of this shared machine hits
both alike. gpudeck: a real coordinator and one agent with 2 simulated GPUs on loopback, started as
the README starts them (`gpudeck agent` with its defaults: one warm interpreter, and nothing in the
environment a user's shell would not have: no OMP_NUM_THREADS); timed from just before the `gpudeck
submit` command starts, so its own start, TLS and the round trip count. The baselines:

* Slurm 22.05 from Debian's packages (bench/slurm.py: one node on loopback, tuned for latency),
  `sbatch --wrap "python SCRIPT"`; without Slurm this says so and uses a bare `python SCRIPT`
  started by hand;
* for the DDP figure, `torchrun --standalone --nproc-per-node 2 SCRIPT` started by hand.

Figures (median ratio gpudeck / baseline; lower is better except for throughput):
1. submit -> first line of a script that does not import torch;
2. submit -> first line of a script whose first line is `import torch` (timed after the import);
3. submit -> first DDP step of a 2-rank gloo job;
4. a loop of single submits from a shell, as a user writes one (`for i in $(seq 100); do gpudeck
   submit --gpus 1 -- true; done` from a project folder, against `sbatch --wrap true`) on a 2-GPU
   (2-CPU) node: jobs per second from the first submit to the end of the last job;
5. one array of 100 (`submit --gpus 1 --array 0-99 -- true`, `sbatch --array=0-99 --wrap true`),
   timed the same way.

gpudeck's modules are compiled to bytecode first, as `pip install` does: an editable checkout in a
shell with PYTHONDONTWRITEBYTECODE would otherwise compile them at every command.

    python bench/launch_vs_slurm.py [--repeats 5] [--jobs 100]
"""

from __future__ import annotations

import argparse
import compileall
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
from functools import partial
from typing import Any, Callable

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
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


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
        self.cluster.start_agent("node-a", 2, "--warm", "1")  # the default (the harness's own is none)
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

    def loop(self, jobs: int) -> float:
        """Jobs per second for `jobs` submits from a shell loop, from the first to the last job's end."""
        start = time.time()
        ids = shell_loop(jobs, "gpudeck submit --gpus 1 -- true", self.project, self._user_env())
        return jobs / (self._last_end([int(i) for i in ids]) - start)

    def array(self, jobs: int) -> float:
        start = time.time()
        ids = shell_loop(1, f"gpudeck submit --gpus 1 --array 0-{jobs - 1} -- true", self.project, self._user_env())
        return jobs / (self._last_end([int(ids[0])], expected=jobs) - start)

    def _user_env(self) -> dict[str, str]:
        """A user's shell: the venv's gpudeck on PATH, the coordinator and token in the environment."""
        return {**self.cluster.env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                "GPUDECK_COORDINATOR": f"127.0.0.1:{self.cluster.port}", "GPUDECK_TOKEN": self.cluster.token}

    def _last_end(self, ids: list[int], expected: int | None = None) -> float:
        """When the last of the jobs `ids` (or of the arrays they are) ended, once all `expected` have."""
        wanted = set(ids)

        def ended() -> list[dict[str, object]] | None:
            views = [j for j in self.cluster.json("jobs", "--all") if j["id"] in wanted or j.get("array_job") in wanted]
            done = [j for j in views if j["state"] in DONE]
            return views if len(done) == len(views) == (expected or len(ids)) else None

        views: list[dict[str, Any]] = wait_until(ended, TIMEOUT, "every job of the loop or array to end", interval=0.5)
        failed = [j for j in views if j["state"] != "succeeded"]
        if failed:
            raise RuntimeError(f"{len(failed)} trivial gpudeck jobs did not succeed: {failed[0]}")
        return max(float(j["ended_at"]) for j in views)

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

    def loop(self, jobs: int) -> float:
        start = time.time()
        shell_loop(jobs, f"sbatch --parsable -c 1 -o {self.slurm.folder}/out/%j.out --wrap true", self.project,
                   self.slurm.env)
        return jobs / (self._drained() - start)

    def array(self, jobs: int) -> float:
        start = time.time()
        shell_loop(1, f"sbatch --parsable -c 1 -o {self.slurm.folder}/out/%A_%a.out --array=0-{jobs - 1} --wrap true",
                   self.project, self.slurm.env)
        return jobs / (self._drained() - start)

    def _drained(self) -> float:
        """When the last job left the queue, to within the 50 ms between looks (Slurm keeps no end
        times here: accounting is off, as on a site without slurmdbd)."""
        wait_until(lambda: self.slurm.active_jobs() == 0, TIMEOUT, "every Slurm job to end", interval=0.05)
        return time.time()

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

    def loop(self, jobs: int) -> float:
        start = time.time()
        shell_loop(jobs, "true", self.project, os.environ.copy())
        return jobs / (time.time() - start)

    array = loop

    def stop(self) -> None:
        pass


def shell_loop(count: int, command: str, cwd: Path, env: dict[str, str]) -> list[str]:
    """Run `command` `count` times from one bash loop, as a user's script would; what each printed."""
    script = f"for i in $(seq {count}); do {command} || exit 1; done"
    result = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if result.returncode != 0:
        raise RuntimeError(f"{command!r} failed in a loop: {result.stderr[-2000:]}")
    return result.stdout.split()


def interleaved(repeats: int, ours: Callable[[], float], theirs: Callable[[], float],
                label: str) -> tuple[list[float], list[float]]:
    a, b = [], []
    ours()  # one untimed run of each first: files into the page cache, a first connection
    theirs()
    for repeat in range(repeats):
        a.append(ours())
        b.append(theirs())
        print(f"  {label:<34} run {repeat + 1}/{repeats}: gpudeck {a[-1] * 1000:7.0f} ms, "
              f"baseline {b[-1] * 1000:7.0f} ms", flush=True)
    return a, b


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each figure (default 5)")
    parser.add_argument("--jobs", type=int, default=100, help="trivial jobs for the throughput figures (default 100)")
    options = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for part in ("gpudeck", "agent", "coordinator", "tui", "train"):
        compileall.compile_dir(ROOT / part, quiet=1)
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
            for label, script in (("first line, no torch", "no_torch.py"),
                                  ("first line, import torch first", "torch_first.py")):
                a, b = interleaved(options.repeats, partial(ours.first_line, script),
                                   partial(baseline.first_line, script), label)
                rows.append((label, name, a, b, "lower"))
            a, b = interleaved(options.repeats, lambda: ours.first_step("ddp.py"),
                               lambda: plain.run(project / "ddp.py", project)["first_step"], "first DDP step, 2 ranks")
            rows.append(("first DDP step, 2 ranks", "torchrun by hand", a, b, "lower"))
            for label, ours_run, theirs_run in (
                    (f"loop of {options.jobs} submits, jobs/s", ours.loop, baseline.loop),
                    (f"array of {options.jobs}, jobs/s", ours.array, baseline.array)):
                a, b = [ours_run(options.jobs)], [theirs_run(options.jobs)]
                print(f"  {label}: gpudeck {a[0]:.1f}/s, baseline {b[0]:.1f}/s", flush=True)
                rows.append((label, name, a, b, "higher"))
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
