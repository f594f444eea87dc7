"""Prints the sizes of the thread pools a rank has once it has imported torch and numpy and run work
on each (torch's intra-op and inter-op pools, MKL's, numpy's BLAS) and the threads the process then
has, so tests can compare a rank forked from a warm interpreter with one started cold."""
import json
import os
import sys

forked = "torch" in sys.modules
import numpy  # noqa: E402
import threadpoolctl  # noqa: E402
import torch  # noqa: E402

numpy.ones((256, 256)) @ numpy.ones((256, 256))
torch.ones(256, 256) @ torch.ones(256, 256)
torch.ones(1 << 21).sum()
mkl = [line for line in torch.__config__.parallel_info().splitlines() if "mkl_get_max_threads" in line]
facts = {
    "forked": forked,
    "intra_op": torch.get_num_threads(),
    "inter_op": torch.get_num_interop_threads(),
    "mkl": mkl[0].split(":")[1].strip() if mkl else None,
    "pools": sorted((pool["internal_api"], pool["num_threads"]) for pool in threadpoolctl.threadpool_info()),
    "os_threads": len(os.listdir("/proc/self/task")),
}
print("THREADS " + json.dumps(facts), flush=True)
