"""Prints which rank it is, then waits until it is told to stop (--wait) or exits with --exit-code.
It needs no torch, so a job of it starts in the time a Python process takes."""
import argparse
import os
import time

parser = argparse.ArgumentParser()
parser.add_argument("--wait", action="store_true", help="keep running until the job is cancelled")
parser.add_argument("--exit-code", type=int, default=0)
args = parser.parse_args()
print(f"rank {os.environ.get('RANK')} is here", flush=True)
while args.wait:
    time.sleep(0.2)
raise SystemExit(args.exit_code)
