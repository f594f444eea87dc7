"""GPU backends for the node agent: real NVML, a simulated cluster, and "no GPUs".

The agent talks to one `GpuBackend` and never to pynvml directly, so a machine without NVIDIA
hardware (a laptop, CI) runs the same code with the simulated or the empty backend. Every backend
turns a metric the hardware cannot give into None instead of an exception: one unsupported sensor
must never take down telemetry for the whole node.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from gpudeck.agent.health import HealthCounters, HealthJudge, Injected
from gpudeck.protocol.payloads import GpuProcess, GpuReading

GIB = 1 << 30
MIB = 1 << 20

SIM_MEMORY_TOTAL = 80 * GIB
SIM_POWER_LIMIT = 700.0
SIM_BUSY_MEMORY = 18 * GIB
SIM_IDLE_TEMPERATURE = 35.0
SIM_BUSY_TEMPERATURE = 70.0
SIM_IDLE_POWER = 60.0
SIM_BUSY_POWER = 450.0
SIM_UTILIZATION_RANGE = (60, 100)
SIM_OUTSIDE_MEMORY = 2 * GIB  # what an injected outside process holds (gpudeck.agent.health.Injected)
# A simulated GPU computes while the processes given it (and their children) use the CPU: a job that
# only sleeps or waits holds its GPUs at 0 %, as a real one blocked on I/O would. Measured every
# SIM_CPU_INTERVAL seconds (a scan of /proc); below SIM_QUIET_CPU of one core is quiet.
SIM_CPU_INTERVAL = 5.0
SIM_QUIET_CPU = 0.01
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Fraction of the gap to the target temperature/power closed per read: at a 1 s poll the
# simulated GPU warms up over roughly ten seconds, like a real one ramping into a job.
SIM_APPROACH = 0.2

DEFAULT_PROCESS_INTERVAL = 5.0
SIMULATE_HINT = "use --simulate-gpus N to try gpudeck without GPUs"


class GpuBackend(Protocol):
    """What the agent needs from a source of GPU telemetry."""

    simulated: bool

    def count(self) -> int: ...

    def read(self) -> list[GpuReading]: ...

    def assign(self, gpu_index: int, pids: Sequence[int]) -> None: ...

    def close(self) -> None: ...


def _text(value: str | bytes) -> str:
    """Older pynvml releases return bytes for names; the rest of gpudeck wants str."""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _proc_name(pid: int) -> str | None:
    """The kernel's short name for pid; None when it is gone or in another pid namespace."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _plural(count: int) -> str:
    return f"{count} GPU" if count == 1 else f"{count} GPUs"


class EmptyBackend:
    """A node with no usable GPUs: it still joins the cluster and runs CPU jobs."""

    simulated = False

    def count(self) -> int:
        return 0

    def read(self) -> list[GpuReading]:
        return []

    def assign(self, gpu_index: int, pids: Sequence[int]) -> None:
        """Nothing to place on; the coordinator never grants GPUs of a zero-GPU node."""

    def close(self) -> None:
        """Holds no resources."""


@dataclass
class _Device:
    """What NVML told us once at start: handles and identity do not change while the driver runs."""

    handle: Any
    name: str
    uuid: str


class NvmlBackend:
    """Real GPUs through NVML.

    Cheap metrics are read on every poll; the process lists cost milliseconds each and hold a
    driver lock, so they and the error counters (gpudeck.agent.health) are refreshed at most every
    `process_interval` seconds and reused between. Xid events are drained, without waiting, at every poll.
    `nvml` is the pynvml module; tests pass a stand-in because CI machines have no GPU.
    """

    simulated = False

    def __init__(
        self,
        nvml: Any = None,
        process_interval: float = DEFAULT_PROCESS_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if nvml is None:
            import pynvml
            nvml = pynvml
        self._nvml = nvml
        self._process_interval = process_interval
        self._clock = clock
        self._processes: list[tuple[GpuProcess, ...]] = []
        self._processes_at: float | None = None
        self._health: list[HealthCounters] = []
        self._judge = HealthJudge()
        self._closed = False
        nvml.nvmlInit()
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError:
            nvml.nvmlShutdown()
            raise
        self._devices = [self._open_device(index) for index in range(count)]
        self._index_of = {device.uuid: index for index, device in enumerate(self._devices) if device}
        self._events = self._watch_xids()

    def _optional(self, name: str, *args: Any) -> Any:
        """`_query` of a function older drivers' pynvml may lack (health counters, events)."""
        fn = getattr(self._nvml, name, None)
        return self._query(fn, *args) if fn is not None else None

    def _watch_xids(self) -> Any:
        """An NVML event set told of every GPU's critical Xid errors; None where events are unsupported."""
        events = self._optional("nvmlEventSetCreate")
        if events is not None:
            for device in filter(None, self._devices):
                self._query(self._nvml.nvmlDeviceRegisterEvents, device.handle,
                            self._nvml.nvmlEventTypeXidCriticalError, events)
        return events

    def _new_xids(self) -> dict[int, list[int]]:
        """Xid events since the last poll, by GPU index (a bounded number per poll)."""
        found: dict[int, list[int]] = {}
        for _ in range(64 if self._events is not None else 0):
            data = self._query(self._nvml.nvmlEventSetWait_v2, self._events, 0)  # a timeout: none are left
            if data is None:
                break
            index = self._index_of.get(_text(self._query(self._nvml.nvmlDeviceGetUUID, data.device) or ""))
            if index is not None:
                found.setdefault(index, []).append(int(data.eventData))
        return found

    def _health_counters(self, device: _Device | None) -> HealthCounters:
        if device is None:
            return HealthCounters()
        nvml, handle = self._nvml, device.handle
        ecc = self._optional("nvmlDeviceGetTotalEccErrors", handle,
                             getattr(nvml, "NVML_MEMORY_ERROR_TYPE_UNCORRECTED", 1),
                             getattr(nvml, "NVML_VOLATILE_ECC", 0))
        retired = [self._optional("nvmlDeviceGetRetiredPages", handle, getattr(nvml, cause, code)) for cause, code in (
            ("NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS", 0),
            ("NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR", 1))]
        pending = self._optional("nvmlDeviceGetRetiredPagesPendingStatus", handle)
        remap = self._optional("nvmlDeviceGetRemappedRows", handle)  # (correctable, uncorrectable, pending, failed)
        return HealthCounters(
            ecc_uncorrected=ecc,
            retired_pages=sum(len(pages) for pages in retired if pages is not None) if any(
                pages is not None for pages in retired) else None,
            retired_pending=pending == getattr(nvml, "NVML_FEATURE_ENABLED", 1) if pending is not None else None,
            remapped_rows=remap[1] if remap else None,
            remap_pending=bool(remap[2]) if remap else None,
            remap_failed=bool(remap[3]) if remap else None,
        )

    def _query(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call one NVML function; an error (unsupported, GPU lost, …) means "not available"."""
        try:
            return fn(*args)
        except self._nvml.NVMLError:
            return None

    def _open_device(self, index: int) -> _Device | None:
        handle = self._query(self._nvml.nvmlDeviceGetHandleByIndex, index)
        if handle is None:
            return None
        name = self._query(self._nvml.nvmlDeviceGetName, handle)
        gpu_uuid = self._query(self._nvml.nvmlDeviceGetUUID, handle)
        return _Device(handle, _text(name or ""), _text(gpu_uuid or ""))

    @property
    def names(self) -> list[str]:
        """Device names for the startup log line; "unavailable" for a GPU NVML could not open."""
        return [device.name if device else "unavailable" for device in self._devices]

    def count(self) -> int:
        return len(self._devices)

    def read(self) -> list[GpuReading]:
        """Sample every GPU; blocking (NVML is synchronous), so the agent runs it in a thread."""
        processes = self._current_processes()
        xids = self._new_xids()
        return [
            with_health(self._read_device(index, device, processes[index]), self._judge,
                        replace(self._health[index], xids=tuple(xids.get(index, ()))))
            for index, device in enumerate(self._devices)
        ]

    def _read_device(
        self, index: int, device: _Device | None, processes: tuple[GpuProcess, ...]
    ) -> GpuReading:
        if device is None:
            return GpuReading(index, "unavailable", "", None, None, None, None, None, None, ())
        nvml, handle = self._nvml, device.handle
        memory = self._query(nvml.nvmlDeviceGetMemoryInfo, handle)
        rates = self._query(nvml.nvmlDeviceGetUtilizationRates, handle)
        power = self._query(nvml.nvmlDeviceGetPowerUsage, handle)
        limit = self._query(nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        energy = self._query(nvml.nvmlDeviceGetTotalEnergyConsumption, handle)  # Volta and newer
        return GpuReading(
            index=index,
            name=device.name,
            uuid=device.uuid,
            memory_total=memory.total if memory is not None else None,
            memory_used=memory.used if memory is not None else None,
            utilization=rates.gpu if rates is not None else None,
            temperature=self._query(
                nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU
            ),
            power=power / 1000 if power is not None else None,
            power_limit=limit / 1000 if limit is not None else None,
            processes=processes,
            energy_mj=energy,
        )

    def _current_processes(self) -> list[tuple[GpuProcess, ...]]:
        now = self._clock()
        if self._processes_at is None or now - self._processes_at >= self._process_interval:
            self._processes = [self._list_processes(device) for device in self._devices]
            self._health = [self._health_counters(device) for device in self._devices]
            self._processes_at = now
        return self._processes

    def _list_processes(self, device: _Device | None) -> tuple[GpuProcess, ...]:
        """Compute and graphics contexts merged by pid: a process may hold both on one GPU."""
        if device is None:
            return ()
        memory_by_pid: dict[int, int | None] = {}
        for fn in (
            self._nvml.nvmlDeviceGetComputeRunningProcesses,
            self._nvml.nvmlDeviceGetGraphicsRunningProcesses,
        ):
            for info in self._query(fn, device.handle) or ():
                known = memory_by_pid.get(info.pid)
                used = info.usedGpuMemory
                memory_by_pid[info.pid] = used if known is None else max(known, used or 0)
        return tuple(
            GpuProcess(pid, self._process_name(pid), used) for pid, used in memory_by_pid.items()
        )

    def _process_name(self, pid: int) -> str:
        """/proc first (free); NVML only for pids this namespace cannot see, as in containers."""
        name = _proc_name(pid)
        if name is None:
            name = _text(self._query(self._nvml.nvmlSystemGetProcessName, pid) or "")
        return name

    def assign(self, gpu_index: int, pids: Sequence[int]) -> None:
        """Real GPUs report their own processes; placement needs no bookkeeping here."""

    def close(self) -> None:
        """Release NVML once: overlapping shutdown paths must not unbalance nvmlInit."""
        if not self._closed:
            self._closed = True
            if self._events is not None:
                self._query(self._nvml.nvmlEventSetFree, self._events)
            self._query(self._nvml.nvmlShutdown)


@dataclass
class _SimGpu:
    """Mutable state of one simulated GPU, advanced one step per read."""

    temperature: float
    power: float
    utilization: int = 0
    pids: tuple[int, ...] = ()
    energy_mj: float = 0.0


def _tree_ticks(roots: set[int]) -> dict[int, int]:
    """CPU time (clock ticks) of each live root process and its descendants, with the children they
    have already reaped; one scan of /proc for all of them."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                text = stat.read()
        except OSError:
            continue
        fields = text[text.rfind(b")") + 2:].split()  # the name in parentheses may hold spaces
        pid = int(entry)
        parents[pid] = int(fields[1])
        ticks[pid] = sum(int(value) for value in fields[11:15])  # utime, stime, cutime, cstime
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    totals = {}
    for root in roots & ticks.keys():
        total, todo = 0, [root]
        while todo:
            pid = todo.pop()
            total += ticks[pid]
            todo += children.get(pid, [])
        totals[root] = total
    return totals


class _CpuUse:
    """Which of the processes given simulated GPUs have been quiet (under SIM_QUIET_CPU of a core,
    with their children) over the last measurement, taken at most every `interval` seconds. A
    process not yet measured twice is not quiet."""

    def __init__(self, interval: float, clock: Callable[[], float]) -> None:
        self._interval = interval
        self._clock = clock
        self._last: dict[int, tuple[float, int]] = {}
        self._measured_at: float | None = None
        self.quiet: set[int] = set()

    def update(self, roots: set[int]) -> set[int]:
        now = self._clock()
        if self._measured_at is not None and now - self._measured_at < self._interval:
            return self.quiet
        self._measured_at = now
        ticks = _tree_ticks(roots) if roots else {}
        quiet = set()
        for root, count in ticks.items():
            before = self._last.get(root)
            if before is not None and now > before[0]:
                if (count - before[1]) / CLOCK_TICKS / (now - before[0]) < SIM_QUIET_CPU:
                    quiet.add(root)
        self._last = {root: (now, count) for root, count in ticks.items()}
        self.quiet = quiet
        return quiet


class SimulatedBackend:
    """Plausible GPUs for trying gpudeck without hardware: idle until a job is assigned, then busy
    while the job's processes compute (a job that only sleeps leaves them at 0 %, see SIM_QUIET_CPU).

    Readings are marked by the "SIM-" uuid prefix and `simulated`, so no screen can mistake them for
    real hardware. `seed` makes the random walk reproducible for tests; the uuid stays unique per
    instance so two simulated agents never collide in the coordinator's registry. The energy counter
    grows by the simulated power over `clock` time between reads.
    """

    simulated = True

    def __init__(self, n: int, seed: int | None = None, clock: Callable[[], float] = time.monotonic,
                 cpu_interval: float = SIM_CPU_INTERVAL, injected: Path | None = None) -> None:
        """`injected`: the file of faults and outside processes to inject (gpudeck.agent.health.Injected)."""
        self._injected = Injected(injected)
        self._judge = HealthJudge()
        self._rng = random.Random(seed)
        self._id = uuid.uuid4().hex[:8]
        self._lock = threading.Lock()
        self._clock = clock
        self._read_at: float | None = None
        self._cpu = _CpuUse(cpu_interval, clock)
        self._gpus = [
            _SimGpu(self._jitter(SIM_IDLE_TEMPERATURE, 0.5), self._jitter(SIM_IDLE_POWER, 1.0))
            for _ in range(n)
        ]

    def _jitter(self, value: float, spread: float) -> float:
        return value + self._rng.uniform(-spread, spread)

    def count(self) -> int:
        return len(self._gpus)

    def assign(self, gpu_index: int, pids: Sequence[int]) -> None:
        """Called from the event loop thread when the job runner places or releases a job."""
        if not 0 <= gpu_index < len(self._gpus):
            raise IndexError(f"no simulated GPU {gpu_index} (have {len(self._gpus)})")
        with self._lock:
            gpu = self._gpus[gpu_index]
            if pids and not gpu.pids:
                gpu.utilization = self._rng.randint(*SIM_UTILIZATION_RANGE)
            gpu.pids = tuple(pids)

    def read(self) -> list[GpuReading]:
        """Measure the assigned processes' CPU use (outside the lock: it scans /proc), advance
        every GPU one step under the lock, then resolve process names outside it."""
        quiet = self._cpu.update({pid for gpu in self._gpus for pid in gpu.pids})
        now = self._clock()
        with self._lock:
            elapsed = 0.0 if self._read_at is None else max(0.0, now - self._read_at)
            self._read_at = now
            steps = [self._step(index, gpu, quiet, elapsed) for index, gpu in enumerate(self._gpus)]
        health = self._injected.read()
        return [with_health(self._reading(*step, self._injected.processes.get(step[0], [])), self._judge,
                            health.get(step[0], HealthCounters())) for step in steps]

    def _step(self, index: int, gpu: _SimGpu, quiet: set[int], elapsed: float) -> tuple[int, _SimGpu, int]:
        held = bool(gpu.pids)
        computing = held and not set(gpu.pids) <= quiet
        target_temperature = SIM_BUSY_TEMPERATURE if computing else SIM_IDLE_TEMPERATURE
        target_power = SIM_BUSY_POWER if computing else SIM_IDLE_POWER
        gpu.temperature += (target_temperature - gpu.temperature) * SIM_APPROACH
        gpu.power += (target_power - gpu.power) * SIM_APPROACH
        gpu.energy_mj += gpu.power * elapsed * 1000
        if computing:
            low, high = SIM_UTILIZATION_RANGE
            gpu.utilization = min(high, max(low, gpu.utilization + self._rng.randint(-8, 8)))
        else:
            gpu.utilization = 0
        memory_used = SIM_BUSY_MEMORY + self._rng.randint(-64 * MIB, 64 * MIB) if held else 0
        snapshot = _SimGpu(
            temperature=self._jitter(gpu.temperature, 0.5),
            power=self._jitter(gpu.power, 2.0),
            utilization=gpu.utilization,
            pids=gpu.pids,
            energy_mj=gpu.energy_mj,
        )
        return index, snapshot, memory_used

    def _reading(self, index: int, gpu: _SimGpu, memory_used: int, outside: Sequence[int] = ()) -> GpuReading:
        share = memory_used // len(gpu.pids) if gpu.pids else 0
        processes = tuple(GpuProcess(pid, _proc_name(pid) or "", share) for pid in gpu.pids)
        processes += tuple(GpuProcess(pid, name, SIM_OUTSIDE_MEMORY) for pid in outside if (name := _proc_name(pid)))
        return GpuReading(
            index=index,
            name="Simulated GPU",
            uuid=f"SIM-{self._id}-{index}",
            memory_total=SIM_MEMORY_TOTAL,
            memory_used=memory_used,
            utilization=gpu.utilization,
            temperature=round(gpu.temperature),
            power=round(gpu.power, 1),
            power_limit=SIM_POWER_LIMIT,
            processes=processes,
            energy_mj=int(gpu.energy_mj),
        )

    def close(self) -> None:
        """Holds no resources."""


def with_health(reading: GpuReading, judge: HealthJudge, counters: HealthCounters) -> GpuReading:
    """The reading with the GPU's error counts and its faults as `judge` sees them."""
    return replace(reading, ecc_uncorrected=counters.ecc_uncorrected, retired_pages=counters.retired_pages,
                   remapped_rows=counters.remapped_rows, faults=judge.faults(reading.index, counters))


def _no_gpus(reason: str) -> str:
    return f"no NVIDIA GPUs found ({reason}); running with zero GPUs — {SIMULATE_HINT}"


def _open_nvml(nvml: Any = None) -> tuple[GpuBackend, str]:
    """NVML if it loads and sees GPUs, else the empty backend with a line that says how to go on."""
    if nvml is None:
        import pynvml
        nvml = pynvml
    try:
        backend = NvmlBackend(nvml)
    except nvml.NVMLError as error:
        reason = str(error).removeprefix("NVML ")
        return EmptyBackend(), _no_gpus(f"NVML: {reason}")
    if backend.count() == 0:
        backend.close()
        return EmptyBackend(), _no_gpus("NVML sees 0 devices")
    models = ", ".join(dict.fromkeys(backend.names))
    return backend, f"NVML: {_plural(backend.count())} ({models})"


def open_backend(simulate: int | None, injected: Path | None = None) -> tuple[GpuBackend, str]:
    """simulate=N>0: SimulatedBackend(N), with faults and outside processes from the file `injected`.
    Otherwise try NVML; on pynvml.NVMLError (no driver or library) return an empty backend with zero
    GPUs. The str is one line for the agent's log saying what was found, so an operator sees at a
    glance whether the node's GPUs are real."""
    if simulate is not None and simulate > 0:
        return (
            SimulatedBackend(simulate, injected=injected),
            f"simulated: {_plural(simulate)} (no real hardware; shown as SIM everywhere)",
        )
    return _open_nvml()
