"""The job runner: the table of this node's attempts, from their launch to the coordinator's word
that it recorded their exit.

An attempt is prepared (`preparation`), started by the launcher its order asks for (`launchers`),
waited for, and finished: its GPUs freed, its exit recorded and reported, its logs, traffic and
outputs shipped (`shipping`). The agent waits on the ranks' recorders (pidfds: no polling, also for
those an earlier agent started), and when one rank fails it stops the others, as torchrun does.

The ranks outlive the agent: a restarted agent adopts them from the job directory. The runner keeps
each attempt until the coordinator says it recorded the exit (`forget`), so exits that happen while
the coordinator is away are reported when it is back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Awaitable, Callable

from gpudeck.agent import exits
from gpudeck.agent.attempts import RunningJob, load_job
from gpudeck.agent.containers import remove_container, stop_container
from gpudeck.agent.environments import Environments
from gpudeck.agent.gpus import GpuBackend
from gpudeck.agent.launchers import LaunchFailed, Site, launcher_for
from gpudeck.agent.outputs import OutputKeeper
from gpudeck.agent.overlay import write_overlay
from gpudeck.agent.preparation import PrepareFailed, Preparer, RunSetup
from gpudeck.agent.procs import wait_exit
from gpudeck.agent.projects import ContentFetcher, NodeCache
from gpudeck.agent.shipping import Shipper
from gpudeck.agent.traffic_sink import TrafficSink
from gpudeck.agent.warm import WarmPool
from gpudeck.config import ENVIRONMENTS_KEPT, NODE_CACHE_LIMIT
from gpudeck.protocol.messages import Message
from gpudeck.protocol.node_messages import JobExited, JobStarted, Launch
from gpudeck.protocol.payloads import JobReport

log = logging.getLogger(__name__)
KILL_GRACE = 5.0
POLL = 0.5
KEEP_FINISHED = 50

Send = Callable[[Message], Awaitable[bool]]


class JobRunner:
    def __init__(self, state_dir: Path, cluster: str, node: str, sink: TrafficSink, backend: GpuBackend,
                 send: Send, fetcher: ContentFetcher | None = None, outputs: OutputKeeper | None = None,
                 cache_space: int = NODE_CACHE_LIMIT, environments: int = ENVIRONMENTS_KEPT,
                 warm: WarmPool | None = None, run_as_owner: bool = False,
                 mdns_view: Callable[[], dict[str, list[str]]] | None = None) -> None:
        state_dir = state_dir.resolve()  # ranks run elsewhere: every path they are given is absolute
        self.root = state_dir / "jobs"
        self.environments = Environments(state_dir / "environments", environments)
        overlay = write_overlay(state_dir / "overlay")
        self.preparer = Preparer(node, NodeCache(state_dir / "cache", fetcher or ContentFetcher(send), cache_space),
                                 self.environments, overlay, state_dir / "checkpoints", send, run_as_owner)
        self.site = Site(node, cluster, overlay, sink.address, backend.simulated, warm, mdns_view)
        self.shipper = Shipper(node, send, sink, outputs or OutputKeeper(state_dir / "outputs"), run_as_owner)
        self.cluster = cluster
        self.node = node
        self.sink = sink
        self.backend = backend
        self.send = send
        self.jobs: dict[tuple[int, int], RunningJob] = {}
        self._preparing: dict[tuple[int, int], asyncio.Task[RunSetup]] = {}
        self._followers: set[asyncio.Task[None]] = set()

    # --- launching -----------------------------------------------------------------------------

    async def launch(self, order: Launch) -> None:
        """Prepare (the project's working copy, the environment) and start this node's part of an
        attempt. A kill that comes while it prepares stops it before anything starts."""
        key = (order.job, order.attempt)
        if key in self.jobs:
            log.info("job %d attempt %d is already here; repeated launch ignored", *key)
            held = self.jobs[key]
            if held.exit_code is None and held.pgid:
                await self.send(JobStarted(job=order.job, attempt=order.attempt, pid=held.pgid))
            return
        directory = self.root / f"{order.job}-{order.attempt}"
        job = RunningJob(self.node, order.job, order.attempt, order.node_rank, list(order.gpus), str(directory),
                         cluster=self.cluster)
        self.jobs[key] = job
        try:
            (directory / "logs").mkdir(parents=True, exist_ok=True)
            with open(directory / "launcher.log", "ab") as launcher_log:
                preparing = self._preparing[key] = asyncio.create_task(
                    self.preparer.prepare(order, job, launcher_log))
                try:
                    setup = await preparing
                finally:
                    self._preparing.pop(key, None)
        except asyncio.CancelledError:
            if not job.kill_reason:
                raise  # the agent is stopping
            await self._finish(job, 143, f"stopped before it started: {job.kill_reason}")
            return
        except OSError as exc:
            await self._finish(job, 1, f"could not write the job's directory {directory} on {self.node}: "
                                       f"{exc.strerror or exc}")
            return
        except PrepareFailed as exc:
            await self._finish(job, exc.code, exc.detail, retry=exc.retry)
            return
        if job.kill_reason:
            await self._finish(job, 143, f"stopped before it started: {job.kill_reason}")
            return
        if order.node_rank == 0 and _port_taken(order.master_port):
            await self._finish(job, 1, f"the rendezvous port {order.master_port} on {self.node} is in use by "
                                       "another program", retry=True)
            return
        await self._start(order, job, setup)

    async def _start(self, order: Launch, job: RunningJob, setup: RunSetup) -> None:
        self.sink.expect(order.job, order.attempt)
        try:
            process = await launcher_for(order, setup, self.site).start(order, job, setup)
        except LaunchFailed as exc:
            await self._finish(job, 127, str(exc))
            return
        await self._started(order, job, process)

    async def _started(self, order: Launch, job: RunningJob, process: asyncio.subprocess.Process | None = None) -> None:
        if job.kill_reason:  # killed while it was being started
            job.signal(signal.SIGTERM)
        try:
            job.save()
        except OSError as exc:
            log.warning("job %d attempt %d: could not save its record (%s); an agent restart will not adopt it",
                        order.job, order.attempt, exc.strerror)
        for index in job.gpus:
            self.backend.assign(index, [job.pgid])
        how = f", {job.forked} forked warm" if job.forked else ""
        log.info("job %d attempt %d: started node rank %d on GPUs %s (process group %d%s)", order.job, order.attempt,
                 order.node_rank, job.gpus, job.pgid, how)
        await self.send(JobStarted(job=order.job, attempt=order.attempt, pid=job.pgid))
        self._follow(job, process)

    # --- following and ending ------------------------------------------------------------------

    def _follow(self, job: RunningJob, process: asyncio.subprocess.Process | None = None) -> None:
        self._keep_task(self._wait(job, process))

    def _keep_task(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._followers.add(task)
        task.add_done_callback(self._followers.discard)

    async def _wait(self, job: RunningJob, process: asyncio.subprocess.Process | None) -> None:
        if job.ranks:
            await self._wait_ranks(job)
            ended = exits.ranks_outcome(job.path, job.ranks, time.time())
            stopped = f"stopped: {job.kill_reason}" if job.kill_reason else ""  # the kill came while it ran
            await self._finish(job, ended.exit_code, stopped or ended.detail, failed_at=ended.failed_at)
            return
        if process is not None:
            code: int | None = await process.wait()
        else:
            while job.alive():
                await asyncio.sleep(POLL)
            code = exits.recorded_exit(job.path)
        stopped = f"stopped: {job.kill_reason}" if job.kill_reason else ""
        ended = exits.outcome(job.path, -1 if code is None else code, time.time())
        missing = "the ranks ended while no agent was watching and left no exit code" if code is None else ""
        await self._finish(job, ended.exit_code, stopped or ended.detail or missing, failed_at=ended.failed_at)

    async def _wait_ranks(self, job: RunningJob) -> None:
        """Until every rank's recorder has ended; the first rank to fail stops the others, as under
        torchrun (they would only wait for it in their next collective)."""
        waiting = {asyncio.create_task(wait_exit(leader.pid)): rank
                   for rank, leader in zip(job.ranks, job.sessions) if leader.alive()}
        logs = job.path / "logs"
        failed = any(exits.rank_failed(logs, rank) for rank in job.ranks if rank not in waiting.values())
        if failed:
            job.signal(signal.SIGTERM)
        try:
            while waiting:
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                ended = [waiting.pop(task) for task in done]
                first = next((rank for rank in ended if exits.rank_failed(logs, rank)), None)
                if not failed and first is not None:
                    failed = True
                    note = (f"rank {first} failed ({exits.rank_status(logs, first)}); stopping the other ranks on "
                            f"{self.node}")
                    log.info("job %d attempt %d: %s", job.job, job.attempt, note)
                    _append(job.path / "launcher.log", f"gpudeck: {note}\n")
                    job.signal(signal.SIGTERM)
                    self._keep_task(self._kill_after_grace(job))
        finally:
            for task in waiting:
                task.cancel()

    async def _kill_after_grace(self, job: RunningJob, grace: float = KILL_GRACE) -> None:
        for _ in range(int(grace / POLL)):
            await asyncio.sleep(POLL)
            if not job.alive():
                return
        log.info("job %d attempt %d: still running after %.0f s; killing", job.job, job.attempt, grace)
        job.signal(signal.SIGKILL)

    async def _finish(self, job: RunningJob, code: int, detail: str, retry: bool = False,
                      failed_at: float | None = None) -> None:
        # Ranks that outlive their torchrun (it was killed) can only hang: stop them with it.
        job.signal(signal.SIGKILL)
        await remove_container(job.container)
        job.exit_code, job.detail, job.retry, job.failed_at = code, detail, retry, failed_at
        self.environments.release(job.environment)
        self.sink.merge(job.job, job.attempt, exits.traffic_totals(job.path))
        for index in job.gpus:
            self.backend.assign(index, [])
        try:
            (job.path / "exit.json").write_text(json.dumps({"exit_code": code, "detail": detail,
                                                            "failed_at": failed_at}))
        except OSError as exc:
            log.warning("job %d attempt %d: could not record its exit in %s (%s)", job.job, job.attempt, job.path,
                        exc.strerror)
        log.info("job %d attempt %d: ranks exited with code %d%s", job.job, job.attempt, code,
                 f" ({detail})" if detail else "")
        await self.shipper.ship_ended(job)
        await self.send(JobExited(job=job.job, attempt=job.attempt, exit_code=code, detail=detail, retry=retry,
                                  failed_at=failed_at))

    async def kill(self, job_id: int, attempt: int, reason: str, grace: float = 0.0) -> None:
        job = self.jobs.get((job_id, attempt))
        if job is None or job.exit_code is not None:
            return
        job.kill_reason = reason
        if not job.pgid:
            if (preparing := self._preparing.get((job_id, attempt))) is not None:
                preparing.cancel()  # it stops before it starts (see launch)
            return
        log.info("job %d attempt %d: stopping (%s)", job_id, attempt, reason)
        job.signal(signal.SIGTERM)
        await stop_container(job.container)
        await self._kill_after_grace(job, grace or KILL_GRACE)

    def sessions(self) -> set[int]:
        """The sessions of the ranks this node runs: a forked rank carries no marker to know it by."""
        return {pid for job in self.jobs.values() if job.exit_code is None for pid, _ in job.leaders}

    def forget(self, job_id: int, attempt: int) -> None:
        job = self.jobs.get((job_id, attempt))
        if job is not None and job.exit_code is not None:
            del self.jobs[(job_id, attempt)]
            self.sink.forget(job_id, attempt)

    # --- reporting -----------------------------------------------------------------------------

    def report(self) -> list[JobReport]:
        """What a (re)connecting agent tells the coordinator it holds."""
        return [JobReport(job=j.job, attempt=j.attempt, exit_code=j.exit_code, detail=j.detail, retry=j.retry,
                          failed_at=j.failed_at) for j in self.jobs.values()]

    def reconnected(self) -> None:
        """A new connection: the coordinator may have missed chunks, and says which (`resume_logs`)."""
        self.shipper.reconnected(self.jobs.values())

    def resume_logs(self, sizes: dict[str, dict[int, int]]) -> None:
        self.shipper.resume_logs(self.jobs, sizes)

    async def ship_all(self) -> None:
        await self.shipper.ship_all(self.jobs.values())

    # --- the agent's own life ------------------------------------------------------------------

    def adopt(self) -> None:
        """Follow ranks an earlier agent process of this node started (a restart, an upgrade), and
        report attempts that ended while no agent ran."""
        if not self.root.is_dir():
            return
        for directory in sorted(self.root.iterdir()):
            job = load_job(directory)
            if job is None or job.cluster != self.cluster or (directory / "exit.json").exists():
                continue
            self.jobs[job.key] = job
            self.environments.hold(job.environment)
            self.sink.expect(job.job, job.attempt)
            log.info("job %d attempt %d: following the ranks an earlier agent started", job.job, job.attempt)
            self._follow(job)

    async def shutdown(self, kill_jobs: bool) -> None:
        if kill_jobs:
            await asyncio.gather(*(self.kill(j.job, j.attempt, "the agent is shutting down")
                                   for j in list(self.jobs.values())))
        for follower in list(self._followers):
            follower.cancel()

    def prune(self) -> None:
        """Remove the directories of the oldest finished attempts beyond KEEP_FINISHED."""
        if not self.root.is_dir():
            return
        finished = sorted((d for d in self.root.iterdir() if (d / "exit.json").exists()),
                          key=lambda d: d.stat().st_mtime)
        for directory in finished[:-KEEP_FINISHED]:
            shutil.rmtree(directory, ignore_errors=True)


def _port_taken(port: int) -> bool:
    """Whether torchrun's rendezvous store could not listen on `port` here (bound as it binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError:
            return True
    return False



def _append(path: Path, text: str) -> None:
    try:
        with open(path, "a") as handle:
            handle.write(text)
    except OSError as exc:
        log.warning("could not write to %s (%s)", path, exc.strerror)
