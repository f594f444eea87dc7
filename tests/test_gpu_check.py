"""bench/gpu_check.py, the check run on a lent GPU machine: its CPU-only parts run here, so the
script still works on the day a GPU is at hand."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_check import FIELDS, SMI_FIELDS, compare_gpu, parse_smi

ROOT = Path(__file__).resolve().parents[1]
# One line as `nvidia-smi --query-gpu=<SMI_FIELDS> --format=csv,noheader,nounits` prints it on an H200.
SMI_LINE = "GPU-5f1e7a3c-0b6d-4a52-9c1e-2b8f4d1a7e90, NVIDIA H200, 143771, 1024, 37, 41, 118.52, 700.00, 0"


def reading(**changes: object) -> dict[str, object]:
    """The agent's reading of the GPU in SMI_LINE, as `gpudeck nodes --json` gives it."""
    base: dict[str, object] = {
        "index": 0, "uuid": "GPU-5f1e7a3c-0b6d-4a52-9c1e-2b8f4d1a7e90", "name": "NVIDIA H200",
        "memory_total": 143771 * 2**20, "memory_used": 1100 * 2**20, "utilization": 30, "temperature": 42,
        "power": 121.0, "power_limit": 700.0, "processes": [], "ecc_uncorrected": 0, "remapped_rows": 0,
    }
    return {**base, **changes}


def test_every_field_agrees_within_its_tolerance() -> None:
    [row] = parse_smi(SMI_LINE, SMI_FIELDS)
    row["remapped_rows.uncorrectable"] = "0"  # from `nvidia-smi --query-remapped-rows`
    checks = compare_gpu(reading(), row)
    assert [check.field for check in checks] == [field.name for field in FIELDS]
    assert all(check.ok for check in checks), [check for check in checks if not check.ok]


@pytest.mark.parametrize(("field", "value"), [
    ("name", "NVIDIA H100"), ("memory_total", 81559 * 2**20), ("memory_used", 9000 * 2**20),
    ("temperature", 60), ("power", 300.0), ("power_limit", 500.0), ("ecc_uncorrected", 2),
])
def test_a_field_that_disagrees_is_flagged(field: str, value: object) -> None:
    [row] = parse_smi(SMI_LINE, SMI_FIELDS)
    row["remapped_rows.uncorrectable"] = "0"
    flagged = [check.field for check in compare_gpu(reading(**{field: value}), row) if not check.ok]
    assert flagged == [field]


def test_a_field_only_one_side_reports_is_flagged() -> None:
    [row] = parse_smi(SMI_LINE.replace("118.52", "[N/A]"), SMI_FIELDS)
    assert [check.field for check in compare_gpu(reading(), row) if not check.ok] == ["power", "remapped_rows"]
    assert all(check.ok for check in compare_gpu(reading(power=None, remapped_rows=None), row))


def test_a_line_with_other_columns_is_refused() -> None:
    with pytest.raises(ValueError, match="columns"):
        parse_smi("GPU-1, NVIDIA H200", SMI_FIELDS)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None,
                    reason="this machine has nvidia-smi: the check would compare real GPUs (run bench/gpu_check.sh)")
def test_without_a_gpu_the_check_runs_a_data_parallel_job_on_simulated_gpus() -> None:
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--json", "--steps", "10"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert "nvidia-smi is not installed" in report["note"]
    by_field = {check["field"]: check for check in report["checks"]}
    assert by_field["state"]["gpudeck"] == "succeeded"
    assert by_field["backend"]["gpudeck"] == "gloo"
    assert int(by_field["all_reduce bytes"]["gpudeck"]) > 0


def test_the_shell_wrapper_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")], check=True)
