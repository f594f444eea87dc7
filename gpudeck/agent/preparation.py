"""Preparing an attempt on this node before any of its processes start: the project's working copy,
the interpreter (the agent's, --python, --venv, or an environment built from --requirements), the
account it runs as (--run-as-owner) and, with --image, a container runtime.

Each step that fails says why in a sentence (`PrepareFailed`), which becomes the attempt's exit. A
step that takes a while (copying a project, building an environment) tells the coordinator what it
is doing, so `gpudeck jobs` shows more than "starting".
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Awaitable, Callable

from gpudeck.agent.accounts import READ, RUN, Account, account_of, runs_as_agent
from gpudeck.agent.attempts import RunningJob
from gpudeck.agent.containers import Runtime, find_runtime
from gpudeck.agent.environments import BuildFailed, Environments
from gpudeck.agent.overlay import overlay_env
from gpudeck.agent.procs import run_bounded
from gpudeck.agent.projects import FetchFailed, NodeCache
from gpudeck.protocol.messages import Message
from gpudeck.protocol.node_messages import JobPreparing, Launch

SAY_EVERY = 2.0  # seconds between reports of what a preparing attempt is doing
PROBE_TIMEOUT = 60.0  # for the job's interpreter to say whether it has torch
OUTPUT_DIR = "gpudeck-outputs"  # in the working copy: $GPUDECK_OUTPUT_DIR

Send = Callable[[Message], Awaitable[bool]]


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
    checkpoints: Path  # $GPUDECK_CHECKPOINT_DIR: the job's, kept across its attempts
    container: Runtime | None = None  # with --image: the runtime that runs it
    account: Account | None = None  # with --run-as-owner: the owner's account, None for the agent's user


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def usable_dir(path: str, account: Account | None = None) -> bool:
    """Whether the submitter's directory exists here and the job's account (default: the agent's
    user) may enter it (a home directory of mode 0700 on a shared file system exists but is closed
    to the agent's user)."""
    if not (path and os.path.isdir(path)):
        return False
    return account.may(path, READ | RUN) if account is not None else os.access(path, os.R_OK | os.X_OK)


class Preparer:
    """Prepares this node's attempts: one per agent, since the project cache, the environments and
    the container runtime it found serve every attempt."""

    def __init__(self, node: str, cache: NodeCache, environments: Environments, overlay: Path, checkpoints: Path,
                 send: Send, run_as_owner: bool = False) -> None:
        self.node = node
        self.cache = cache
        self.environments = environments
        self.overlay = overlay
        self.checkpoints = checkpoints  # one folder per job under it
        self.send = send
        self.run_as_owner = run_as_owner  # see accounts
        self._runtime: tuple[Runtime | None, str] | None = None  # the container runtime, once looked for

    async def prepare(self, order: Launch, job: RunningJob, launcher_log: IO[bytes]) -> RunSetup:
        """Where and with which interpreter the attempt runs; PrepareFailed with a sentence otherwise."""
        directory = job.path
        account = self._account(order, launcher_log)
        work = directory / "work" if order.run.project else None
        if work is not None:
            await self._say(job, f"copying the project to {self.node}")
            try:
                manifest = await self.cache.manifest(order.run.project)
                await self.cache.working_copy(manifest, work)
            except FetchFailed as exc:
                raise PrepareFailed(1, f"could not copy the project to {self.node}: {exc}",
                                    retry=exc.transient) from None
            except OSError as exc:
                raise PrepareFailed(1, f"could not copy the project to {self.node}: {exc.strerror or exc}") from None
        python, bin_dir = await self._interpreter(order, job, launcher_log, account)
        if work is not None:
            cwd = work / order.run.subdir if order.run.subdir else work
            if not cwd.is_dir():
                raise PrepareFailed(1, f"the folder {order.run.subdir} that submit ran in is not in the project (an "
                                       "ignore file leaves it out): submit from another folder")
            target = str(work / order.run.script_name) if order.run.script_name else ""
        else:
            cwd = Path(order.run.workdir) if usable_dir(order.run.workdir, account) else directory
            target = str(_write_script(order, directory)) if order.run.script_name else ""
        outputs = (work or directory) / OUTPUT_DIR
        outputs.mkdir(parents=True, exist_ok=True)
        checkpoints = self.checkpoints / str(order.job)
        if account is not None:
            _hand_over(job, work or outputs, checkpoints, account)
        container = await self._container() if order.run.image else None
        return RunSetup(python=python, bin_dir=bin_dir, cwd=cwd, script=target, outputs=outputs,
                        checkpoints=checkpoints, container=container, account=account)

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

    async def _container(self) -> Runtime:
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
        if order.run.image:
            return "python", ""  # the image's own
        if order.run.requirements:
            started = time.monotonic()
            reporter = asyncio.create_task(self._say_while(
                job, lambda: f"building the environment on {self.node} (uv, {time.monotonic() - started:.0f} s)"))
            try:
                env = await self.environments.get(order.run.requirements, launcher_log)
                job.environment = env.key
            except BuildFailed as exc:
                raise PrepareFailed(1, f"the environment could not be built on {self.node}: {exc}") from None
            except OSError as exc:
                raise PrepareFailed(1, f"the environment could not be built on {self.node}: "
                                       f"{exc.strerror or exc}") from None
            finally:
                reporter.cancel()
            python, bin_dir = env.python, env.bin
        elif order.run.venv:
            python, bin_dir = str(Path(order.run.venv) / "bin" / "python"), str(Path(order.run.venv) / "bin")
            if not os.access(python, os.X_OK):
                raise PrepareFailed(127, f"--venv {order.run.venv} is not a virtual environment on {self.node} "
                                         "(it has no bin/python)")
        elif order.run.python:
            python, bin_dir = order.run.python, str(Path(order.run.python).parent)
            if not (os.path.isfile(python) and os.access(python, os.X_OK)):
                raise PrepareFailed(127, f"--python {order.run.python} does not exist on {self.node}")
        else:
            python, bin_dir = sys.executable, str(Path(sys.executable).parent)
        if account is not None and not order.run.command and not account.may(python, RUN):
            raise PrepareFailed(126, f"the account {account.name} may not run {python} on {self.node} (a folder on "
                                     "its way is closed to it): install the agent where every account can read it, "
                                     "or submit with --python or --venv")
        if not order.run.command and not await self._has_torch(python, account):
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


def _hand_over(job: RunningJob, written: Path, checkpoints: Path, account: Account) -> None:
    """Give the account what the job's processes write: `written` (the working copy, or the
    outputs folder without one), the logs folder (exit statuses and error files), the exit-code
    file and the job's checkpoints. The job's folder, with the records the agent reads back, stays
    the agent's, open to the account only to pass through, as is the launcher's log."""
    exit_file = job.path / "exit_code"
    exit_file.touch()
    checkpoints.mkdir(parents=True, exist_ok=True)
    for path in (written, job.path / "logs", exit_file, checkpoints):
        account.give(path)
    os.chmod(job.path, 0o711)
    os.chmod(job.path / "launcher.log", 0o600)


def _write_script(order: Launch, directory: Path) -> Path:
    path = directory / os.path.basename(order.run.script_name)
    path.write_bytes(order.run.script)
    return path
