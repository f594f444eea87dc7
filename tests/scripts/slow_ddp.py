"""An ordinary DDP script that trains slowly, so tests can act on it while it runs."""
import argparse
import os
import signal
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--sleep", type=float, default=0.5)
parser.add_argument("--fail-at", type=int, default=-1, help="at this step, exit with code 3")
parser.add_argument("--fail-rank", type=int, default=-1, help="only this rank fails (default: every rank)")
parser.add_argument("--fail-signal", type=int, default=0, help="fail by killing itself with this signal instead")
parser.add_argument("--ignore-sigterm", action="store_true", help="behave like a rank stuck in a collective")
parser.add_argument("--slow-rank", type=int, default=-1, help="this rank sleeps --slow-sleep per step instead")
parser.add_argument("--slow-sleep", type=float, default=0.0)
parser.add_argument("--hang-at", type=int, default=-1, help="at this step, --hang-rank stops in its own code")
args = parser.parse_args()
if args.ignore_sigterm:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
dist.init_process_group("gloo")
torch.manual_seed(0)
model = DDP(torch.nn.Linear(16, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(args.steps):
    if step == args.fail_at and args.fail_rank in (-1, dist.get_rank()):
        if args.fail_signal:
            os.kill(os.getpid(), args.fail_signal)
        raise SystemExit(3)
    loss = model(torch.randn(8, 16)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"rank {dist.get_rank()} step {step} loss {loss.item():.4f}", flush=True)
    if step == args.hang_at and dist.get_rank() == args.slow_rank:
        time.sleep(86400)  # the others wait in the next all-reduce
    time.sleep(args.slow_sleep if dist.get_rank() == args.slow_rank else args.sleep)
dist.destroy_process_group()
