"""What goes back to the coordinator of this node's attempts: their logs, traffic and outputs.

Logs go in chunks from where the coordinator's copy ends (it says so after each connect, see
`resume_logs`); traffic as the totals the sink holds; outputs are kept on this node (see
`outputs`) and only their listing is sent, each file read back when someone downloads it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path
from typing import Awaitable, Callable, Iterable, Mapping

from gpudeck.agent.accounts import chown_tree
from gpudeck.agent.attempts import RunningJob
from gpudeck.agent.outputs import OutputKeeper
from gpudeck.agent.preparation import OUTPUT_DIR
from gpudeck.agent.traffic_sink import TrafficSink
from gpudeck.protocol.messages import Message
from gpudeck.protocol.node_messages import LogChunk, OutputChunk, Outputs, SendOutput, Traffic
from gpudeck.protocol.payloads import OutputFile
from gpudeck.protocol.rank_end import open_left

log = logging.getLogger(__name__)
LOG_CHUNK = 64 * 1024
LOG_RESUME_WAIT = 5.0

Send = Callable[[Message], Awaitable[bool]]


class Shipper:
    """One per agent: the logs' resume point is the connection's, not an attempt's."""

    def __init__(self, node: str, send: Send, sink: TrafficSink, outputs: OutputKeeper,
                 run_as_owner: bool = False) -> None:
        self.node = node
        self.send = send
        self.sink = sink
        self.outputs = outputs
        self.run_as_owner = run_as_owner  # see accounts
        # Set once the coordinator said how much of each log it has; logs wait for it after a connect.
        self.logs_resumed = asyncio.Event()

    async def ship_ended(self, job: RunningJob) -> None:
        """Everything of an attempt that has ended: its outputs, its last traffic, the rest of its logs."""
        self.sink.drain()
        await self.keep_outputs(job)
        await self.ship_traffic(job)
        try:
            await asyncio.wait_for(self.logs_resumed.wait(), LOG_RESUME_WAIT)
        except asyncio.TimeoutError:
            pass  # not connected: the logs go from the start once it is
        await self.ship_logs(job)

    async def keep_outputs(self, job: RunningJob) -> None:
        """Keep what the attempt wrote to $GPUDECK_OUTPUT_DIR, drop the rest of its working copy, and
        tell the coordinator what is kept (and what older outputs the keeper let go)."""
        work = job.path / "work"
        try:
            files = await asyncio.to_thread(self._keep, job, (work if work.is_dir() else job.path) / OUTPUT_DIR)
        except OSError as exc:
            log.warning("job %d attempt %d: could not keep its outputs (%s)", job.job, job.attempt, exc.strerror)
            files = []
        await asyncio.to_thread(shutil.rmtree, work, True)
        if files:
            await self.send(Outputs(job=job.job, attempt=job.attempt, files=files))
        try:
            await self.prune_outputs()
        except OSError as exc:
            log.warning("could not remove old outputs (%s)", exc.strerror)

    def _keep(self, job: RunningJob, written: Path) -> list[OutputFile]:
        """Under --run-as-owner the agent first takes the outputs back from the job's account: what a
        download reads later must not be the job's to change (a file swapped for a link meanwhile)."""
        if self.run_as_owner and written.is_dir() and not written.is_symlink():
            chown_tree(written, os.geteuid(), os.getegid())
        return self.outputs.keep(job.job, job.attempt, written)

    async def report_outputs(self) -> None:
        """After a register: every kept attempt's outputs (the coordinator forgot what it knew of
        this node's, so outputs removed while it was away are not named any more)."""
        for job_id, attempt in self.outputs.held():
            files = self.outputs.listing(job_id, attempt)
            if files and not await self.send(Outputs(job=job_id, attempt=attempt, files=files)):
                return

    async def prune_outputs(self) -> None:
        for job_id, attempt in await asyncio.to_thread(self.outputs.prune):
            log.info("job %d attempt %d: its kept outputs were removed (past their time or space)", job_id, attempt)
            await self.send(Outputs(job=job_id, attempt=attempt, files=[]))

    async def send_output(self, order: SendOutput) -> None:
        try:
            data, size = self.outputs.read(order.job, order.attempt, order.path, order.offset)
        except (LookupError, OSError) as exc:
            await self.send(OutputChunk(ticket=order.ticket, data=b"", size=0,
                                        error=str(exc) if isinstance(exc, LookupError) else
                                        f"{self.node} could not read {order.path}: {exc.strerror}"))
            return
        await self.send(OutputChunk(ticket=order.ticket, data=data, size=size, error=""))

    def reconnected(self, jobs: Iterable[RunningJob]) -> None:
        """A new connection: the coordinator may have missed chunks, and says which (`resume_logs`)."""
        self.logs_resumed.clear()
        for job in jobs:
            job.sent_offsets.clear()

    def resume_logs(self, jobs: Mapping[tuple[int, int], RunningJob], sizes: dict[str, dict[int, int]]) -> None:
        """Continue each log where the coordinator's copy ends (a chunk sent twice would only land on
        the same bytes, but resending whole logs after every reconnect is a flood)."""
        for key, ranks in sizes.items():
            job_id, _, attempt = key.partition(":")
            job = jobs.get((int(job_id), int(attempt))) if job_id.isdigit() and attempt.isdigit() else None
            if job is not None:
                job.sent_offsets = dict(ranks)
        self.logs_resumed.set()

    async def ship_logs(self, job: RunningJob) -> None:
        for rank, path in job.log_files().items():
            offset = job.sent_offsets.get(rank, 0)
            try:
                with open(open_left(path), "rb") as handle:  # a link the job put there is not followed
                    handle.seek(offset)
                    while data := handle.read(LOG_CHUNK):
                        if not await self.send(LogChunk(job=job.job, attempt=job.attempt, rank=rank,
                                                        offset=offset, data=data)):
                            return
                        offset += len(data)
                        job.sent_offsets[rank] = offset
            except OSError:  # gone, or not a plain file
                continue

    async def ship_traffic(self, job: RunningJob) -> None:
        totals, sync = self.sink.totals(job.job, job.attempt), self.sink.sync(job.job, job.attempt)
        if totals or sync:
            await self.send(Traffic(job=job.job, attempt=job.attempt, by_rank=totals, sync=sync))

    async def ship_all(self, jobs: Iterable[RunningJob]) -> None:
        for job in list(jobs):
            if self.logs_resumed.is_set():
                await self.ship_logs(job)
            if job.exit_code is None:
                await self.ship_traffic(job)
