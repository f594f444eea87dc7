"""Says which task of which array it is, then waits until a file named after its index appears in
--until-dir (when given), then exits with --exit-code. It needs no torch."""
import argparse
import os
import time
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--until-dir", type=Path, help="wait for DIR/INDEX to exist before ending")
parser.add_argument("--exit-code", type=int, default=0)
args = parser.parse_args()
index = os.environ.get("GPUDECK_ARRAY_INDEX", "none")
print(f"rank {os.environ.get('RANK')} is task {index} of array {os.environ.get('GPUDECK_ARRAY_JOB', 'none')}",
      flush=True)
while args.until_dir is not None and not (args.until_dir / index).exists():
    time.sleep(0.1)
raise SystemExit(args.exit_code)
