"""What shipping a project and building its environment cost, from `gpudeck submit` to the job's first
line, against a lab that has both on a shared file system already.

Each repeat starts a fresh coordinator and two agents (2 simulated GPUs each; empty caches) on
loopback, then runs, one after the other, the same 2-node job (one rank per node):

* cold:     `gpudeck submit --nodes 2 --gpus-per-node 1 --requirements requirements.txt train.py` from
            the project: its files (a package, a config, `--data-mb` of data) are hashed and uploaded,
            each node copies them and builds the environment with uv;
* warm:     the same submit again: nothing is uploaded, the environment is reused;
* baseline: `gpudeck submit --no-project --venv VENV train.py` from the same directory, with a venv
            holding the same requirement made once before the runs (a shared file system: nothing to
            ship or build).

Times are from just before the submit command starts to the `time.time()` rank 0's first line prints
(read from `gpudeck logs`); the submit command's own time (hashing and upload) and the bytes it
uploaded are shown for each. uv's own download cache is not cleared between repeats (as on a node
that built an environment before); gpudeck's caches are.

    python bench/project_launch.py [--repeats 3] [--data-mb 64]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.launch_vs_slurm import kill_everything_under  # noqa: E402
from gpudeck.agent.environments import uv_binary  # noqa: E402
from tests.cluster import Cluster  # noqa: E402

TRAIN = """import os, time
print(f"FIRST_LINE rank={os.environ['RANK']} t={time.time():.6f}", flush=True)
import humanize, labpkg
print(labpkg.describe(humanize.naturalsize(2048)))
"""
FIRST_LINE = re.compile(r"FIRST_LINE rank=0 t=([0-9.]+)")
DONE = ("succeeded", "failed", "cancelled")
JOB_TIMEOUT = 300.0


def make_project(root: Path, data_mb: int) -> Path:
    (root / "labpkg").mkdir(parents=True)
    (root / "labpkg" / "__init__.py").write_text("def describe(size):\n    return f'labpkg sees {size}'\n")
    (root / "config.yaml").write_text("lr: 0.1\nbatch: 32\n")
    (root / "train.py").write_text(TRAIN)
    (root / "requirements.txt").write_text("humanize\n")
    with open(root / "data.bin", "wb") as data:
        for _ in range(data_mb):
            data.write(os.urandom(1024 * 1024))
    return root


def shared_venv(root: Path) -> Path:
    venv = root / "shared-venv"
    uv = uv_binary()
    if uv is None:
        raise SystemExit("uv is not installed: pip install 'gpudeck[train]'")
    subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, "--system-site-packages", str(venv)], check=True)
    subprocess.run([uv, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), "humanize"], check=True)
    # The lab's environment has torch too: here, the agent's, seen through a .pth file.
    site = subprocess.run([str(venv / "bin" / "python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    agent_site = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "agent-torch.pth").write_text(f"import site; site.addsitedir({agent_site!r})\n")
    return venv


def submit(cluster: Cluster, project: Path, *how: str) -> dict[str, float]:
    start = time.time()
    job = cluster.submit_json("--nodes", "2", "--gpus-per-node", "1", *how, "train.py", cwd=project)
    returned = time.time()
    ended = cluster.wait_job(job["id"], DONE, timeout=JOB_TIMEOUT)
    logs = cluster.cli("logs", str(job["id"])).stdout
    match = FIRST_LINE.search(logs)
    if ended["state"] != "succeeded" or match is None:
        launcher = cluster.cli("logs", str(job["id"]), "--launcher").stdout
        raise RuntimeError(f"job {job['id']} {ended['state']}: {ended['reason']}\n{launcher[-3000:]}")
    uploaded = (job.get("project") or {}).get("uploaded_bytes", 0)
    return {"first_line": float(match.group(1)) - start, "submit_cli": returned - start, "uploaded": uploaded}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh clusters, each running the three variants")
    parser.add_argument("--data-mb", type=int, default=64, help="MiB of data in the project (default 64)")
    options = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results: dict[str, list[dict[str, float]]] = {"cold": [], "warm": [], "baseline": []}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpudeck-bench-") as folder:
        root = Path(folder)
        project = make_project(root / "project", options.data_mb)
        venv = shared_venv(root)
        try:
            for repeat in range(options.repeats):
                cluster = Cluster(root / f"cluster-{repeat}")
                cluster.root.mkdir()
                try:
                    cluster.start_coordinator()
                    for node in ("node-a", "node-b"):
                        cluster.start_agent(node)
                    cluster.wait_nodes("up", 2)
                    for name, how in (("cold", ["--requirements", "requirements.txt"]),
                                      ("warm", ["--requirements", "requirements.txt"]),
                                      ("baseline", ["--no-project", "--venv", str(venv)])):
                        timing = submit(cluster, project, *how)
                        results[name].append(timing)
                        print(f"  run {repeat + 1}/{options.repeats} {name:<9} first line after "
                              f"{timing['first_line']:6.2f} s  (submit {timing['submit_cli']:5.2f} s, "
                              f"uploaded {timing['uploaded'] / 2**20:6.1f} MiB)", flush=True)
                finally:
                    cluster.stop()
        finally:
            kill_everything_under(root)
    print_table(results, options.data_mb, time.monotonic() - started)
    return 0


def print_table(results: dict[str, list[dict[str, float]]], data_mb: int, seconds: float) -> None:
    print()
    print(f"submit to the first line of rank 0, 2 nodes x 1 rank, project of {data_mb} MiB "
          "+ requirements.txt (humanize)")
    print(f"{'variant':<10}{'median s':>10}{'min':>8}{'max':>8}{'submit s':>10}{'uploaded MiB':>14}")
    for name, runs in results.items():
        firsts = [r["first_line"] for r in runs]
        print(f"{name:<10}{statistics.median(firsts):>10.2f}{min(firsts):>8.2f}{max(firsts):>8.2f}"
              f"{statistics.median(r['submit_cli'] for r in runs):>10.2f}"
              f"{statistics.median(r['uploaded'] for r in runs) / 2**20:>14.1f}")
    base = statistics.median(r["first_line"] for r in results["baseline"])
    cold = statistics.median(r["first_line"] for r in results["cold"])
    warm = statistics.median(r["first_line"] for r in results["warm"])
    print(json.dumps({"ratio_cold_to_baseline": round(cold / base, 2),
                      "ratio_warm_to_baseline": round(warm / base, 2)}))
    print(f"took {seconds:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
