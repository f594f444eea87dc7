"""gpudeck's built-in workloads: the three classic ways to train one model across machines.

``gpudeck submit --workload NAME [ARG...]`` runs ``torchrun ... -m gpudeck.train.run --workload NAME
ARG...`` on every node of the job, which calls ``main(ARGS)`` of the module named here, counting its
traffic like a user's script. All three train the same model on the same task
(:mod:`~gpudeck.train.workloads.task`) with the same options (:mod:`~gpudeck.train.workloads.options`)
and the same checkpoints (:mod:`~gpudeck.train.workloads.checkpoint`), so their results equal one
another and single-process SGD, and their costs can be compared side by side.

=================== ======================================== ============================
name                module                                   traffic (kind)
=================== ======================================== ============================
data-parallel       :mod:`.data_parallel`                    gradients (``all_reduce``)
parameter-server    :mod:`.parameter_server`                 parameters/gradients (``send``/``recv``)
pipeline            :mod:`.pipeline`                         activations/gradients (``send``/``recv``)
=================== ======================================== ============================

Importing this package does not import torch; :func:`load` does.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# Workload name -> module under this package. The names and their one-line descriptions are also in
# gpudeck.model.WORKLOADS (which the coordinator and the CLI read without importing torch); a test
# keeps the two in step. gpudeck doctor's check is here too, and only there.
MODULES: dict[str, str] = {
    "data-parallel": "data_parallel",
    "parameter-server": "parameter_server",
    "pipeline": "pipeline",
    "doctor": "doctor",  # gpudeck doctor's network check (gpudeck.model.DOCTOR), not one for --workload
}


def load(name: str) -> ModuleType:
    """The module of workload ``name``, which has ``main(argv: list[str]) -> int``; KeyError if unknown."""
    return importlib.import_module(f"{__name__}.{MODULES[name]}")
