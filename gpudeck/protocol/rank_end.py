"""How a rank ended, as the rank itself wrote it to its log directory: its own exit status, when, and
its final traffic totals.

torchrun reports every failed rank as exit 1 and keeps only the first failure in its own log, and a
rank's last traffic datagram may go to an agent that has since restarted on another port. The file
`rank-R.end.json` in `$GPUDECK_LOG_DIR` is what the agent reads instead once the ranks are gone. A
rank killed by a signal writes nothing; the agent then falls back to torchrun's report.

It lives in the shared kernel because the ranks (gpudeck.train) write it and the agent reads it.
Under `gpudeck agent --run-as-owner` the log directory is the job's account's, so whatever the agent
opens there goes through `open_left`: a link, a pipe or a device a job put in place is refused
instead of followed (a log shipped from /etc/shadow) or waited on (a pipe no one writes).
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
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


def open_left(path: Path, flags: int = os.O_RDONLY) -> int:
    """A file descriptor of a plain file a job may have written (or put) at `path`, in blocking
    mode; OSError when it is a link, a pipe, a device, a folder or a second name of another file (a
    hard link, which would let a chown of it change that file)."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            raise OSError(errno.EINVAL, f"{path} is not a plain file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_left(path: Path, limit: int = MAX_FILE) -> str:
    """The text of a small file a rank left (its status, its end); OSError when it is not a plain
    file (see `open_left`) or is larger than `limit`."""
    with open(open_left(path), "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"{path} is larger than {limit} bytes")
    return data.decode(errors="replace")


def _read(path: Path) -> RankEnd | None:
    try:
        data = json.loads(read_left(path))
        traffic = {str(k): int(v) for k, v in dict(data.get("traffic") or {}).items()}
        return RankEnd(rank=int(data["rank"]), exit_code=int(data["exit_code"]), time=float(data["time"]),
                       traffic=traffic)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
