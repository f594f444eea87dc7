#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) on a machine with an NVIDIA GPU, beside the torch installed there.
#
#   bash bench/gpu_check.sh [--steps 60] [--json]
#
# It makes .gpu-check-venv with the system's site packages, so the CUDA build of torch that is already
# installed is the one used, and installs gpudeck into it (pip finds torch there and fetches no other).
# On a machine that reaches no package index, point GPU_CHECK_WHEELS at a folder of wheels made
# elsewhere with `pip wheel -w wheels '.[train]'` (torch left out); pip then installs from that folder
# only. Without torch on the machine, it installs torch==2.13.0 (the CPU build) and the check runs on
# simulated GPUs, as the test suite does.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
venv=.gpu-check-venv
if "$python" -c "import torch" 2>/dev/null; then
    "$python" -m venv --system-site-packages "$venv"
else
    "$python" -m venv "$venv"
    "$venv/bin/pip" install -q torch==2.13.0
fi
pip_from=()
if [[ -n "${GPU_CHECK_WHEELS:-}" ]]; then
    pip_from=(--no-index --find-links "$GPU_CHECK_WHEELS")
fi
"$venv/bin/pip" install -q "${pip_from[@]}" -e '.[train]'
exec "$venv/bin/python" bench/gpu_check.py "$@"
