"""Job logs as files under the coordinator's state directory, one per job attempt and rank.

A rank below zero is the launcher (torchrun) of node rank -rank-1, whose output explains failures
that happen before any rank starts. Agents send chunks with their offset in the rank's log, so a
chunk sent twice (after a reconnect) lands on the same bytes instead of being appended again.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

READ_LIMIT = 256 * 1024
_RANK_FILE = re.compile(r"^rank-(-?\d+)\.log$")


class LogStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _dir(self, job: int, attempt: int) -> Path:
        return self.root / str(job) / str(attempt)

    def write(self, job: int, attempt: int, rank: int, offset: int, data: bytes) -> None:
        directory = self._dir(job, attempt)
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / f"rank-{rank}.log", os.O_WRONLY | os.O_CREAT, 0o640)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def ranks(self, job: int, attempt: int) -> list[int]:
        directory = self._dir(job, attempt)
        if not directory.is_dir():
            return []
        return sorted(int(m.group(1)) for p in directory.iterdir() if (m := _RANK_FILE.match(p.name)))

    def sizes(self, job: int, attempt: int) -> dict[int, int]:
        """How many bytes of each rank's log are here."""
        directory = self._dir(job, attempt)
        return {rank: (directory / f"rank-{rank}.log").stat().st_size for rank in self.ranks(job, attempt)}

    def read(self, job: int, attempt: int, offsets: dict[int, int], rank: int | None = None,
             limit: int = READ_LIMIT) -> dict[int, bytes]:
        """Bytes after each rank's offset, at most `limit` in all, so a follower catches up in steps."""
        chunks: dict[int, bytes] = {}
        budget = limit
        for r in [rank] if rank is not None else self.ranks(job, attempt):
            path = self._dir(job, attempt) / f"rank-{r}.log"
            if budget <= 0 or not path.exists():
                continue
            with open(path, "rb") as handle:
                handle.seek(offsets.get(r, 0))
                chunks[r] = handle.read(budget)
            budget -= len(chunks[r])
        return chunks


def rank_problem(job: int, rank: int, ranks: int, nodes: int | None, most_nodes: int) -> str | None:
    """Why `rank` names no log of a job with `ranks` ranks (0 for a command, which has only its nodes'
    own output) on `nodes` nodes (None before it is placed: up to `most_nodes`), naming those it has;
    None when the rank is the job's, with or without a log yet (a follower waits for it)."""
    if 0 <= rank < ranks or (rank < 0 and -rank <= (nodes or most_nodes)):
        return None
    own = _span(-1, -nodes) if nodes else "-1 and below"
    if not ranks:
        return (f"job {job} has no rank {rank}: it runs a command once per node, so its output is under "
                f"ranks {own} (or leave out --rank)")
    listed = "its only rank is 0" if ranks == 1 else f"its ranks are {_span(0, ranks - 1)}"
    whose = "its node's" if nodes == 1 else "each node's"
    return f"job {job} has no rank {rank}: {listed} (and {own} for {whose} own output)"


def _span(first: int, last: int) -> str:
    """'0', '0 and 1', '0 to 7' (or '-1 to -4')."""
    if first == last:
        return str(first)
    return f"{first} and {last}" if abs(last - first) == 1 else f"{first} to {last}"
