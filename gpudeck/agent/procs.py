"""Finding a job's processes: by the marker in their environment, and by the sessions of its ranks.

torchrun starts every rank in a session of its own, so the launcher's process group does not hold
the ranks, and a rank whose torchrun died is re-parented away from it. What every process of a job
keeps, whoever its parent, is the environment it inherited:
`GPUDECK_RUN=<cluster>/<node>/<job>/<attempt>`. The cluster part (see `JoinToken.cluster`) keeps two
clusters that share a machine, and a node name, off each other's processes.

A rank forked from a warm interpreter (gpudeck.train.warm) has no marker in /proc: that file shows
the environment a process was exec'd with, and a fork execs nothing. Each rank the agent starts leads
a session of its own (`Leader`), which its processes keep; a leader is named by its pid and its start
time, so a pid the kernel gave to another process since is not taken for it.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from gpudeck.agent.accounts import Account, spawn_as

MARKER = "GPUDECK_RUN"
PROC = Path("/proc")


def run_marker(cluster: str, node: str, job: int, attempt: int) -> str:
    return f"{cluster}/{node}/{job}/{attempt}"


def of_cluster(marker: str | None, cluster: str) -> bool:
    """Whether a process's marker says it belongs to a job of this cluster."""
    return marker is not None and marker.startswith(f"{cluster}/")


def environ_value(pid: int, name: str) -> str | None:
    """One variable of a process's environment, None when unset (or the process is gone)."""
    try:
        environ = (PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return None
    prefix = name.encode() + b"="
    for entry in environ.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix):].decode(errors="replace")
    return None


def marker_of(pid: int) -> str | None:
    """The job marker of a process, None for a process that is not a gpudeck job's (or is gone)."""
    return environ_value(pid, MARKER)


def pids_with_env(name: str, value: str, prefix: bool = False) -> list[int]:
    """Every other live process whose variable `name` is `value` (or starts with it)."""
    own = os.getpid()
    found = []
    for pid in (int(p.name) for p in PROC.iterdir() if p.name.isdigit()):
        seen = environ_value(pid, name) if pid != own else None
        if seen is not None and (seen.startswith(value) if prefix else seen == value):
            found.append(pid)
    return found


def pids_with(marker: str) -> list[int]:
    """Every live process carrying this job marker."""
    return pids_with_env(MARKER, marker)


def signal_all(marker: str, sig: int, leaders: Sequence["Leader"] = ()) -> int:
    """Signal every process of a job and the process group each leads; returns how many were found."""
    return signal_pids(job_pids(marker, leaders), sig)


def signal_pids(pids: list[int], sig: int) -> int:
    """Signal each process and the process group it leads, if it leads one."""
    for pid in pids:
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            continue
    return len(pids)


def alive(marker: str, leaders: Sequence["Leader"] = ()) -> bool:
    return bool(job_pids(marker, leaders))


@dataclass(frozen=True)
class Leader:
    """A process that leads the session of one rank (its exit recorder), as a job's record keeps it."""

    pid: int
    started: int  # clock ticks after boot (field 22 of /proc/PID/stat)

    @classmethod
    def of(cls, pid: int) -> "Leader | None":
        stat = _stat(pid)
        return None if stat is None else cls(pid, stat[1])

    def alive(self) -> bool:
        stat = _stat(self.pid)
        return stat is not None and stat[1] == self.started


def _stat(pid: int) -> tuple[int, int] | None:
    """(session id, start time) of a live process; None for one that is gone or a zombie."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # the name in parentheses may hold spaces
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[3]), int(fields[19])


def session_of(pid: int) -> int | None:
    stat = _stat(pid)
    return None if stat is None else stat[0]


def job_pids(marker: str, leaders: Sequence[Leader] = ()) -> list[int]:
    """The live processes of a job: those with its marker, and those in the sessions its ranks lead.

    The kernel gives no new process the id of a session that still has members, so a session whose
    leader has ended still names only the job's processes; a leader's pid held by a process with
    another start time was given out again after the whole session ended."""
    found = set(pids_with(marker))
    sessions = set()
    for leader in leaders:
        stat = _stat(leader.pid)
        if stat is None or stat[1] == leader.started:
            sessions.add(leader.pid)
    if sessions:
        for pid in (int(p.name) for p in PROC.iterdir() if p.name.isdigit()):
            stat = _stat(pid)
            if stat is not None and stat[0] in sessions:
                found.add(pid)
    found.discard(os.getpid())
    return sorted(found)


async def wait_exit(pid: int) -> None:
    """Return once a process (a child or not) has ended, without polling: a pidfd is readable then."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    ended = loop.create_future()

    def readable() -> None:
        if not ended.done():
            ended.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await ended
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def run_bounded(command: list[str], timeout: float, env: dict[str, str] | None = None,
                      account: Account | None = None) -> int | None:
    """Run a helper program to its end (as `account` where given), its output dropped: its exit
    code, or None when it ran past `timeout`. It never outlives the call, also when the caller is
    cancelled; OSError when it cannot start."""
    process = await asyncio.create_subprocess_exec(*command, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                   stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                                                   **spawn_as(account))
    try:
        return await asyncio.wait_for(process.wait(), timeout)
    except asyncio.TimeoutError:
        return None
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
