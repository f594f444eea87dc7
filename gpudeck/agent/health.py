"""GPU health: turning NVML's error counters and Xid events into faults the coordinator cordons on.

A GPU with an uncorrectable memory error, a failed row remap or a fatal Xid crashes every job put on
it, usually minutes in; a scheduler that keeps offering it turns one bad GPU into a queue of failed
jobs. The agent names each fault in one sentence in the GPU's reading (`GpuReading.faults`); the
coordinator cordons that one GPU (not the node) until an admin runs `gpudeck gpu uncordon`.

What counts as fatal follows NVIDIA's Xid catalogue and dcgm's health checks: the Xids below, any
uncorrected ECC error since the driver loaded, pages waiting to be retired, and a failed or pending
row remap (both need a GPU reset). Correctable errors and remaps that succeeded are only reported.
An Xid is an event, seen once: it is kept (with the time the agent saw it) until the agent restarts,
so a coordinator that was away still learns of it. A counter-based fault's sentence is its count,
so the same condition reads the same after an agent restart and an uncordoned GPU is not cordoned
again for it, while a count that grows is a new fault.

The simulated backend reads what to inject from a file in the agent's state dir (SIMULATED_GPUS),
one line each, so that tests and demos run the same path as real hardware: faults (``0 xid 79``,
``1 ecc 2`` for uncorrected errors, ``1 retired 3``, ``0 retired-pending``, ``0 remap-failed``,
``0 remap-pending``) and processes outside gpudeck holding a GPU (``0 process 4121``, a real pid).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

SIMULATED_GPUS = "simulated-gpus"
MAX_XIDS_KEPT = 8  # per GPU: a GPU that floods events needs a reset, not a longer list

FATAL_XIDS: dict[int, str] = {
    48: "a double-bit ECC error",
    61: "an internal micro-controller breakpoint",
    62: "an internal micro-controller halt",
    63: "a memory page retirement or row remap was recorded",
    64: "a memory page retirement or row remap failed",
    74: "an NVLink error",
    79: "the GPU has fallen off the bus",
    92: "a high single-bit ECC error rate",
    94: "a contained ECC error",
    95: "an uncontained ECC error",
    119: "the GPU's system processor (GSP) timed out",
    120: "the GPU's system processor (GSP) failed",
}


@dataclass(frozen=True)
class HealthCounters:
    """What a backend read of one GPU's health; None where the GPU cannot say."""

    xids: tuple[int, ...] = ()  # Xid events since the last read
    ecc_uncorrected: int | None = None  # uncorrected ECC errors since the driver loaded
    retired_pages: int | None = None  # memory pages retired for ECC errors (pre-Ampere GPUs)
    retired_pending: bool | None = None  # pages waiting for a reset to be retired
    remapped_rows: int | None = None  # rows remapped for uncorrectable errors (Ampere and newer)
    remap_pending: bool | None = None
    remap_failed: bool | None = None


@dataclass
class HealthJudge:
    """One agent's view of its GPUs' health: keeps the fatal Xids seen, judges the counters."""

    clock: Callable[[], float] = time.time
    _xids: dict[int, list[str]] = field(default_factory=dict)  # GPU index -> sentences of fatal Xids seen

    def faults(self, index: int, counters: HealthCounters) -> tuple[str, ...]:
        """The GPU's faults, each one sentence, oldest first."""
        kept = self._xids.setdefault(index, [])
        for xid in counters.xids:
            if xid in FATAL_XIDS and len(kept) < MAX_XIDS_KEPT:
                seen = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.clock()))
                kept.append(f"Xid {xid} at {seen}: {FATAL_XIDS[xid]}")
        return (*kept, *_counter_faults(counters))


def _counter_faults(counters: HealthCounters) -> list[str]:
    faults = []
    if counters.ecc_uncorrected:
        faults.append(f"{counters.ecc_uncorrected} uncorrected ECC error{'s' if counters.ecc_uncorrected > 1 else ''} "
                      "since the driver loaded")
    if counters.retired_pending:
        faults.append("retired memory pages are waiting for a GPU reset")
    if counters.remap_failed:
        faults.append("a memory row remap failed")
    if counters.remap_pending:
        faults.append("a memory row remap is waiting for a GPU reset")
    return faults


class Injected:
    """Faults and outside processes to inject into simulated GPUs, read from a file each time it
    changes. Each `xid` line is one event, delivered once; the other fault lines set a counter."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._stamp: tuple[float, int] | None = None
        self._counters: dict[int, HealthCounters] = {}
        self._xid_lines: Counter[tuple[int, int]] = Counter()  # (GPU, xid) -> lines in the file
        self._delivered: Counter[tuple[int, int]] = Counter()
        self.processes: dict[int, list[int]] = {}  # GPU -> pids of outside processes on it

    def read(self) -> dict[int, HealthCounters]:
        """Every GPU's counters, with the Xid lines not delivered before."""
        self._reload()
        pending = self._xid_lines - self._delivered
        self._delivered |= self._xid_lines
        xids: dict[int, list[int]] = {}
        for (gpu, xid), times in sorted(pending.items()):
            xids.setdefault(gpu, []).extend([xid] * times)
        indices = set(self._counters) | set(xids)
        return {gpu: _with_xids(self._counters.get(gpu, HealthCounters()), xids.get(gpu, [])) for gpu in indices}

    def _reload(self) -> None:
        try:
            stat = self.path.stat() if self.path else None
        except OSError:
            stat = None
        stamp = (stat.st_mtime, stat.st_size) if stat else None
        if stamp == self._stamp:
            return
        self._stamp = stamp
        self._counters, self._xid_lines, self.processes = {}, Counter(), {}
        text = self.path.read_text(errors="replace") if stat and self.path else ""
        for line in text.splitlines()[:256]:
            self._apply(line.split())

    def _apply(self, words: list[str]) -> None:
        """One line; a line that is not one of the documented forms is ignored."""
        if len(words) < 2 or not words[0].isdigit():
            return
        gpu, kind, number = int(words[0]), words[1], int(words[2]) if len(words) > 2 and words[2].isdigit() else None
        if kind == "xid" and number is not None:
            self._xid_lines[(gpu, number)] += 1
            return
        if kind == "process" and number is not None:
            self.processes.setdefault(gpu, []).append(number)
            return
        # kind -> (HealthCounters field, value): the value's type is the named field's, int or bool
        fields: dict[str, tuple[str, Any]] = {
            "ecc": ("ecc_uncorrected", number), "retired": ("retired_pages", number),
            "retired-pending": ("retired_pending", True), "remap-failed": ("remap_failed", True),
            "remap-pending": ("remap_pending", True)}
        if kind in fields and fields[kind][1] is not None:
            name, value = fields[kind]
            current = self._counters.get(gpu, HealthCounters())
            self._counters[gpu] = replace(current, **{name: value})


def _with_xids(counters: HealthCounters, xids: list[int]) -> HealthCounters:
    return replace(counters, xids=tuple(xids))
