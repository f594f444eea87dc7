"""Counting the traffic of ranks gpudeck did not start itself: those a job's own command starts
(`gpudeck submit -- torchrun ...`, `accelerate launch`, a shell script).

The overlay's `sitecustomize` (see gpudeck.agent.overlay) calls `arm()` in every Python process of
such a job. In a process that is a rank (RANK set, as every launcher sets it) it waits for `torch`
to be imported (which imports torch.distributed; hooking that alone would run inside torch's own
start, half initialised), then installs the counting wrappers and the reporter, and sends the final
totals at exit. Nothing is imported before that, so a process that never imports torch
pays nothing, and the launcher itself (no RANK) is never counted.
"""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.machinery
import os
import sys
import types
from typing import Sequence

WATCHED = "torch"  # torch's own start imports torch.distributed: counting goes in once torch is whole
ENABLED = "GPUDECK_AUTOCOUNT"  # set by the agent for command jobs only: its own wrapper counts the rest


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps the real loader of torch so that counting starts right after
    that module has run, and then steps out of the import system."""

    def find_spec(self, name: str, path: Sequence[str] | None, target: types.ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if name != WATCHED:
            return None
        sys.meta_path.remove(self)
        spec = None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find else None
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        run_module = loader.exec_module

        def exec_module(module: types.ModuleType) -> None:
            run_module(module)
            _start()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def arm() -> None:
    if os.environ.get(ENABLED) and "RANK" in os.environ and WATCHED not in sys.modules:
        sys.meta_path.insert(0, _AfterImport())


def _start() -> None:
    """Counting is an extra: whatever goes wrong here is said on stderr, and `import torch` goes on."""
    try:
        from gpudeck.train.counter import TrafficCounter
        from gpudeck.train.reporter import reporter_from_env
        from gpudeck.train.run import install_counting

        counter = TrafficCounter()
        install_counting(counter)
        reporter = reporter_from_env(counter)
        if reporter is not None:
            reporter.start()
            atexit.register(reporter.close)
    except Exception as exc:  # noqa: BLE001
        print(f"gpudeck: traffic of this rank is not counted ({type(exc).__name__}: {exc})", file=sys.stderr)
