"""Finding a job's processes by the marker in their environment.

torchrun starts every rank in a session of its own, so the launcher's process group does not hold
the ranks, and a rank whose torchrun died is re-parented away from it. What every process of a job
keeps, whoever its parent, is the environment it inherited:
`GPUDECK_RUN=<cluster>/<node>/<job>/<attempt>`. The cluster part (see `JoinToken.cluster`) keeps two
clusters that share a machine, and a node name, off each other's processes.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

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


def signal_all(marker: str, sig: int) -> int:
    """Signal every process of a job and the process group each leads; returns how many were found."""
    return signal_pids(pids_with(marker), sig)


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


def alive(marker: str) -> bool:
    return bool(pids_with(marker))


async def run_bounded(command: list[str], timeout: float, env: dict[str, str] | None = None) -> int | None:
    """Run a helper program to its end, its output dropped: its exit code, or None when it ran past
    `timeout`. It never outlives the call, also when the caller is cancelled; OSError when it cannot
    start."""
    process = await asyncio.create_subprocess_exec(*command, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                   stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        return await asyncio.wait_for(process.wait(), timeout)
    except asyncio.TimeoutError:
        return None
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
