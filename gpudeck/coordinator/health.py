"""Cordoned GPUs: one faulty GPU kept out of the schedule, not its whole node.

Agents name each GPU's faults in its readings (gpudeck.agent.health). The first time a reading
shows a fault that is neither the cause of a cordon already nor one an admin cleared, that GPU is
cordoned: stored in SQLite (a restarted coordinator still keeps it out), shown with its cause in
`gpudeck nodes` and the dashboard, and never offered to a job until `gpudeck gpu uncordon
NODE:INDEX`. Uncordoning acknowledges the faults seen so far, so a GPU whose error count stays as it
was is not cordoned again at its next reading, while a new error is a new fault. A job running on the
GPU is left to finish or fail by itself: killing it would turn a recoverable warning into lost work.
An admin may also cordon a GPU by hand (`gpudeck gpu cordon`), for a flaky one the counters miss.

A cordon follows the GPU, by UUID: when the GPU at that index has another UUID (it was replaced),
the record is dropped.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from gpudeck.coordinator.store import CordonRow, Store
from gpudeck.protocol.payloads import GpuReading

log = logging.getLogger(__name__)
MAX_ACKNOWLEDGED = 64  # faults remembered per GPU; the oldest go first


class GpuHealth:
    def __init__(self, store: Store) -> None:
        self.store = store

    def observe(self, node: str, gpus: list[GpuReading], now: float) -> bool:
        """Cordon the GPUs of `node` that report a new fault; True when any was cordoned."""
        cordoned = False
        records = self.store.cordons()
        for gpu in gpus:
            record = records.get((node, gpu.index))
            if record is not None and gpu.uuid and record.uuid and record.uuid != gpu.uuid:
                self.store.remove_cordon(node, gpu.index)
                log.info("GPU %d of node %s was replaced: its cordon record is dropped", gpu.index, node)
                record = None
            if record is not None and record.cordoned:
                continue
            seen = record.acknowledged if record else ()
            new = tuple(fault for fault in gpu.faults if fault not in seen)
            if new:
                self.store.set_cordon(CordonRow(node, gpu.index, gpu.uuid, new, now, True, seen))
                log.warning("GPU %d of node %s is cordoned: %s", gpu.index, node, "; ".join(new))
                cordoned = True
        return cordoned

    def cordon(self, node: str, gpu: GpuReading, why: str, now: float) -> CordonRow:
        """An admin's cordon of one GPU."""
        record = self.store.cordons().get((node, gpu.index))
        if record is not None and record.cordoned:
            raise ValueError(f"GPU {gpu.index} of node {node} is already cordoned: {record.cause}")
        row = CordonRow(node, gpu.index, gpu.uuid, (why,), now, True, record.acknowledged if record else ())
        self.store.set_cordon(row)
        log.info("GPU %d of node %s is cordoned: %s", gpu.index, node, why)
        return row

    def uncordon(self, node: str, gpu: GpuReading | None, index: int) -> CordonRow:
        """Offer the GPU again; the faults it shows now are acknowledged."""
        record = self.store.cordons().get((node, index))
        if record is None or not record.cordoned:
            raise ValueError(f"GPU {index} of node {node} is not cordoned")
        current = gpu.faults if gpu is not None else ()
        acknowledged = tuple(dict.fromkeys((*record.acknowledged, *record.faults, *current)))[-MAX_ACKNOWLEDGED:]
        row = replace(record, cordoned=False, acknowledged=acknowledged)
        self.store.set_cordon(row)
        log.info("GPU %d of node %s is uncordoned", index, node)
        return row
