"""GPU backends: the simulated backend for real, NVML through a stand-in module.

This machine has no GPU, so the NVML backend's error handling is driven by a fake shaped like
pynvml that raises the real pynvml exception classes; everything else uses the real code paths.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from gpudeck.agent.gpus import (
    GIB,
    EmptyBackend,
    GpuProcess,
    GpuReading,
    NvmlBackend,
    SimulatedBackend,
    _open_nvml,
    open_backend,
)
from gpudeck.protocol.messages import decode
from gpudeck.protocol.node_messages import Telemetry
from tests.cluster import wait_until

WIRE_FIELDS = {
    "index",
    "name",
    "uuid",
    "memory_total",
    "memory_used",
    "utilization",
    "temperature",
    "power",
    "power_limit",
    "processes",
    "energy_mj",
    "ecc_uncorrected",
    "retired_pages",
    "remapped_rows",
    "faults",
}
MISSING_PID = 99_999_999  # above any Linux pid_max, so /proc has no entry for it


# --- simulated backend -------------------------------------------------------------------------


def read_many(backend: SimulatedBackend, times: int) -> list[list[GpuReading]]:
    return [backend.read() for _ in range(times)]


def test_simulated_idle_gpus_look_idle() -> None:
    backend = SimulatedBackend(4, seed=1)
    assert backend.simulated and backend.count() == 4
    for readings in read_many(backend, 20):
        assert [r.index for r in readings] == [0, 1, 2, 3]
        for r in readings:
            assert r.name == "Simulated GPU"
            assert r.uuid.startswith("SIM-") and r.uuid.endswith(f"-{r.index}")
            assert r.memory_total == 80 * GIB and r.power_limit == 700.0
            assert r.utilization == 0 and r.memory_used == 0 and r.processes == ()
            assert r.temperature is not None and r.power is not None
            assert 33 <= r.temperature <= 37
            assert 55 <= r.power <= 65


def test_simulated_uuid_stable_per_instance_and_unique_across_instances() -> None:
    first, second = SimulatedBackend(2, seed=7), SimulatedBackend(2, seed=7)
    uuids = [r.uuid for r in first.read()]
    assert uuids == [r.uuid for r in first.read()]
    assert len(set(uuids)) == 2
    assert set(uuids).isdisjoint(r.uuid for r in second.read())


def test_simulated_assigned_gpu_gets_busy_within_bounds() -> None:
    backend = SimulatedBackend(2, seed=3)
    backend.assign(1, [os.getpid()])
    history = read_many(backend, 60)
    for readings in history:
        idle, busy = readings
        assert idle.utilization == 0 and idle.processes == ()
        assert busy.utilization is not None and busy.memory_used is not None and busy.memory_total is not None
        assert busy.temperature is not None and busy.power is not None
        assert 60 <= busy.utilization <= 100
        assert 17 * GIB < busy.memory_used < 19 * GIB <= busy.memory_total
        assert 30 <= busy.temperature <= 72 and 55 <= busy.power <= 455
    final = history[-1][1]
    assert final.temperature is not None and final.power is not None
    assert final.temperature >= 68 and final.power >= 440
    assert len({readings[1].utilization for readings in history}) > 1, "utilization should move"


def test_simulated_processes_follow_assign_and_release() -> None:
    backend = SimulatedBackend(1, seed=5)
    me = os.getpid()
    backend.assign(0, [me, MISSING_PID])
    (reading,) = backend.read()
    assert [p.pid for p in reading.processes] == [me, MISSING_PID]
    own, missing = reading.processes
    assert own.name == open(f"/proc/{me}/comm").read().strip()
    assert missing.name == ""
    assert reading.memory_used is not None
    assert own.memory_used == missing.memory_used == reading.memory_used // 2

    backend.assign(0, [])
    history = read_many(backend, 40)
    assert all(r.processes == () and r.utilization == 0 for (r,) in history)
    assert history[-1][0].temperature is not None and history[-1][0].power is not None
    assert history[-1][0].temperature <= 37 and history[-1][0].power <= 65


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _child_of(parent: int) -> int | None:
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1]) == parent:
                return int(entry)
        except OSError:
            continue
    return None


def _wait(predicate: Any, what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_simulated_gpu_follows_the_cpu_use_of_its_job() -> None:
    """A job that sleeps holds its GPU at 0 % (its memory still held); one whose child computes is busy."""
    clock = Clock()
    backend = SimulatedBackend(2, seed=4, clock=clock, cpu_interval=5.0)
    sleeper = subprocess.Popen(["sleep", "600"])
    spinner = subprocess.Popen(["/bin/sh", "-c", f"{sys.executable} -c 'while True: pass'; :"])
    child = None
    try:
        backend.assign(0, [sleeper.pid])
        backend.assign(1, [spinner.pid])
        child = _wait(lambda: _child_of(spinner.pid), "the shell's child")
        first = backend.read()
        assert all(r.utilization is not None and 60 <= r.utilization <= 100 for r in first), \
            "not measured yet: busy, as before"
        _wait(lambda: _cpu_seconds(child) >= 0.5, "the child to compute for half a second")
        clock.now += 5.0
        idle, busy = backend.read()
        assert idle.memory_used is not None and busy.utilization is not None
        assert idle.utilization == 0 and 17 * GIB < idle.memory_used < 19 * GIB
        assert [p.pid for p in idle.processes] == [sleeper.pid]
        assert 60 <= busy.utilization <= 100, "the shell's child computes"
        clock.now += 1.0
        assert backend.read()[0].utilization == 0, "between measurements the last one holds"
    finally:
        if child is not None:
            os.kill(child, signal.SIGKILL)
        for process in (sleeper, spinner):
            process.kill()
            process.wait()


def test_a_simulated_energy_counter_grows_by_power_over_time() -> None:
    clock = Clock()
    backend = SimulatedBackend(1, seed=6, clock=clock)
    (start,) = backend.read()
    assert start.energy_mj == 0
    clock.now += 10.0
    (later,) = backend.read()
    assert later.energy_mj is not None
    assert 55 * 10 * 1000 <= later.energy_mj <= 65 * 10 * 1000, "about 60 W idle for 10 s"
    (again,) = backend.read()
    assert again.energy_mj == later.energy_mj, "no time passed, no energy"


def test_simulated_assign_rejects_unknown_gpu() -> None:
    with pytest.raises(IndexError):
        SimulatedBackend(2).assign(2, [1])


def test_simulated_assign_and_read_from_different_threads() -> None:
    backend = SimulatedBackend(8, seed=11)
    stop = threading.Event()
    seen: list[int] = []

    def reader() -> None:
        while not stop.is_set():
            seen.extend(len(r.processes) for r in backend.read())

    thread = threading.Thread(target=reader)
    thread.start()
    for round_ in range(200):
        backend.assign(round_ % 8, [MISSING_PID, MISSING_PID - 1][: round_ % 3])
    stop.set()
    thread.join()
    assert seen and set(seen) <= {0, 1, 2}


# --- wire format and the other backends --------------------------------------------------------


def test_a_reading_on_the_wire_has_exactly_the_field_names() -> None:
    reading = GpuReading(
        index=0,
        name="n",
        uuid="u",
        memory_total=1,
        memory_used=None,
        utilization=5,
        temperature=None,
        power=1.5,
        power_limit=None,
        processes=(GpuProcess(12, "python", None),),
    )
    (wire,) = Telemetry(gpus=[reading]).to_wire()["gpus"]
    assert set(wire) == WIRE_FIELDS == {f.name for f in fields(GpuReading)}
    assert wire["processes"] == [{"pid": 12, "name": "python", "memory_used": None, "foreign": False, "since": None}]
    assert wire["memory_used"] is None and wire["power"] == 1.5


def test_a_simulated_reading_goes_on_the_wire_as_plain_data() -> None:
    backend = SimulatedBackend(1, seed=2)
    backend.assign(0, [os.getpid()])
    wire = Telemetry(gpus=backend.read()).to_wire()["gpus"][0]
    assert isinstance(wire["processes"], list) and isinstance(wire["processes"][0], dict)
    message = decode(Telemetry(gpus=backend.read()).to_wire())
    assert isinstance(message, Telemetry)
    assert message.gpus[0].processes[0].pid == os.getpid()


def test_empty_backend() -> None:
    backend = EmptyBackend()
    backend.assign(0, [1])
    assert (backend.simulated, backend.count(), backend.read()) == (False, 0, [])
    backend.close()


def test_open_backend_without_gpus_runs_with_zero() -> None:
    backend, message = open_backend(None)
    assert backend.count() == 0 and backend.read() == [] and not backend.simulated
    assert "--simulate-gpus" in message and "Library Not Found" in message
    assert "\n" not in message
    backend.close()


def test_open_backend_zero_falls_back_to_nvml() -> None:
    backend, message = open_backend(0)
    assert backend.count() == 0 and "--simulate-gpus" in message


def test_open_backend_simulated() -> None:
    backend, message = open_backend(4)
    assert backend.simulated and backend.count() == 4
    assert message == "simulated: 4 GPUs (no real hardware; shown as SIM everywhere)"


# --- NVML backend through a pynvml-shaped stand-in ---------------------------------------------


class FakeNvml:
    """Just enough of pynvml: each GPU is a dict of metric -> value, or an exception to raise."""

    NVMLError = pynvml.NVMLError
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU

    def __init__(self, gpus: list[dict[str, Any] | Exception], init_error: Exception | None = None):
        self.gpus = gpus
        self.init_error = init_error
        self.calls: dict[str, int] = {}
        self.process_names = {MISSING_PID: b"trainer"}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def _metric(self, handle: int, key: str) -> Any:
        gpu = self.gpus[handle]
        assert isinstance(gpu, dict)
        value = gpu[key]
        if isinstance(value, Exception):
            raise value
        return value

    def nvmlInit(self) -> None:
        self._count("init")
        if self.init_error:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self._count("shutdown")

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._count("handle")
        gpu = self.gpus[index]
        if isinstance(gpu, Exception):
            raise gpu
        return index

    def nvmlDeviceGetName(self, handle: int) -> Any:
        return self._metric(handle, "name")

    def nvmlDeviceGetUUID(self, handle: int) -> Any:
        return self._metric(handle, "uuid")

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return self._metric(handle, "memory")

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return self._metric(handle, "utilization")

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._metric(handle, "temperature")

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return self._metric(handle, "power")

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: int) -> int:
        return self._metric(handle, "power_limit")

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:
        return self._metric(handle, "energy")

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Any]:
        self._count("processes")
        return self._metric(handle, "compute")

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: int) -> list[Any]:
        return self._metric(handle, "graphics")

    # Health: each GPU's dict may hold "ecc", "retired" (pages), "retired_pending", "remap" (a 4-tuple)
    # and "xids" (events waiting); a GPU without them reports nothing wrong.
    nvmlEventTypeXidCriticalError = pynvml.nvmlEventTypeXidCriticalError

    def nvmlEventSetCreate(self) -> str:
        return "events"

    def nvmlDeviceRegisterEvents(self, handle: int, types: int, events: str) -> None:
        assert types == pynvml.nvmlEventTypeXidCriticalError and events == "events"

    def nvmlEventSetWait_v2(self, events: str, timeout_ms: int) -> Any:
        assert timeout_ms == 0  # a poll must never block the telemetry loop
        for handle, gpu in enumerate(self.gpus):
            if isinstance(gpu, dict) and gpu.get("xids"):
                return SimpleNamespace(device=handle, eventData=gpu["xids"].pop(0))
        raise pynvml.NVMLError_Timeout()

    def nvmlEventSetFree(self, events: str) -> None:
        self._count("events_freed")

    def _health(self, handle: int, key: str, default: Any) -> Any:
        gpu = self.gpus[handle]
        value = gpu.get(key, default) if isinstance(gpu, dict) else default
        if isinstance(value, Exception):
            raise value
        return value

    def nvmlDeviceGetTotalEccErrors(self, handle: int, error_type: int, counter: int) -> int:
        assert (error_type, counter) == (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC)
        return self._health(handle, "ecc", 0)

    def nvmlDeviceGetRetiredPages(self, handle: int, cause: int) -> list[int]:
        pages = self._health(handle, "retired", [])
        return pages if cause == pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR else []

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: int) -> int:
        return self._health(handle, "retired_pending", pynvml.NVML_FEATURE_DISABLED)

    def nvmlDeviceGetRemappedRows(self, handle: int) -> tuple[int, int, int, int]:
        return self._health(handle, "remap", (0, 0, 0, 0))

    def nvmlSystemGetProcessName(self, pid: int) -> bytes:
        if pid not in self.process_names:
            raise pynvml.NVMLError_NotFound()
        return self.process_names[pid]


def proc(pid: int, used: int | None) -> SimpleNamespace:
    return SimpleNamespace(pid=pid, usedGpuMemory=used)


def healthy_gpu(**overrides: Any) -> dict[str, Any]:
    gpu = {
        "name": "NVIDIA H200",
        "uuid": "GPU-aaaa",
        "memory": SimpleNamespace(total=141 * GIB, used=10 * GIB, free=131 * GIB),
        "utilization": SimpleNamespace(gpu=87, memory=40),
        "temperature": 61,
        "power": 412_345,
        "power_limit": 700_000,
        "energy": 9_876_543_210,
        "compute": [],
        "graphics": [],
    }
    gpu.update(overrides)
    return gpu


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_nvml_reads_every_metric_and_converts_units() -> None:
    fake = FakeNvml([healthy_gpu(name=b"NVIDIA H200", uuid=b"GPU-bytes")])
    (reading,) = NvmlBackend(nvml=fake).read()
    assert reading == GpuReading(
        index=0,
        name="NVIDIA H200",
        uuid="GPU-bytes",
        memory_total=141 * GIB,
        memory_used=10 * GIB,
        utilization=87,
        temperature=61,
        power=412.345,
        power_limit=700.0,
        processes=(),
        energy_mj=9_876_543_210,
        ecc_uncorrected=0,
        retired_pages=0,
        remapped_rows=0,
    )


def test_nvml_unsupported_metrics_become_none() -> None:
    fake = FakeNvml(
        [
            healthy_gpu(
                power=pynvml.NVMLError_NotSupported(),
                temperature=pynvml.NVMLError_NotSupported(),
                utilization=pynvml.NVMLError_NoPermission(),
                energy=pynvml.NVMLError_NotSupported(),
            ),
            healthy_gpu(
                memory=pynvml.NVMLError_GpuIsLost(), power_limit=pynvml.NVMLError_Unknown()
            ),
        ]
    )
    first, second = NvmlBackend(nvml=fake).read()
    assert (first.power, first.temperature, first.utilization, first.energy_mj) == (None, None, None, None)
    assert first.memory_used == 10 * GIB and first.power_limit == 700.0
    assert (second.memory_total, second.memory_used, second.power_limit) == (None, None, None)
    assert second.utilization == 87 and second.temperature == 61 and second.power == 412.345


def test_nvml_gpu_whose_handle_fails_is_unavailable() -> None:
    fake = FakeNvml([pynvml.NVMLError_GpuIsLost(), healthy_gpu()])
    backend = NvmlBackend(nvml=fake)
    lost, good = backend.read()
    assert backend.count() == 2
    assert lost == GpuReading(0, "unavailable", "", None, None, None, None, None, None, ())
    assert good.name == "NVIDIA H200" and good.utilization == 87
    assert backend.names == ["unavailable", "NVIDIA H200"]


def test_nvml_handles_fetched_once() -> None:
    fake = FakeNvml([healthy_gpu(), healthy_gpu()])
    backend = NvmlBackend(nvml=fake)
    for _ in range(5):
        backend.read()
    assert fake.calls["handle"] == 2 and fake.calls["init"] == 1


def test_nvml_processes_merged_by_pid_with_names() -> None:
    me = os.getpid()
    fake = FakeNvml(
        [
            healthy_gpu(
                compute=[proc(me, 3 * GIB), proc(MISSING_PID, None)],
                graphics=[
                    proc(me, 1 * GIB),
                    proc(MISSING_PID, 2 * GIB),
                    proc(MISSING_PID - 1, None),
                ],
            ),
            healthy_gpu(compute=pynvml.NVMLError_NotSupported(), graphics=[proc(me, None)]),
        ]
    )
    first, second = NvmlBackend(nvml=fake).read()
    comm = open(f"/proc/{me}/comm").read().strip()
    assert first.processes == (
        GpuProcess(me, comm, 3 * GIB),
        GpuProcess(MISSING_PID, "trainer", 2 * GIB),
        GpuProcess(MISSING_PID - 1, "", None),
    )
    assert second.processes == (GpuProcess(me, comm, None),)


def test_nvml_process_list_refreshes_only_after_interval() -> None:
    clock = Clock()
    gpu = healthy_gpu(compute=[proc(1, GIB)])
    fake = FakeNvml([gpu])
    backend = NvmlBackend(nvml=fake, process_interval=5.0, clock=clock)
    assert [p.pid for p in backend.read()[0].processes] == [1]
    gpu["compute"] = [proc(2, GIB)]
    clock.now += 4.9
    reading = backend.read()[0]
    assert [p.pid for p in reading.processes] == [1], "cached list reused"
    assert fake.calls["processes"] == 1
    clock.now += 0.1
    assert [p.pid for p in backend.read()[0].processes] == [2]
    assert fake.calls["processes"] == 2


def test_nvml_close_shuts_down_once() -> None:
    fake = FakeNvml([healthy_gpu()])
    backend = NvmlBackend(nvml=fake)
    backend.assign(0, [1])
    backend.close()
    backend.close()
    assert fake.calls["shutdown"] == 1


def test_open_nvml_reports_models() -> None:
    fake = FakeNvml([healthy_gpu(), healthy_gpu(), healthy_gpu(name="NVIDIA A100")])
    backend, message = _open_nvml(fake)
    assert isinstance(backend, NvmlBackend) and not backend.simulated
    assert message == "NVML: 3 GPUs (NVIDIA H200, NVIDIA A100)"


def test_open_nvml_driver_missing_gives_empty_backend() -> None:
    backend, message = _open_nvml(FakeNvml([], init_error=pynvml.NVMLError_DriverNotLoaded()))
    assert isinstance(backend, EmptyBackend)
    assert message.startswith("no NVIDIA GPUs found (NVML: Driver Not Loaded)")
    assert "--simulate-gpus N" in message


def test_open_nvml_zero_devices_releases_nvml() -> None:
    fake = FakeNvml([])
    backend, message = _open_nvml(fake)
    assert isinstance(backend, EmptyBackend) and "--simulate-gpus" in message
    assert fake.calls["shutdown"] == 1


# --- GPU health ---------------------------------------------------------------------------------


def test_nvml_health_of_a_sound_gpu_reads_zero_and_no_faults() -> None:
    reading = NvmlBackend(FakeNvml([healthy_gpu()])).read()[0]
    assert (reading.ecc_uncorrected, reading.retired_pages, reading.remapped_rows, reading.faults) == (0, 0, 0, ())


def test_nvml_fatal_xid_is_a_fault_kept_until_the_agent_restarts_and_a_harmless_one_is_not() -> None:
    fake = FakeNvml([healthy_gpu(xids=[13, 79]), healthy_gpu(uuid="GPU-bbbb")])
    backend = NvmlBackend(fake)
    first = backend.read()
    assert len(first[0].faults) == 1 and first[0].faults[0].startswith("Xid 79 at ")
    assert "fallen off the bus" in first[0].faults[0] and first[1].faults == ()
    assert backend.read()[0].faults == first[0].faults  # the event came once; the fault stays
    backend.close()
    assert fake.calls["events_freed"] == 1


def test_nvml_uncorrected_ecc_failed_remap_and_pending_retirement_are_faults() -> None:
    gpu = healthy_gpu(ecc=2, retired=[0x1000, 0x2000], retired_pending=pynvml.NVML_FEATURE_ENABLED, remap=(5, 1, 0, 1))
    reading = NvmlBackend(FakeNvml([gpu])).read()[0]
    assert (reading.ecc_uncorrected, reading.retired_pages, reading.remapped_rows) == (2, 2, 1)
    assert reading.faults == ("2 uncorrected ECC errors since the driver loaded",
                              "retired memory pages are waiting for a GPU reset", "a memory row remap failed")


def test_nvml_health_a_gpu_cannot_report_is_unknown_not_a_fault() -> None:
    unsupported = pynvml.NVMLError_NotSupported()
    gpu = healthy_gpu(ecc=unsupported, retired=unsupported, retired_pending=unsupported, remap=unsupported)
    reading = NvmlBackend(FakeNvml([gpu])).read()[0]
    assert (reading.ecc_uncorrected, reading.retired_pages, reading.remapped_rows,
            reading.faults) == (None, None, None, ())


def test_nvml_health_counters_refresh_with_the_process_list_not_every_poll() -> None:
    clock = Clock()
    gpu = healthy_gpu()
    fake = FakeNvml([gpu])
    backend = NvmlBackend(fake, process_interval=5.0, clock=clock)
    backend.read()
    gpu["ecc"] = 1
    assert backend.read()[0].ecc_uncorrected == 0
    clock.now += 5.0
    assert backend.read()[0].ecc_uncorrected == 1


def test_injected_faults_and_outside_processes_reach_simulated_readings(tmp_path) -> None:
    injected = tmp_path / "simulated-gpus"
    backend = SimulatedBackend(2, seed=1, injected=injected)
    assert all(r.faults == () for r in backend.read())
    outside = subprocess.Popen(["sleep", "300"])
    try:
        # Popen returns once the child is forked; until it has exec'd, /proc names it after this python.
        wait_until(lambda: Path(f"/proc/{outside.pid}/comm").read_text().strip() == "sleep", 30,
                   "the outside process to become sleep")
        injected.write_text(f"0 xid 79\n1 ecc 3\n1 process {outside.pid}\nnonsense line\n0 process notapid\n")
        first = backend.read()
        assert [f.split(":")[0][:6] for f in first[0].faults] == ["Xid 79"]
        assert first[1].faults == ("3 uncorrected ECC errors since the driver loaded",)
        assert [(p.pid, p.name) for p in first[1].processes] == [(outside.pid, "sleep")]
        injected.write_text(f"0 xid 79\n0 xid 79\n1 process {outside.pid}\n")  # a second event; ecc cleared
        second = backend.read()
        assert len(second[0].faults) == 2 and second[1].faults == ()
    finally:
        outside.kill()
        outside.wait()
