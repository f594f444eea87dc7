"""How this node's ranks of an attempt ended, once they are gone: which rank failed first, with what.

The ranks' own end files (`gpudeck.protocol.rank_end`) say each rank's exact status; a rank killed
by a signal leaves none. Ranks the agent starts itself each run under an exit recorder that leaves
`rank-R.exit` (the shell's status: 128 + N for signal N) when the rank is gone, whoever watched.
Under torchrun, which exits 1 whatever its ranks did, the "Root Cause (first observed failure)"
section of its log names the rank and the signal instead.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from pathlib import Path

from gpudeck.protocol import rank_end

_ROOT_CAUSE = "Root Cause (first observed failure):"
_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)", re.MULTILINE)
_EXITCODE = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)", re.MULTILINE)
LAUNCHER_TAIL = 64 * 1024


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    detail: str  # which rank, with what: "rank 1 exited with code 3"; "" when all succeeded
    failed_at: float | None  # when the first failing rank ended, for ordering failures across nodes


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def outcome(job_dir: Path, launcher_code: int, now: float) -> Outcome:
    """The node's outcome: torchrun says which rank failed first, the rank's end file with what;
    a first failure without an end file died by a signal (or os._exit), before the ranks that then
    lost their peer and wrote theirs."""
    ends = {end.rank: end for end in rank_end.read_all(job_dir / "logs")}
    failed = sorted((end for end in ends.values() if end.exit_code != 0), key=lambda end: (end.time, end.rank))
    cause = _root_cause(job_dir / "launcher.log") if launcher_code != 0 else None
    if cause is not None and cause[0] not in ends:
        rank, code = cause
        failed_at = failed[0].time if failed else now
        if code < 0:
            return Outcome(128 - code, f"rank {rank} was killed by {signal_name(-code)}", failed_at)
        return Outcome(code, f"rank {rank} exited with code {code}", failed_at)
    if cause is not None and ends[cause[0]].exit_code != 0:
        first = ends[cause[0]]
    elif failed:
        first = failed[0]
    else:
        return Outcome(launcher_code, "", now if launcher_code else None)
    return Outcome(first.exit_code, f"rank {first.rank} exited with code {first.exit_code}", first.time)


def _root_cause(launcher_log: Path) -> tuple[int, int] | None:
    """(rank, exitcode) of torchrun's first observed failure, exitcode negative for a signal."""
    try:
        with open(launcher_log, "rb") as handle:
            handle.seek(0, 2)
            handle.seek(max(0, handle.tell() - LAUNCHER_TAIL))
            text = handle.read().decode(errors="replace")
    except OSError:
        return None
    _, found, section = text.rpartition(_ROOT_CAUSE)
    rank, code = _RANK.search(section), _EXITCODE.search(section)
    if not found or rank is None or code is None:
        return None
    return int(rank.group(1)), int(code.group(1))


def traffic_totals(job_dir: Path) -> dict[int, dict[str, int]]:
    """Final totals by rank from the end files: exact, whatever datagrams were lost."""
    return {end.rank: dict(end.traffic) for end in rank_end.read_all(job_dir / "logs")}


def rank_exit_file(log_dir: Path, rank: int) -> Path:
    return log_dir / f"rank-{rank}.exit"


def ranks_outcome(job_dir: Path, ranks: list[int], now: float) -> Outcome:
    """The node's outcome for ranks the agent started: the first rank to fail, by when its recorder
    saw it end (those stopped because of it end later); a status the end file lacks came from a signal."""
    logs = job_dir / "logs"
    ends = {end.rank: end for end in rank_end.read_all(logs)}
    failures: list[tuple[float, int, int, str]] = []
    for rank in ranks:
        path = rank_exit_file(logs, rank)
        try:
            recorded: int | None = int(rank_end.read_left(path).strip())
            ended = path.lstat().st_mtime
        except (OSError, ValueError):
            recorded, ended = None, ends[rank].time if rank in ends else now
        if rank in ends:
            code = ends[rank].exit_code
            detail = f"rank {rank} exited with code {code}"
        elif recorded is None:
            code, detail = 137, f"rank {rank} ended and left no exit status (it was killed with its recorder)"
        elif recorded > 128:
            code, detail = recorded, f"rank {rank} was killed by {signal_name(recorded - 128)}"
        else:
            code, detail = recorded, f"rank {rank} exited with code {recorded}"
        if code != 0:
            failures.append((ended, rank, code, detail))
    if not failures:
        return Outcome(0, "", None)
    ended, _, code, detail = min(failures)
    return Outcome(code, detail, ended)


def rank_failed(logs: Path, rank: int) -> bool:
    """Whether a rank that ended failed: its recorder's status, or no status at all (killed with it)."""
    return _recorded_status(logs, rank) != 0


def _recorded_status(logs: Path, rank: int) -> int | None:
    try:
        return int(rank_end.read_left(rank_exit_file(logs, rank)).strip())
    except (OSError, ValueError):
        return None


def rank_status(logs: Path, rank: int) -> str:
    code = _recorded_status(logs, rank)
    if code is None:
        return "it left no exit status"
    return f"killed by {signal_name(code - 128)}" if code > 128 else f"exit code {code}"


def recorded_exit(job_dir: Path) -> int | None:
    """The exit code the launcher's shell recorded (torchrun's, the command's), None without one."""
    try:
        return int(rank_end.read_left(job_dir / "exit_code").strip())
    except (OSError, ValueError):
        return None
