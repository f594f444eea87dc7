"""The job runner: starts this node's ranks of a job attempt and follows them.

By default the agent starts each rank itself, with the variables torchrun would give it
(`rank_variables`), so `init_process_group("env://")` scripts run unchanged and no launcher process
imports torch first: forked from a warm interpreter where one is ready (gpudeck.agent.warm), else
as `python -m gpudeck.train.run` under a small shell. Either way each rank runs under an exit
recorder that leads a session of its own and leaves the rank's status in its log folder; the agent
waits on the recorders (pidfds: no polling, also for those an earlier agent started), and when one
rank fails it stops the others, as torchrun does. `submit --torchrun`, a command (`-- CMD`) and a
container run one process per node instead (torchrun, the command) under a shell that records its
exit code.

Every process of the attempt is found by its marker or its ranks' sessions (see `procs`), so a
cancel, a time limit or the loss of another node of the job stops every rank. The ranks outlive the
agent: a restarted agent adopts them from the job directory. The runner keeps each attempt until
the coordinator says it recorded the exit (`forget`), so exits that happen while the coordinator is
away are reported when it is back.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Awaitable, Callable

from gpudeck.agent import exits
from gpudeck.agent.accounts import READ, RUN, Account, account_of, chown_tree, runs_as_agent, spawn_as
from gpudeck.agent.attempts import RunningJob, load_job
from gpudeck.agent.containers import (
    Runtime, container_command, container_name, find_runtime, remove_container, stop_container,
)
from gpudeck.agent.environments import BuildFailed, Environments
from gpudeck.agent.gpus import GpuBackend
from gpudeck.agent.outputs import OutputKeeper
from gpudeck.agent.overlay import AUTOCOUNT, overlay_env, write_overlay
from gpudeck.agent.procs import MARKER, Leader, run_bounded, run_marker, wait_exit
from gpudeck.agent.projects import ContentFetcher, FetchFailed, NodeCache
from gpudeck.agent.traffic_sink import TrafficSink
from gpudeck.agent.warm import WarmPool
from gpudeck.config import ENVIRONMENTS_KEPT, NODE_CACHE_LIMIT
from gpudeck.model import DOCTOR, RESERVED_ENV
from gpudeck.netif import interface_towards
from gpudeck.protocol.messages import Message
from gpudeck.protocol.node_messages import (
    JobExited, JobPreparing, JobStarted, Launch, LogChunk, OutputChunk, Outputs, SendOutput, Traffic,
)
from gpudeck.protocol.payloads import JobReport, OutputFile
from gpudeck.protocol.rank_end import open_left

log = logging.getLogger(__name__)
KILL_GRACE = 5.0
POLL = 0.5
LOG_CHUNK = 64 * 1024
KEEP_FINISHED = 50
LOG_RESUME_WAIT = 5.0
SAY_EVERY = 2.0  # seconds between reports of what a preparing attempt is doing
PROBE_TIMEOUT = 60.0  # for the job's interpreter to say whether it has torch
# Each node starts its ranks once it has prepared (copied the project, built the environment); the
# others wait for it at torchrun's rendezvous up to this many seconds (torchrun's own default is 600).
RENDEZVOUS_TIMEOUT = 1800
OUTPUT_DIR = "gpudeck-outputs"  # in the working copy: $GPUDECK_OUTPUT_DIR
# The shell stays the session leader, so its pid is the process group of every rank.
_LAUNCHER = '"$@"; code=$?; echo $code > "$GPUDECK_EXIT_FILE"; exit $code'
# One rank's exit recorder: it outlives the signals that stop its rank (a trap, unlike an ignored
# signal, is not inherited) and writes the status the rank ended with.
_RECORDER = ('trap : TERM INT HUP; "$@"; code=$?; echo $code > "$GPUDECK_RANK_EXIT.partial"; '
             'mv "$GPUDECK_RANK_EXIT.partial" "$GPUDECK_RANK_EXIT"; exit $code')

Send = Callable[[Message], Awaitable[bool]]


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


class PrepareFailed(Exception):
    """An attempt cannot start on this node; `detail` says why, as its exit does. `retry`: for a
    reason of the moment (the coordinator's connection dropped), so the job is placed again."""

    def __init__(self, code: int, detail: str, retry: bool = False) -> None:
        super().__init__(detail)
        self.code, self.detail, self.retry = code, detail, retry


@dataclass(frozen=True)
class RunSetup:
    """Where and how an attempt runs on this node, once prepared."""

    python: str
    bin_dir: str
    cwd: Path
    script: str  # the script's path here, "" for a workload or a command
    outputs: Path
    container: Runtime | None = None  # with --image: the runtime that runs it
    account: Account | None = None  # with --run-as-owner: the owner's account, None for the agent's user


class JobRunner:
    def __init__(self, state_dir: Path, cluster: str, node: str, sink: TrafficSink, backend: GpuBackend,
                 send: Send, fetcher: ContentFetcher | None = None, outputs: OutputKeeper | None = None,
                 cache_space: int = NODE_CACHE_LIMIT, environments: int = ENVIRONMENTS_KEPT,
                 warm: WarmPool | None = None, run_as_owner: bool = False,
                 mdns_view: Callable[[], dict[str, list[str]]] | None = None) -> None:
        state_dir = state_dir.resolve()  # ranks run elsewhere: every path they are given is absolute
        self.root = state_dir / "jobs"
        self.cache = NodeCache(state_dir / "cache", fetcher or ContentFetcher(send), cache_space)
        self.environments = Environments(state_dir / "environments", environments)
        self.overlay = write_overlay(state_dir / "overlay")
        self.outputs = outputs or OutputKeeper(state_dir / "outputs")
        self.warm = warm
        self.run_as_owner = run_as_owner  # see accounts
        self.mdns_view = mdns_view  # the adverts this node sees, by role (None: mDNS is off here)
        self.cluster = cluster
        self.node = node
        self.sink = sink
        self.backend = backend
        self.send = send
        self.jobs: dict[tuple[int, int], RunningJob] = {}
        self._preparing: dict[tuple[int, int], asyncio.Task[RunSetup]] = {}
        self._runtime: tuple[Runtime | None, str] | None = None  # the container runtime, once looked for
        self._followers: set[asyncio.Task[None]] = set()
        # Set once the coordinator said how much of each log it has; logs wait for it after a connect.
        self.logs_resumed = asyncio.Event()

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
                preparing = self._preparing[key] = asyncio.create_task(self._prepare(order, job, launcher_log))
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
        if not (order.command or order.launcher or setup.container):
            await self._start_ranks(order, job, setup)
            return
        try:
            env = self._env(order, job.path, setup)
            if setup.container is not None:
                job.container = [setup.container.path, container_name(order, self.node)]
            with open(job.path / "launcher.log", "ab") as launcher_log:
                process = await asyncio.create_subprocess_exec(
                    "/bin/sh", "-c", _LAUNCHER, "gpudeck-launch", *self._command(order, setup, env),
                    cwd=setup.cwd, env=env,
                    stdin=asyncio.subprocess.DEVNULL, stdout=launcher_log, stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True, **spawn_as(setup.account))
        except OSError as exc:
            await self._finish(job, 127, f"could not start {'the command' if order.command else 'torchrun'} on "
                                         f"{self.node}: {exc}")
            return
        job.pgid = process.pid
        await self._started(order, job, process)

    async def _start_ranks(self, order: Launch, job: RunningJob, setup: RunSetup) -> None:
        """Start each of this node's ranks under its own exit recorder: forked where the rank runs in
        the agent's own interpreter and a warm one is ready, else cold (always for an owner's account:
        a rank forked from the agent's interpreter would keep the agent's rights)."""
        env = self._env(order, job.path, setup)
        target = ["--workload", order.workload] if order.workload else [setup.script]
        argv = [*target, *order.args]  # for gpudeck.train.run
        warm = self.warm if setup.python == sys.executable and not order.requirements and not setup.account else None
        logs = job.path / "logs"
        for local_rank in range(max(1, len(order.gpus))):
            rank_env = {**env, **rank_variables(order, local_rank, env)}
            rank = int(rank_env["RANK"])
            rank_env["GPUDECK_RANK_EXIT"] = str(exits.rank_exit_file(logs, rank))
            rank_env["TORCHELASTIC_ERROR_FILE"] = str(logs / f"rank-{rank}.error.json")
            log_file = logs / f"rank-{rank}.log"
            pid = await warm.fork(argv, rank_env, setup.cwd, log_file) if warm is not None else None
            if pid is not None:
                job.forked += 1
            else:
                try:
                    pid = await _spawn_cold([setup.python, "-m", "gpudeck.train.run", *argv], rank_env, setup.cwd,
                                            log_file, setup.account)
                except OSError as exc:
                    job.signal(signal.SIGKILL)
                    await self._finish(job, 127, f"could not start rank {rank} on {self.node}: {exc}")
                    return
            leader = Leader.of(pid) or Leader(pid, -1)  # -1: it has already ended
            job.ranks.append(rank)
            job.leaders.append([leader.pid, leader.started])
        job.pgid = job.leaders[0][0]
        await self._started(order, job)

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

    # --- preparing -----------------------------------------------------------------------------

    async def _prepare(self, order: Launch, job: RunningJob, launcher_log: IO[bytes]) -> RunSetup:
        """Where and with which interpreter the attempt runs; PrepareFailed with a sentence otherwise."""
        directory = job.path
        account = self._account(order, launcher_log)
        work = directory / "work" if order.project else None
        if work is not None:
            await self._say(job, f"copying the project to {self.node}")
            try:
                manifest = await self.cache.manifest(order.project)
                await self.cache.working_copy(manifest, work)
            except FetchFailed as exc:
                raise PrepareFailed(1, f"could not copy the project to {self.node}: {exc}",
                                    retry=exc.transient) from None
            except OSError as exc:
                raise PrepareFailed(1, f"could not copy the project to {self.node}: {exc.strerror or exc}") from None
        python, bin_dir = await self._interpreter(order, job, launcher_log, account)
        if work is not None:
            cwd = work / order.subdir if order.subdir else work
            if not cwd.is_dir():
                raise PrepareFailed(1, f"the folder {order.subdir} that submit ran in is not in the project (an "
                                       "ignore file leaves it out): submit from another folder")
            target = str(work / order.script_name) if order.script_name else ""
        else:
            cwd = Path(order.workdir) if _usable_dir(order.workdir, account) else directory
            target = str(self._write_script(order, directory)) if order.script_name else ""
        outputs = (work or directory) / OUTPUT_DIR
        outputs.mkdir(parents=True, exist_ok=True)
        if account is not None:
            self._hand_over(job, work or outputs, account)
        container = await self._container(order) if order.image else None
        return RunSetup(python=python, bin_dir=bin_dir, cwd=cwd, script=target, outputs=outputs, container=container,
                        account=account)

    def _account(self, order: Launch, launcher_log: IO[bytes]) -> Account | None:
        """With --run-as-owner, the account the job's processes run as: its owner's, else none (the
        agent's user), which the launcher log then says."""
        if not self.run_as_owner:
            return None
        account = account_of(order.owner)
        if account is None:
            launcher_log.write(f"gpudeck: {runs_as_agent(order.owner, self.node)}\n".encode())
            launcher_log.flush()
        return account

    def _hand_over(self, job: RunningJob, written: Path, account: Account) -> None:
        """Give the account what the job's processes write: `written` (the working copy, or the
        outputs folder without one), the logs folder (exit statuses and error files), the exit-code
        file and the job's checkpoints. The job's folder, with the records the agent reads back, stays
        the agent's, open to the account only to pass through, as is the launcher's log."""
        exit_file = job.path / "exit_code"
        exit_file.touch()
        checkpoints = self._checkpoints(job.job)
        checkpoints.mkdir(parents=True, exist_ok=True)
        for path in (written, job.path / "logs", exit_file, checkpoints):
            account.give(path)
        os.chmod(job.path, 0o711)
        os.chmod(job.path / "launcher.log", 0o600)

    def _checkpoints(self, job_id: int) -> Path:
        return self.root.parent / "checkpoints" / str(job_id)

    async def _container(self, order: Launch) -> Runtime:
        if self._runtime is None:
            self._runtime = await find_runtime()
        runtime, why = self._runtime
        if runtime is None:
            self._runtime = None  # looked for again next time: one may be installed meanwhile
            raise PrepareFailed(127, f"{self.node} cannot run containers, which --image needs: {why}")
        return runtime

    async def _interpreter(self, order: Launch, job: RunningJob, launcher_log: IO[bytes],
                           account: Account | None) -> tuple[str, str]:
        """The interpreter of the attempt and the folder of its scripts (first on PATH)."""
        if order.image:
            return "python", ""  # the image's own
        if order.requirements:
            started = time.monotonic()
            reporter = asyncio.create_task(self._say_while(
                job, lambda: f"building the environment on {self.node} (uv, {time.monotonic() - started:.0f} s)"))
            try:
                env = await self.environments.get(order.requirements, launcher_log)
                job.environment = env.key
            except BuildFailed as exc:
                raise PrepareFailed(1, f"the environment could not be built on {self.node}: {exc}") from None
            except OSError as exc:
                raise PrepareFailed(1, f"the environment could not be built on {self.node}: "
                                       f"{exc.strerror or exc}") from None
            finally:
                reporter.cancel()
            python, bin_dir = env.python, env.bin
        elif order.venv:
            python, bin_dir = str(Path(order.venv) / "bin" / "python"), str(Path(order.venv) / "bin")
            if not os.access(python, os.X_OK):
                raise PrepareFailed(127, f"--venv {order.venv} is not a virtual environment on {self.node} "
                                         "(it has no bin/python)")
        elif order.python:
            python, bin_dir = order.python, str(Path(order.python).parent)
            if not (os.path.isfile(python) and os.access(python, os.X_OK)):
                raise PrepareFailed(127, f"--python {order.python} does not exist on {self.node}")
        else:
            python, bin_dir = sys.executable, str(Path(sys.executable).parent)
        if account is not None and not order.command and not account.may(python, RUN):
            raise PrepareFailed(126, f"the account {account.name} may not run {python} on {self.node} (a folder on "
                                     "its way is closed to it): install the agent where every account can read it, "
                                     "or submit with --python or --venv")
        if not order.command and not await self._has_torch(python, account):
            where = "the agent's environment: install gpudeck[train] there" if python == sys.executable else python
            raise PrepareFailed(127, f"torch is not installed on {self.node} in {where}")
        return python, bin_dir

    async def _has_torch(self, python: str, account: Account | None) -> bool:
        """Whether `python` can import torch; asked as the job's account, since the interpreter may be
        theirs (--python) and the agent never runs a person's program with its own rights."""
        if python == sys.executable:
            return torch_available()
        env = {**os.environ, **overlay_env(self.overlay, dict(os.environ)), **(account.env() if account else {})}
        probe = [python, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)"]
        try:
            code = await run_bounded(probe, PROBE_TIMEOUT, env, account)
        except OSError as exc:
            raise PrepareFailed(127, f"{python} cannot be run on {self.node}: {exc.strerror or exc}") from None
        if code is None:
            raise PrepareFailed(127, f"{python} on {self.node} did not start within {PROBE_TIMEOUT:.0f} s")
        return code == 0

    async def _say(self, job: RunningJob, doing: str) -> None:
        await self.send(JobPreparing(job=job.job, attempt=job.attempt, doing=doing))

    async def _say_while(self, job: RunningJob, doing: Callable[[], str]) -> None:
        while True:
            await self._say(job, doing())
            await asyncio.sleep(SAY_EVERY)

    def _command(self, order: Launch, setup: RunSetup, env: dict[str, str]) -> list[str]:
        if order.command:
            inner = list(order.command)
        else:
            target = ["--workload", order.workload] if order.workload else [setup.script]
            # In a container gpudeck is not installed: torchrun runs the script itself, uncounted.
            wrapper = [] if setup.container else ["-m", "gpudeck.train.run"]
            inner = [
                setup.python, "-m", "torch.distributed.run",
                "--nnodes", str(order.nnodes), "--node-rank", str(order.node_rank),
                "--nproc-per-node", str(max(1, len(order.gpus))),
                "--master-addr", order.master_addr, "--master-port", str(order.master_port),
                "--max-restarts", "0", "--rdzv-conf", f"timeout={RENDEZVOUS_TIMEOUT}", "--rdzv-id", run_id(order),
                *wrapper, *target, *order.args,
            ]
        if setup.container is None:
            return inner
        mounts = sorted({str(setup.cwd), str(setup.outputs.parent), env["GPUDECK_LOG_DIR"]})
        names = sorted((set(order.env) | {k for k in env if k.startswith("GPUDECK_")} | RESERVED_ENV
                        | {"PYTHONUNBUFFERED"}) - {AUTOCOUNT})
        return container_command(setup.container, order.image, container_name(order, self.node), inner, str(setup.cwd),
                                 mounts, names, order.gpus, getattr(self.backend, "simulated", False))

    @staticmethod
    def _write_script(order: Launch, directory: Path) -> Path:
        path = directory / os.path.basename(order.script_name)
        path.write_bytes(order.script)
        return path

    def _env(self, order: Launch, directory: Path, setup: RunSetup) -> dict[str, str]:
        """The agent's variables (less the join token, and with the login variables of the job's
        account where it runs as one), the user's, then everything gpudeck sets (which a job cannot
        override: the marker is how its processes are found and stopped)."""
        env = dict(os.environ)
        if setup.account is not None:
            env.pop("GPUDECK_TOKEN", None)  # an agent given its token so must not hand it to a person's code
            env.update(setup.account.env())
        env.update(order.env)
        env.update(overlay_env(self.overlay, env))
        env.update({
            "PATH": os.pathsep.join(p for p in (setup.bin_dir, env.get("PATH", "")) if p),
            "CUDA_VISIBLE_DEVICES": ",".join(map(str, order.gpus)),
            "MASTER_ADDR": order.master_addr,
            "MASTER_PORT": str(order.master_port),
            "NNODES": str(order.nnodes),
            "NODE_RANK": str(order.node_rank),
            "GPUS_PER_NODE": str(max(1, len(order.gpus))),
            "GPUDECK_JOB_ID": str(order.job),
            "GPUDECK_ATTEMPT": str(order.attempt),
            "GPUDECK_NODE": self.node,
            MARKER: run_marker(self.cluster, self.node, order.job, order.attempt),
            "GPUDECK_TRAFFIC_ADDR": self.sink.address,
            "GPUDECK_LOG_DIR": str(directory / "logs"),
            "GPUDECK_EXIT_FILE": str(directory / "exit_code"),
            "GPUDECK_OUTPUT_DIR": str(setup.outputs),
            "GPUDECK_CHECKPOINT_DIR": str(self._checkpoints(order.job)),
            **({"GPUDECK_PREEMPT_GRACE": f"{order.preempt_grace:g}"} if order.preempt_grace > 0 else {}),
            "PYTHONUNBUFFERED": "1",
        })
        if order.array_job is not None and order.array_index is not None:  # a task of an array (--array)
            env.update(GPUDECK_ARRAY_JOB=str(order.array_job), GPUDECK_ARRAY_INDEX=str(order.array_index))
        interface = interface_towards(order.master_addr)
        if interface:
            env.setdefault("GLOO_SOCKET_IFNAME", interface)
            env.setdefault("NCCL_SOCKET_IFNAME", interface)
        if order.workload == DOCTOR and self.mdns_view is not None:
            env["GPUDECK_MDNS_SEEN"] = json.dumps(self.mdns_view())  # what gpudeck doctor reports as seen
        if order.command:
            env[AUTOCOUNT] = "1"
        if not order.project and _usable_dir(order.workdir, setup.account):
            env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), order.workdir) if p)
        return env

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
        self.sink.drain()
        await self._keep_outputs(job)
        await self.ship_traffic(job)
        try:
            await asyncio.wait_for(self.logs_resumed.wait(), LOG_RESUME_WAIT)
        except asyncio.TimeoutError:
            pass  # not connected: the logs go from the start once it is
        await self.ship_logs(job)
        await self.send(JobExited(job=job.job, attempt=job.attempt, exit_code=code, detail=detail, retry=retry,
                                  failed_at=failed_at))

    async def _keep_outputs(self, job: RunningJob) -> None:
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
        self.logs_resumed.clear()
        for job in self.jobs.values():
            job.sent_offsets.clear()

    def resume_logs(self, sizes: dict[str, dict[int, int]]) -> None:
        """Continue each log where the coordinator's copy ends (a chunk sent twice would only land on
        the same bytes, but resending whole logs after every reconnect is a flood)."""
        for key, ranks in sizes.items():
            job_id, _, attempt = key.partition(":")
            job = self.jobs.get((int(job_id), int(attempt))) if job_id.isdigit() and attempt.isdigit() else None
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

    async def ship_all(self) -> None:
        for job in list(self.jobs.values()):
            if self.logs_resumed.is_set():
                await self.ship_logs(job)
            if job.exit_code is None:
                await self.ship_traffic(job)

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


def rank_variables(order: Launch, local_rank: int, env: dict[str, str]) -> dict[str, str]:
    """What torchrun's static rendezvous gives each rank, so scripts run as under torchrun; rank 0
    hosts the rendezvous store on MASTER_PORT itself, where torchrun's launcher would."""
    per_node = max(1, len(order.gpus))
    world = order.world_size or per_node * order.nnodes
    rank = (order.first_rank if order.world_size else order.node_rank * per_node) + local_rank
    variables = {
        "RANK": rank, "LOCAL_RANK": local_rank, "WORLD_SIZE": world, "LOCAL_WORLD_SIZE": per_node,
        "GROUP_RANK": order.node_rank, "GROUP_WORLD_SIZE": order.nnodes, "ROLE_RANK": rank,
        "ROLE_WORLD_SIZE": world, "ROLE_NAME": "default", "TORCHELASTIC_RUN_ID": run_id(order),
        "TORCHELASTIC_RESTART_COUNT": 0, "TORCHELASTIC_MAX_RESTARTS": 0, "TORCHELASTIC_USE_AGENT_STORE": "False",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
    }
    if per_node > 1 and "OMP_NUM_THREADS" not in env:
        variables["OMP_NUM_THREADS"] = 1  # as torchrun: one thread per rank unless the job says otherwise
    return {key: str(value) for key, value in variables.items()}


def run_id(order: Launch) -> str:
    return f"gpudeck-{order.job}-{order.attempt}"


async def _spawn_cold(command: list[str], env: dict[str, str], cwd: Path, log_file: Path,
                      account: Account | None = None) -> int:
    """Start a rank under its shell recorder in a session of its own, as `account` where given; the
    pid is the recorder's. The log is opened only as a plain file (its folder may be the account's)
    and is the account's, since the rank opens it again (gpudeck.train.run)."""
    with open(open_left(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab") as output:
        if account is not None:
            os.fchown(output.fileno(), account.uid, account.gid)
        process = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", _RECORDER, "gpudeck-rank", *command, cwd=cwd, env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=output, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            **spawn_as(account))
    return process.pid


def _append(path: Path, text: str) -> None:
    try:
        with open(path, "a") as handle:
            handle.write(text)
    except OSError as exc:
        log.warning("could not write to %s (%s)", path, exc.strerror)


def _usable_dir(path: str, account: Account | None = None) -> bool:
    """Whether the submitter's directory exists here and the job's account (default: the agent's
    user) may enter it (a home directory of mode 0700 on a shared file system exists but is closed
    to the agent's user)."""
    if not (path and os.path.isdir(path)):
        return False
    return account.may(path, READ | RUN) if account is not None else os.access(path, os.R_OK | os.X_OK)
