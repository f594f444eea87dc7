"""Counting starts when the rank's code imports torch, so nothing heavy runs before its first line.

`after_torch(callback)` runs the callback right after `torch` has been imported (which imports
torch.distributed; hooking that alone would run inside torch's own start, half initialised), or at
once where torch is already loaded (a rank forked from a warm interpreter). gpudeck.train.run uses
it for the ranks the agent starts.

For ranks gpudeck did not start itself (those a job's own command starts: `gpudeck submit --
torchrun ...`, `accelerate launch`, a shell script) the overlay's `sitecustomize` (see
gpudeck.agent.overlay) calls `arm()` in every Python process of the job. In a process that is a rank
(RANK set, as every launcher sets it) it installs the counting wrappers and the reporter once torch
is imported, and sends the final totals at exit; the launcher itself (no RANK) is never counted.
"""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.machinery
import os
import sys
import types
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from gpudeck.train.counter import TrafficCounter

WATCHED = "torch"  # torch's own start imports torch.distributed: counting goes in once torch is whole
ENABLED = "GPUDECK_AUTOCOUNT"  # set by the agent for command jobs only: its own wrapper counts the rest


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps the real loader of torch so that the callback runs right after
    that module has run, and then steps out of the import system."""

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback

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
            self.callback()

        loader.exec_module = exec_module
        return spec


def after_torch(callback: Callable[[], None]) -> None:
    if WATCHED in sys.modules:
        callback()
    else:
        sys.meta_path.insert(0, _AfterImport(callback))


def install_counting(counter: TrafficCounter) -> None:
    """Install the counting wrappers; if this torch lacks what they wrap, warn and run uncounted."""
    try:
        from gpudeck.train import counting

        counting.install(counter)
    except Exception as exc:  # noqa: BLE001 - counting is an extra; it must never stop the job
        print(f"gpudeck: traffic counting disabled ({type(exc).__name__}: {exc})", file=sys.stderr)


def arm() -> None:
    if os.environ.get(ENABLED) and "RANK" in os.environ and WATCHED not in sys.modules:
        after_torch(_start)


def _start() -> None:
    """Counting is an extra: whatever goes wrong here is said on stderr, and `import torch` goes on."""
    try:
        from gpudeck.train.counter import TrafficCounter
        from gpudeck.train.reporter import reporter_from_env

        counter = TrafficCounter()
        install_counting(counter)
        reporter = reporter_from_env(counter)
        if reporter is not None:
            reporter.start()
            atexit.register(reporter.close)
    except Exception as exc:  # noqa: BLE001
        print(f"gpudeck: traffic of this rank is not counted ({type(exc).__name__}: {exc})", file=sys.stderr)
