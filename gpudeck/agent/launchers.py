"""The ways a node starts its part of an attempt, one class each, as torch elastic's `PContext`s.

By default the agent starts each rank itself, with the variables torchrun would give it
(`rank_variables`), so `init_process_group("env://")` scripts run unchanged and no launcher process
imports torch first: forked from a warm interpreter where one is ready (gpudeck.agent.warm), else
cold, as `python -m gpudeck.train.run` under a small shell. Either way each rank runs under an exit
recorder that leads a session of its own and leaves the rank's status in its log folder.
`submit --torchrun`, a command (`-- CMD`) and a container run one process per node instead
(torchrun, the command) under a shell that records its exit code.

`launcher_for` is the one place that picks among them. A launcher writes into the attempt's record
what it started as it starts it, so a start that fails half-way leaves its processes findable.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from gpudeck.agent import exits
from gpudeck.agent.accounts import Account, spawn_as
from gpudeck.agent.attempts import RunningJob
from gpudeck.agent.containers import Runtime, container_command, container_name
from gpudeck.agent.overlay import AUTOCOUNT, overlay_env
from gpudeck.agent.preparation import RunSetup, usable_dir
from gpudeck.agent.procs import MARKER, Leader, run_marker
from gpudeck.agent.warm import WarmPool
from gpudeck.model import DOCTOR, RESERVED_ENV
from gpudeck.netif import interface_towards
from gpudeck.protocol.node_messages import Launch
from gpudeck.protocol.rank_end import open_left

# Each node starts its ranks once it has prepared (copied the project, built the environment); the
# others wait for it at torchrun's rendezvous up to this many seconds (torchrun's own default is 600).
RENDEZVOUS_TIMEOUT = 1800
# The shell stays the session leader, so its pid is the process group of every rank.
_LAUNCHER = '"$@"; code=$?; echo $code > "$GPUDECK_EXIT_FILE"; exit $code'
# One rank's exit recorder: it outlives the signals that stop its rank (a trap, unlike an ignored
# signal, is not inherited) and writes the status the rank ended with.
_RECORDER = ('trap : TERM INT HUP; "$@"; code=$?; echo $code > "$GPUDECK_RANK_EXIT.partial"; '
             'mv "$GPUDECK_RANK_EXIT.partial" "$GPUDECK_RANK_EXIT"; exit $code')


class LaunchFailed(Exception):
    """This node's part of the attempt could not start; the text says why, for its exit."""


@dataclass(frozen=True)
class Site:
    """What of this node and its agent a launcher puts into the processes it starts."""

    node: str
    cluster: str
    overlay: Path  # see gpudeck.agent.overlay
    traffic: str  # the address of the node's traffic sink
    simulated: bool  # simulated GPUs: a container is given none
    warm: WarmPool | None = None
    mdns_view: Callable[[], dict[str, list[str]]] | None = None  # the adverts this node sees (None: mDNS is off)


class Launcher(Protocol):
    async def start(self, order: Launch, job: RunningJob, setup: RunSetup) -> asyncio.subprocess.Process | None:
        """Start this node's part of the attempt and note in `job` what to follow and stop it by (its
        process group, its ranks and their sessions, its container). The process to wait for, or
        None where the ranks' recorders are waited for; LaunchFailed where it could not start."""
        ...


def launcher_for(order: Launch, setup: RunSetup, site: Site) -> Launcher:
    """A rank is forked only where it runs in exactly the agent's own interpreter; an owner's
    account always starts cold (a rank forked from the agent's interpreter would keep the agent's
    rights)."""
    if setup.container is not None:
        inner = CommandLauncher(site) if order.run.command else TorchrunLauncher(site, counted=False)
        return ContainerLauncher(site, setup.container, inner)
    if order.run.command:
        return CommandLauncher(site)
    if order.run.launcher:
        return TorchrunLauncher(site)
    if site.warm is not None and setup.python == sys.executable and not order.run.requirements and not setup.account:
        return ForkedLauncher(site, site.warm)
    return ColdLauncher(site)


class ColdLauncher:
    """Each rank as `python -m gpudeck.train.run` under its exit recorder, in a session of its own."""

    def __init__(self, site: Site) -> None:
        self.site = site

    async def start(self, order: Launch, job: RunningJob, setup: RunSetup) -> asyncio.subprocess.Process | None:
        env = job_env(order, job.path, setup, self.site)
        target = ["--workload", order.run.workload] if order.run.workload else [setup.script]
        argv = [*target, *order.run.args]  # for gpudeck.train.run
        logs = job.path / "logs"
        for local_rank in range(max(1, len(order.gpus))):
            rank_env = {**env, **rank_variables(order, local_rank, env)}
            rank = int(rank_env["RANK"])
            rank_env["GPUDECK_RANK_EXIT"] = str(exits.rank_exit_file(logs, rank))
            rank_env["TORCHELASTIC_ERROR_FILE"] = str(logs / f"rank-{rank}.error.json")
            pid = await self._start_rank(job, rank, argv, rank_env, setup, logs / f"rank-{rank}.log")
            leader = Leader.of(pid) or Leader(pid, -1)  # -1: it has already ended
            job.ranks.append(rank)
            job.leaders.append([leader.pid, leader.started])
        job.pgid = job.leaders[0][0]
        return None

    async def _start_rank(self, job: RunningJob, rank: int, argv: list[str], env: dict[str, str], setup: RunSetup,
                          log_file: Path) -> int:
        """The pid of the rank's recorder. The ranks started before one that cannot start are stopped."""
        try:
            return await _spawn_recorded([setup.python, "-m", "gpudeck.train.run", *argv], env, setup.cwd, log_file,
                                         setup.account)
        except OSError as exc:
            job.signal(signal.SIGKILL)
            raise LaunchFailed(f"could not start rank {rank} on {self.site.node}: {exc}") from None


class ForkedLauncher(ColdLauncher):
    """Each rank forked from a warm interpreter, torch already imported; cold while none is ready."""

    def __init__(self, site: Site, warm: WarmPool) -> None:
        super().__init__(site)
        self.warm = warm

    async def _start_rank(self, job: RunningJob, rank: int, argv: list[str], env: dict[str, str], setup: RunSetup,
                          log_file: Path) -> int:
        pid = await self.warm.fork(argv, env, setup.cwd, log_file)
        if pid is None:
            return await super()._start_rank(job, rank, argv, env, setup, log_file)
        job.forked += 1
        return pid


class _OneProcessLauncher(ABC):
    """One process for the node (torchrun, the command) under a shell that records its exit code."""

    what = ""  # what could not start, in the reason of a start that failed

    def __init__(self, site: Site) -> None:
        self.site = site

    @abstractmethod
    def command(self, order: Launch, setup: RunSetup, env: dict[str, str]) -> list[str]:
        """The node's process and its arguments."""

    def container(self, order: Launch) -> list[str]:
        """The runtime and the name of the container it runs in, [] for none."""
        return []

    async def start(self, order: Launch, job: RunningJob, setup: RunSetup) -> asyncio.subprocess.Process | None:
        try:
            env = job_env(order, job.path, setup, self.site)
            job.container = self.container(order)
            with open(job.path / "launcher.log", "ab") as launcher_log:
                process = await asyncio.create_subprocess_exec(
                    "/bin/sh", "-c", _LAUNCHER, "gpudeck-launch", *self.command(order, setup, env),
                    cwd=setup.cwd, env=env,
                    stdin=asyncio.subprocess.DEVNULL, stdout=launcher_log, stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True, **spawn_as(setup.account))
        except OSError as exc:
            raise LaunchFailed(f"could not start {self.what} on {self.site.node}: {exc}") from None
        job.pgid = process.pid
        return process


class TorchrunLauncher(_OneProcessLauncher):
    """torchrun starts the node's ranks (`submit --torchrun`), each counted by gpudeck.train.run
    unless `counted` is off (in a container, where gpudeck is not installed)."""

    what = "torchrun"

    def __init__(self, site: Site, counted: bool = True) -> None:
        super().__init__(site)
        self.counted = counted

    def command(self, order: Launch, setup: RunSetup, env: dict[str, str]) -> list[str]:
        target = ["--workload", order.run.workload] if order.run.workload else [setup.script]
        wrapper = ["-m", "gpudeck.train.run"] if self.counted else []
        return [
            setup.python, "-m", "torch.distributed.run",
            "--nnodes", str(order.nnodes), "--node-rank", str(order.node_rank),
            "--nproc-per-node", str(max(1, len(order.gpus))),
            "--master-addr", order.master_addr, "--master-port", str(order.master_port),
            "--max-restarts", "0", "--rdzv-conf", f"timeout={RENDEZVOUS_TIMEOUT}", "--rdzv-id", run_id(order),
            *wrapper, *target, *order.run.args,
        ]


class CommandLauncher(_OneProcessLauncher):
    """The job's own command (`submit -- CMD`), once per node."""

    what = "the command"

    def command(self, order: Launch, setup: RunSetup, env: dict[str, str]) -> list[str]:
        return list(order.run.command)


class ContainerLauncher(_OneProcessLauncher):
    """Another launcher's command run in the job's image (`submit --image`), see `containers`."""

    def __init__(self, site: Site, runtime: Runtime, inner: _OneProcessLauncher) -> None:
        super().__init__(site)
        self.runtime = runtime
        self.inner = inner
        self.what = inner.what

    def container(self, order: Launch) -> list[str]:
        return [self.runtime.path, container_name(order, self.site.node)]

    def command(self, order: Launch, setup: RunSetup, env: dict[str, str]) -> list[str]:
        mounts = sorted({str(setup.cwd), str(setup.outputs.parent), env["GPUDECK_LOG_DIR"]})
        names = sorted((set(order.run.env) | {k for k in env if k.startswith("GPUDECK_")} | RESERVED_ENV
                        | {"PYTHONUNBUFFERED"}) - {AUTOCOUNT})
        return container_command(self.runtime, order.run.image, container_name(order, self.site.node),
                                 self.inner.command(order, setup, env), str(setup.cwd), mounts, names, order.gpus,
                                 self.site.simulated)


def job_env(order: Launch, directory: Path, setup: RunSetup, site: Site) -> dict[str, str]:
    """The agent's variables (less the join token, and with the login variables of the job's
    account where it runs as one), the user's, then everything gpudeck sets (which a job cannot
    override: the marker is how its processes are found and stopped)."""
    env = dict(os.environ)
    if setup.account is not None:
        env.pop("GPUDECK_TOKEN", None)  # an agent given its token so must not hand it to a person's code
        env.update(setup.account.env())
    env.update(order.run.env)
    env.update(overlay_env(site.overlay, env))
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
        "GPUDECK_NODE": site.node,
        MARKER: run_marker(site.cluster, site.node, order.job, order.attempt),
        "GPUDECK_TRAFFIC_ADDR": site.traffic,
        "GPUDECK_LOG_DIR": str(directory / "logs"),
        "GPUDECK_EXIT_FILE": str(directory / "exit_code"),
        "GPUDECK_OUTPUT_DIR": str(setup.outputs),
        "GPUDECK_CHECKPOINT_DIR": str(setup.checkpoints),
        **({"GPUDECK_PREEMPT_GRACE": f"{order.preempt_grace:g}"} if order.preempt_grace > 0 else {}),
        "PYTHONUNBUFFERED": "1",
    })
    if order.array_job is not None and order.array_index is not None:  # a task of an array (--array)
        env.update(GPUDECK_ARRAY_JOB=str(order.array_job), GPUDECK_ARRAY_INDEX=str(order.array_index))
    interface = interface_towards(order.master_addr)
    if interface:
        env.setdefault("GLOO_SOCKET_IFNAME", interface)
        env.setdefault("NCCL_SOCKET_IFNAME", interface)
    if order.run.workload == DOCTOR and site.mdns_view is not None:
        env["GPUDECK_MDNS_SEEN"] = json.dumps(site.mdns_view())  # what gpudeck doctor reports as seen
    if order.run.command:
        env[AUTOCOUNT] = "1"
    if not order.run.project and usable_dir(order.run.workdir, setup.account):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), order.run.workdir) if p)
    return env


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


async def _spawn_recorded(command: list[str], env: dict[str, str], cwd: Path, log_file: Path,
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
