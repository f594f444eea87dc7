"""The record of one attempt of a job on this node, kept in its folder so a restarted agent adopts it.

What started the attempt's processes (see `launchers`) writes down how to find them again: the
launcher's process group, the sessions its ranks lead, its container. Every process of the attempt
is found by its marker or its ranks' sessions (see `procs`), so a cancel, a time limit or the loss
of another node of the job stops every rank.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gpudeck.agent.procs import Leader, alive, run_marker, signal_all

_RANK_LOG = re.compile(r"^rank-(\d+)\.log$")
_SAVED = ("node", "job", "attempt", "node_rank", "gpus", "pgid", "cluster", "environment", "container", "ranks",
          "leaders", "forked")


@dataclass
class RunningJob:
    """One attempt of one job on this node; `pgid` is the launcher's process group."""

    node: str
    job: int
    attempt: int
    node_rank: int
    gpus: list[int]
    directory: str
    pgid: int = 0
    cluster: str = ""  # whose job: an agent adopts only its own cluster's (see procs)
    exit_code: int | None = None
    detail: str = ""
    failed_at: float | None = None  # when its first failing rank ended (see exits)
    retry: bool = False  # could not start for a reason of the moment: place the job again
    kill_reason: str = ""
    environment: str = ""  # the key of the built environment it runs in, "" for none
    container: list[str] = field(default_factory=list)  # with --image: the runtime and the container's name
    ranks: list[int] = field(default_factory=list)  # ranks the agent started itself (none under torchrun)
    leaders: list[list[int]] = field(default_factory=list)  # their recorders: [pid, start time] each
    forked: int = 0  # how many of them were forked from a warm interpreter
    sent_offsets: dict[int, int] = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, int]:
        return self.job, self.attempt

    @property
    def marker(self) -> str:
        return run_marker(self.cluster, self.node, self.job, self.attempt)

    @property
    def path(self) -> Path:
        return Path(self.directory)

    @property
    def sessions(self) -> list[Leader]:
        return [Leader(pid, started) for pid, started in self.leaders]

    def alive(self) -> bool:
        return alive(self.marker, self.sessions)

    def signal(self, sig: int) -> None:
        signal_all(self.marker, sig, self.sessions)

    @property
    def launcher_rank(self) -> int:
        """Log channel of this node's torchrun: below zero, so it never collides with a rank."""
        return -(self.node_rank + 1)

    def log_files(self) -> dict[int, Path]:
        files = {self.launcher_rank: self.path / "launcher.log"}
        logs = self.path / "logs"
        if logs.is_dir():
            for path in logs.iterdir():
                if match := _RANK_LOG.match(path.name):
                    files[int(match.group(1))] = path
        return files

    def save(self) -> None:
        record = {k: v for k, v in asdict(self).items() if k in _SAVED}
        (self.path / "job.json").write_text(json.dumps(record))


def load_job(directory: Path) -> RunningJob | None:
    """The attempt an agent recorded in `directory`, None where no readable record is."""
    try:
        record = json.loads((directory / "job.json").read_text())
        return RunningJob(directory=str(directory), **record)
    except (OSError, ValueError, TypeError):
        return None
