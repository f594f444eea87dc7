"""The agent's warm interpreters (gpudeck.train.warm): torch imported ahead of jobs, ranks forked from them.

`gpudeck agent --warm N` keeps N of them (0: none). A rank is forked only where it would run in
exactly the agent's own interpreter (no --python, --venv, --requirements or --image, not a command,
not under torchrun); any other rank, and any rank while no warm interpreter is ready, starts cold.
One that ends (it refused an unsafe fork, or was killed) is started again; if it keeps ending soon
after its start, the agent says so and starts ranks cold from then on.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from gpudeck.agent.procs import MARKER, PROC
from gpudeck.protocol.payloads import WarmStatus

log = logging.getLogger(__name__)
FD = "GPUDECK_WARM_FD"  # the same name as gpudeck.train.warm.FD (which imports torch: not imported here)
POOL = "GPUDECK_WARM"  # in each warm interpreter's environment: whose it is
# What the interpreter imports torch with: numpy's OpenBLAS starts a thread per CPU when it loads and
# libgomp reads its size once, and an interpreter with threads must not fork. Each forked rank then
# sizes its pools as a cold rank of its job would (gpudeck.train.warm.pool_sizes).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
ANSWER_TIMEOUT = 30.0
EARLY_END = 30.0  # an interpreter that ends this soon after its start ended early
GIVE_UP_AFTER = 3  # early ends in a row


@dataclass
class _Interpreter:
    process: asyncio.subprocess.Process
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    started: float
    ready: bool = False
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)  # one fork at a time: each takes milliseconds


class WarmPool:
    def __init__(self, size: int, owner: str, cwd: Path) -> None:
        self.size = size
        self.owner = owner  # cluster/node, so two agents on one machine keep off each other's
        self.cwd = cwd
        self.interpreters: list[_Interpreter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._early_ends = 0
        self._closed = False

    async def start(self) -> None:
        if self.size and importlib.util.find_spec("torch") is None:
            log.info("torch is not installed here: no warm interpreters (ranks need torch anyway)")
            self.size = 0
        for _ in range(self.size):
            self._keep(self._run_one())

    def _keep(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_one(self) -> None:
        """Start one interpreter, wait for its import to finish, and start another when it ends."""
        ours, theirs = socket.socketpair()
        env = {key: value for key, value in os.environ.items() if key != MARKER}
        env.update({**ONE_THREAD, FD: str(theirs.fileno()), POOL: self.owner, "PYTHONUNBUFFERED": "1"})
        loop = asyncio.get_running_loop()
        try:
            with open(self.cwd / "warm.log", "ab") as output:
                process = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "gpudeck.train.warm", env=env, cwd=self.cwd, pass_fds=(theirs.fileno(),),
                    stdin=asyncio.subprocess.DEVNULL, stdout=output, stderr=output, start_new_session=True)
        except OSError as exc:
            log.warning("could not start a warm interpreter (%s); ranks start cold", exc)
            ours.close()
            return
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        one = _Interpreter(process, reader, writer, loop.time())
        self.interpreters.append(one)
        try:
            hello = await reader.readline()
            one.ready = b"ready" in hello
            if one.ready:
                self._early_ends = 0
            await process.wait()
        finally:
            one.ready = False
            self.interpreters.remove(one)
            writer.close()
            if process.returncode is None:
                process.kill()
                await process.wait()
        if self._closed:
            return
        why = _last_line(self.cwd / "warm.log")
        early = loop.time() - one.started < EARLY_END
        self._early_ends = self._early_ends + 1 if early else 0
        if self._early_ends >= GIVE_UP_AFTER:
            log.warning("warm interpreters keep ending at their start (%s); ranks start cold from now on",
                        why or f"exit code {process.returncode}")
            return
        log.info("a warm interpreter ended (exit code %s); starting another", process.returncode)
        self._keep(self._run_one())

    async def fork(self, argv: list[str], env: dict[str, str], cwd: Path, log_file: Path) -> int | None:
        """The pid of a forked rank's recorder, or None when no interpreter is ready (start it cold)."""
        ready = [i for i in self.interpreters if i.ready]
        if not ready:
            return None
        one = min(ready, key=lambda i: i.turn.locked())
        async with one.turn:
            return await self._ask(one, argv, env, cwd, log_file)

    async def _ask(self, one: _Interpreter, argv: list[str], env: dict[str, str], cwd: Path,
                   log_file: Path) -> int | None:
        if not one.ready:
            return None
        try:
            request = {"argv": argv, "env": env, "cwd": str(cwd), "log": str(log_file)}
            one.writer.write(json.dumps(request).encode() + b"\n")
            await one.writer.drain()
            answer = json.loads(await asyncio.wait_for(one.reader.readline(), ANSWER_TIMEOUT) or b"{}")
        except (OSError, ValueError, asyncio.TimeoutError) as exc:
            log.warning("a warm interpreter did not fork a rank (%s); starting it cold", exc)
            one.ready = False
            one.process.kill()
            return None
        if "pid" not in answer:
            log.warning("a warm interpreter refused to fork a rank (%s); starting it cold", answer.get("error"))
            one.ready = False
            return None
        return int(answer["pid"])

    def status(self) -> WarmStatus:
        """For `gpudeck nodes --json`: how many are ready, and the memory they hold (PSS, so pages
        they share with each other are counted once)."""
        return WarmStatus(size=self.size, ready=sum(1 for i in self.interpreters if i.ready),
                          memory_bytes=sum(_pss(i.process.pid) for i in self.interpreters))

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for one in list(self.interpreters):
            if one.process.returncode is None:
                one.process.kill()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, 2) - 4096))
            lines = handle.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _pss(pid: int) -> int:
    try:
        for line in (PROC / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
