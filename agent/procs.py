"""Finding a job's processes by the marker in their environment.

torchrun starts every rank in a session of its own, so the launcher's process group does not hold
the ranks, and a rank whose torchrun died is re-parented away from it. What every process of a job
keeps, whoever its parent, is the environment it inherited: `GPUDECK_RUN=<node>/<job>/<attempt>`.
"""

from __future__ import annotations

import os
from pathlib import Path

MARKER = "GPUDECK_RUN"
PROC = Path("/proc")


def run_marker(node: str, job: int, attempt: int) -> str:
    return f"{node}/{job}/{attempt}"


def marker_of(pid: int) -> str | None:
    """The job marker of a process, None for a process that is not a gpudeck job's (or is gone)."""
    try:
        environ = (PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return None
    prefix = MARKER.encode() + b"="
    for entry in environ.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix):].decode(errors="replace")
    return None


def pids_with(marker: str) -> list[int]:
    """Every live process carrying this marker."""
    own = os.getpid()
    return [pid for pid in (int(p.name) for p in PROC.iterdir() if p.name.isdigit())
            if pid != own and marker_of(pid) == marker]


def signal_all(marker: str, sig: int) -> int:
    """Signal every process of a job and the process group each leads; returns how many were found."""
    pids = pids_with(marker)
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
