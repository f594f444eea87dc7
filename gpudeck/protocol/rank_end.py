"""How a rank ended, as the rank itself wrote it to its log directory: its own exit status, when, and
its final traffic totals.

torchrun reports every failed rank as exit 1 and keeps only the first failure in its own log, and a
rank's last traffic datagram may go to an agent that has since restarted on another port. The file
`rank-R.end.json` in `$GPUDECK_LOG_DIR` is what the agent reads instead once the ranks are gone. A
rank killed by a signal writes nothing; the agent then falls back to torchrun's report.

It lives in the shared kernel because the ranks (gpudeck.train) write it and the agent reads it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

_NAME = re.compile(r"^rank-(\d+)\.end\.json$")
MAX_FILE = 64 * 1024


@dataclass(frozen=True)
class RankEnd:
    rank: int
    exit_code: int
    time: float
    traffic: dict[str, int] = field(default_factory=dict)


def exit_status(code: object) -> int:
    """The process status `sys.exit(code)` gives: None is 0, an int is itself (mod 256), anything
    else (a message) is 1."""
    if code is None:
        return 0
    if isinstance(code, int) and not isinstance(code, bool):
        return code & 0xFF
    return 1


def write(log_dir: str, end: RankEnd) -> None:
    """Write atomically, so the agent never reads half a file."""
    path = Path(log_dir) / f"rank-{end.rank}.end.json"
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"rank": end.rank, "exit_code": end.exit_code, "time": end.time,
                                   "traffic": end.traffic}))
    os.replace(partial, path)


def read_all(log_dir: Path) -> list[RankEnd]:
    """Every well-formed end file in `log_dir`; a malformed one is skipped (the rank's code is
    then taken from torchrun)."""
    ends = []
    try:
        names = sorted(os.listdir(log_dir))
    except OSError:
        return []
    for name in names:
        if _NAME.match(name):
            end = _read(log_dir / name)
            if end is not None:
                ends.append(end)
    return ends


def _read(path: Path) -> RankEnd | None:
    try:
        if path.stat().st_size > MAX_FILE:
            return None
        data = json.loads(path.read_text())
        traffic = {str(k): int(v) for k, v in dict(data.get("traffic") or {}).items()}
        return RankEnd(rank=int(data["rank"]), exit_code=int(data["exit_code"]), time=float(data["time"]),
                       traffic=traffic)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
