"""Check gpudeck against a real NVIDIA GPU: what the agent reads through NVML against `nvidia-smi`,
and a one-node data-parallel job over NCCL with its traffic counted.

Run it through `bash bench/gpu_check.sh` on a machine with an NVIDIA driver and torch installed (the
script installs gpudeck beside that torch). It starts a real coordinator and one agent on loopback
(`--no-mdns`), reading the GPUs with NVML, and stops both, job ranks included, also on failure.

1. every GPU field the agent reports (`gpudeck nodes --json`) is compared with `nvidia-smi
   --query-gpu` read just after it; fields that move between two reads (memory used, utilization,
   temperature, power) are compared within a tolerance the table prints;
2. `gpudeck submit --workload data-parallel` on every GPU of the node: the job must succeed, use
   NCCL, count its all-reduce bytes, and while it runs, the agent must list exactly the processes
   `nvidia-smi --query-compute-apps` lists, the job's own ones not as foreign.

Without `nvidia-smi` (a machine with no NVIDIA GPU, such as CI) part 1 is skipped with that reason
and part 2 runs on 2 simulated GPUs over gloo, which is how the test suite runs this script. Prints
a table; exits 1 when a check fails. Takes about a minute.

    python bench/gpu_check.py [--steps 60] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.cluster import Cluster, wait_until  # noqa: E402

MIB = 2**20
TIMEOUT = 180
SMI_FIELDS = ("uuid", "name", "memory.total", "memory.used", "utilization.gpu", "temperature.gpu",
              "power.draw", "enforced.power.limit", "ecc.errors.uncorrected.volatile.total")
REMAP_FIELDS = ("gpu_uuid", "remapped_rows.uncorrectable")  # a query of its own (Ampere and newer)
DONE = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class Check:
    """One line of the table: what was compared, the two values, and whether they agree."""

    gpu: str
    field: str
    gpudeck: str
    reference: str
    tolerance: str
    ok: bool


@dataclass(frozen=True)
class Field:
    """How one GpuReading field maps onto an nvidia-smi column, and how far apart they may be."""

    name: str
    smi: str
    convert: Callable[[Any], float | str]
    tolerance: Callable[[float], float] | None  # None: must be equal
    describe: str


FIELDS = (
    Field("name", "name", str, None, "equal"),
    Field("memory_total", "memory.total", lambda value: value // MIB, lambda _: 1, "±1 MiB"),
    Field("memory_used", "memory.used", lambda value: value // MIB, lambda _: 256, "±256 MiB (moves between reads)"),
    Field("utilization", "utilization.gpu", float, lambda _: 25, "±25 points (sampled at other times)"),
    Field("temperature", "temperature.gpu", float, lambda _: 3, "±3 °C"),
    Field("power", "power.draw", float, lambda smi: max(15.0, 0.15 * smi), "±15 % or 15 W"),
    Field("power_limit", "enforced.power.limit", float, lambda _: 1, "±1 W"),
    Field("ecc_uncorrected", "ecc.errors.uncorrected.volatile.total", str, None, "equal"),
    Field("remapped_rows", "remapped_rows.uncorrectable", str, None, "equal"),
)


def parse_smi(text: str, columns: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of `nvidia-smi --query-* --format=csv,noheader,nounits` as column -> text."""
    rows = []
    for line in text.strip().splitlines():
        values = [value.strip() for value in line.split(",")]
        if len(values) != len(columns):
            raise ValueError(f"nvidia-smi printed {len(values)} columns where {len(columns)} were asked: {line!r}")
        rows.append(dict(zip(columns, values)))
    return rows


def compare_gpu(reading: dict[str, Any], smi: dict[str, str]) -> list[Check]:
    """Every field of one GPU's reading against nvidia-smi's row for the same UUID."""
    gpu = f"{reading['index']} ({reading['uuid'][:12]})"
    checks = []
    for field in FIELDS:
        ours, theirs = reading.get(field.name), smi.get(field.smi, "")
        if ours is None or theirs in ("", "[N/A]", "[Not Supported]"):
            checks.append(Check(gpu, field.name, _shown(ours), theirs or "-", "not reported by both",
                                ours is None and theirs in ("", "[N/A]", "[Not Supported]")))
            continue
        converted = field.convert(ours)
        if field.tolerance is None:
            ok = str(converted) == theirs
        else:
            reference = float(theirs)
            ok = abs(float(converted) - reference) <= field.tolerance(reference)
        checks.append(Check(gpu, field.name, _shown(converted), theirs, field.describe, ok))
    return checks


def _shown(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def nvidia_smi(query: str, columns: tuple[str, ...]) -> list[dict[str, str]]:
    result = subprocess.run(["nvidia-smi", f"--{query}={','.join(columns)}", "--format=csv,noheader,nounits"],
                            capture_output=True, text=True, timeout=30, check=True)
    return parse_smi(result.stdout, columns)


def check_readings(cluster: Cluster) -> list[Check]:
    """Part 1: the agent's NVML readings, as the coordinator hands them out, against nvidia-smi."""
    gpus = cluster.nodes()[0]["gpus"]
    by_uuid = {row["uuid"]: row for row in nvidia_smi("query-gpu", SMI_FIELDS)}
    try:
        for row in nvidia_smi("query-remapped-rows", REMAP_FIELDS):
            by_uuid.get(row["gpu_uuid"], {}).update(row)
    except (subprocess.CalledProcessError, ValueError):
        pass  # GPUs without row remapping: the field then reads "not reported by both"
    checks = []
    for reading in gpus:
        smi = by_uuid.get(reading["uuid"])
        if smi is None:
            checks.append(Check(str(reading["index"]), "uuid", reading["uuid"], "not listed", "equal", False))
            continue
        checks.extend(compare_gpu(reading, smi))
    missing = set(by_uuid) - {reading["uuid"] for reading in gpus}
    checks.extend(Check("-", "uuid", "not listed", uuid, "equal", False) for uuid in sorted(missing))
    return checks


def check_job(cluster: Cluster, gpus: int, steps: int, real: bool) -> list[Check]:
    """Part 2: a data-parallel job on every GPU of the node, its backend, traffic and processes."""
    started = time.monotonic()
    job = cluster.submit("--no-project", "--gpus", str(gpus), "--workload", "data-parallel", "--steps", str(steps),
                         "--log-every", str(steps))
    checks = []
    if real:
        checks.extend(_check_processes(cluster, job))
    view = cluster.wait_job(job, DONE, timeout=TIMEOUT)
    seconds = time.monotonic() - started
    logs = cluster.cli("logs", str(job)).stdout
    backend = "nccl" if real else "gloo"
    all_reduce = view["traffic"]["by_kind"].get("all_reduce", 0)
    checks.append(Check("job", "state", view["state"], "succeeded", f"{seconds:.1f} s from submit to end",
                        view["state"] == "succeeded"))
    checks.append(Check("job", "backend", backend if f": {backend} on" in logs else "other", backend,
                        "rank 0's first line", f": {backend} on" in logs))
    checks.append(Check("job", "all_reduce bytes", str(all_reduce), "> 0", "counted by the ranks", all_reduce > 0))
    return checks


def _check_processes(cluster: Cluster, job: int) -> list[Check]:
    """While the job runs: the agent lists the processes nvidia-smi lists, the job's own as not foreign."""
    cluster.wait_job(job, ("running",) + DONE, timeout=TIMEOUT)

    def both_see_ranks() -> tuple[set[int], set[int], set[int]] | None:
        listed = [process for gpu in cluster.nodes()[0]["gpus"] for process in gpu["processes"]]
        ours = {process["pid"] for process in listed}
        smi = {int(row["pid"]) for row in nvidia_smi("query-compute-apps", ("pid", "gpu_uuid"))}
        foreign = {process["pid"] for process in listed if process["foreign"]}
        return (ours, smi, foreign) if ours and ours == smi else None

    try:
        ours, smi, foreign = wait_until(both_see_ranks, 60, "the agent and nvidia-smi to list the job's ranks",
                                        interval=0.5)
    except AssertionError as exc:  # tests.cluster.wait_until's timeout
        return [Check("job", "processes", "differ", "nvidia-smi --query-compute-apps", str(exc), False)]
    job_pids = set(cluster.job_pids("node-a", job))
    return [Check("job", "processes", ",".join(map(str, sorted(ours))), ",".join(map(str, sorted(smi))),
                  "same pids", True),
            Check("job", "foreign", ",".join(map(str, sorted(foreign & job_pids))) or "none", "none",
                  "the job's own ranks", not foreign & job_pids)]


def run(steps: int) -> tuple[list[Check], str]:
    real = shutil.which("nvidia-smi") is not None
    root = Path(tempfile.mkdtemp(prefix="gpudeck-gpu-check-"))
    cluster = Cluster(root)
    try:
        cluster.start_coordinator()
        if real:
            cluster.spawn("node-a", "agent", "--coordinator", f"127.0.0.1:{cluster.port}", "--token", cluster.token,
                          "--name", "node-a", "--no-mdns", "--state-dir", str(root / "node-a"), "--warm", "0")
        else:
            cluster.start_agent("node-a", 2)
        cluster.wait_nodes("up", 1, timeout=60)
        checks = check_readings(cluster) if real else []
        note = "" if real else "NVML against nvidia-smi: skipped, nvidia-smi is not installed (no NVIDIA driver)"
        gpus = len(cluster.nodes()[0]["gpus"])
        return checks + check_job(cluster, gpus, steps, real), note
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def print_table(checks: list[Check], note: str) -> None:
    headers = ("GPU", "FIELD", "GPUDECK", "REFERENCE", "TOLERANCE", "OK")
    rows = [(c.gpu, c.field, c.gpudeck, c.reference, c.tolerance, "ok" if c.ok else "DIFFERS") for c in checks]
    widths = [max(len(str(row[i])) for row in (headers, *rows)) for i in range(len(headers))]
    for row in (headers, *rows):
        print("  ".join(str(value).ljust(width) for value, width in zip(row, widths)).rstrip())
    if note:
        print(note)
    failed = [c for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)} of {len(checks)} checks agree" + (f"; {len(failed)} differ" if failed else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="steps of the data-parallel job (default: 60)")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON instead of a table")
    options = parser.parse_args()
    checks, note = run(options.steps)
    if options.json:
        print(json.dumps({"checks": [asdict(check) for check in checks], "note": note}, indent=2))
    else:
        print_table(checks, note)
    return 0 if all(check.ok for check in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
