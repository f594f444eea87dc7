"""Following a job's logs, as `gpudeck logs` and the dashboard's job screen both do: the coordinator
answers a read with each rank's bytes after the offsets asked for, and the reader cuts them into
whole lines (a line's end may come in a later chunk), starts over when the job restarts as a new
attempt, and keeps what is left of each rank's last line until the stream ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class LineSplitter:
    """Whole lines of several ranks' byte streams; the unfinished end of each waits for the rest."""

    def __init__(self) -> None:
        self._partial: dict[int, bytes] = {}

    def feed(self, rank: int, data: bytes) -> list[bytes]:
        *lines, self._partial[rank] = (self._partial.get(rank, b"") + data).split(b"\n")
        return lines

    def rest(self) -> list[tuple[int, bytes]]:
        """The unfinished last line of each rank (rank order), once nothing more will come; forgets them."""
        left = [(rank, rest) for rank, rest in sorted(self._partial.items()) if rest]
        self._partial.clear()
        return left


@dataclass(frozen=True)
class LogStep:
    """What one read of the logs brought: the lines, by rank, in the order to show them; `restarted`
    when they belong to a new attempt (what was shown is of the one before); `more` when any rank
    had bytes (read again at once); `finished` when the job has (`state` says how); `ended` when it
    finished and all of it was read."""

    attempt: int
    state: str
    lines: list[tuple[int, bytes]]
    restarted: bool
    more: bool
    finished: bool
    ended: bool


class LogTail:
    """Where a reader is in a job's logs: the offset of each rank's stream and the attempt they count in."""

    def __init__(self) -> None:
        self.offsets: dict[str, int] = {}
        self.attempt: int | None = None
        self._lines = LineSplitter()

    def take(self, reply: dict[str, Any]) -> LogStep:
        """Move past a `read_logs` reply (its attempt, each rank's chunk, whether the job finished)."""
        restarted = self.attempt is not None and reply["attempt"] != self.attempt
        if restarted:
            self.offsets, self._lines = {}, LineSplitter()
        self.attempt = reply["attempt"]
        lines: list[tuple[int, bytes]] = []
        for rank, data in sorted(reply["chunks"].items(), key=lambda kv: int(kv[0])):
            self.offsets[rank] = self.offsets.get(rank, 0) + len(data)
            lines += [(int(rank), line) for line in self._lines.feed(int(rank), data)]
        more = any(reply["chunks"].values())
        finished = bool(reply["finished"])
        if finished and not more:
            lines += self._lines.rest()
        return LogStep(reply["attempt"], reply["state"], lines, restarted, more, finished, finished and not more)

    def rest(self) -> list[tuple[int, bytes]]:
        """The unfinished last line of each rank, for a reader that stops before the job ends."""
        return self._lines.rest()
