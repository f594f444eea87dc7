"""Prints what a rank sees at its first line (before it imports torch), then joins its job's process
group with torchrun's variables (env://) and all-reduces once, so tests can compare how ranks start."""
import json
import os
import random
import re
import signal
import sys
import threading

RENDEZVOUS = re.compile(r"^(RANK|LOCAL_RANK|WORLD_SIZE|LOCAL_WORLD_SIZE|GROUP_.*|ROLE_.*|MASTER_.*|TORCHELASTIC_.*|"
                        r"TORCH_NCCL_.*|OMP_NUM_THREADS)$")


def os_threads() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("Threads:"))


facts = {
    "torch_loaded_before_first_line": "torch" in sys.modules,
    "rendezvous": {k: v for k, v in os.environ.items() if RENDEZVOUS.match(k)},
    "python_threads": threading.active_count(),
    "os_threads": os_threads(),
    "random": random.random(),
    "session_leader_is_parent": os.getsid(0) == os.getppid() == os.getpgrp(),
    "sigterm_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
    "sigint_default": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
    "sigchld_default": signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL,
    "argv": sys.argv,
    "cwd": os.getcwd(),
    "main": __name__,
    "stdin_is_null": os.path.realpath("/proc/self/fd/0") == "/dev/null",
}
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

facts["cuda_initialized"] = torch.cuda.is_initialized()
facts["torch_seed"] = torch.initial_seed()
facts["torch_threads"] = torch.get_num_threads()
dist.init_process_group("gloo")
total = torch.ones(4)
dist.all_reduce(total)
facts["all_reduce"] = total.tolist()
print("FACTS " + json.dumps(facts), flush=True)
dist.destroy_process_group()
