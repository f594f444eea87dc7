"""Job arrays and references to jobs, read and written the same way by the CLI, the coordinator and the
dashboard.

`--array 0-31%4` (or `0,3,5-7`) asks for one job per index, at most 4 of them running at once. Each
task is a job of its own whose `array_job` is the id of the array's first task, which is also the
array's id; a person names a task `ARRAY.INDEX` (`12.3`), and `12` alone names the whole array where
a whole makes sense (cancel, --after). The bounds keep what one submit can make the coordinator hold:
at most MAX_ARRAY_TASKS rows, and at most MAX_ARRAY_BYTES of their specs in its memory.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

MAX_ARRAY_TASKS = 10_000
MAX_ARRAY_INDEX = 1_000_000
MAX_ARRAY_TEXT = 1000  # characters of an --array value
MAX_ARRAY_BYTES = 64 * 1024 * 1024  # of all the tasks' specs together, kept in the coordinator's memory
MAX_DEPENDENCIES = 100  # jobs named by --after and --after-any together
MAX_JOB_ID = 2**63 - 1  # SQLite's and msgpack's largest integer

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
_REF = re.compile(r"^(\d+)(?:\.(\d+))?$")
ARRAY_EXAMPLES = "like 0-31, 0-31%4 to run at most 4 at once, or 0,3,5-7"


@dataclass(frozen=True)
class ArraySpec:
    """The indices an --array asks for, lowest first and each once, and how many tasks may run at
    once (0: no limit)."""

    indices: tuple[int, ...]
    throttle: int


@functools.lru_cache(maxsize=256)
def parse_array(text: str) -> ArraySpec:
    """'0-31%4', '0,3,5-7', '7' into its indices and throttle; ValueError with a sentence otherwise.
    The number of tasks is counted from the ranges before any is expanded, so a huge range costs nothing."""
    if len(text) > MAX_ARRAY_TEXT:
        raise ValueError(f"an --array is at most {MAX_ARRAY_TEXT} characters long")
    listed, percent, throttle_text = text.strip().partition("%")
    if not listed:
        raise ValueError(f"give the indices of the array's tasks ({ARRAY_EXAMPLES})")
    ranges = [_index_range(part.strip()) for part in listed.split(",")]
    count = sum(last - first + 1 for first, last in ranges)
    if count > MAX_ARRAY_TASKS:
        raise ValueError(f"{listed} is {count} tasks; an array has at most {MAX_ARRAY_TASKS}")
    throttle = 0
    if percent:
        if not throttle_text.strip().isdecimal() or int(throttle_text) < 1:
            raise ValueError(f"after % comes how many tasks may run at once, a whole number of at least 1, "
                             f"not {throttle_text!r}")
        throttle = min(int(throttle_text), MAX_ARRAY_TASKS)
    indices = sorted({index for first, last in ranges for index in range(first, last + 1)})
    return ArraySpec(tuple(indices), throttle)


def _index_range(part: str) -> tuple[int, int]:
    match = _RANGE.match(part)
    if not match:
        raise ValueError(f"{part!r} is not an index or a range of indices ({ARRAY_EXAMPLES})")
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) is not None else first
    if last < first:
        raise ValueError(f"the range {part} goes down: write {last}-{first}")
    if last > MAX_ARRAY_INDEX:
        raise ValueError(f"array indices go from 0 to {MAX_ARRAY_INDEX}, and {last} is above that")
    return first, last


def compress(indices: Sequence[int]) -> str:
    """Indices as the shortest --array text: [0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    parts: list[str] = []
    ordered = sorted(indices)
    start = 0
    for position in range(1, len(ordered) + 1):
        if position == len(ordered) or ordered[position] != ordered[position - 1] + 1:
            first, last = ordered[start], ordered[position - 1]
            parts.append(str(first) if first == last else f"{first}-{last}")
            start = position
    return ",".join(parts)


def parse_ref(text: str) -> tuple[int, int | None]:
    """'12' -> (12, None), a job or a whole array; '12.3' -> (12, 3), task 3 of array 12. ValueError
    with a sentence otherwise."""
    match = _REF.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a job id (a whole number, like 12, or ARRAY.INDEX for one task of "
                         "an array, like 12.3)")
    job, index = int(match.group(1)), match.group(2)
    if not 1 <= job <= MAX_JOB_ID:
        raise ValueError(f"{text} is not a job id (job ids start at 1)")
    if index is not None and int(index) > MAX_ARRAY_INDEX:
        raise ValueError(f"{text} is not a task of an array (array indices go from 0 to {MAX_ARRAY_INDEX})")
    return job, None if index is None else int(index)


def ref_text(job: int, index: int | None) -> str:
    """The text `parse_ref` reads back: '12' or '12.3'."""
    return str(job) if index is None else f"{job}.{index}"


def job_label(job_id: int, array_job: int | None, array_index: int | None) -> str:
    """How a person names a job: its id, or ARRAY.INDEX for a task of an array."""
    return ref_text(array_job, array_index) if array_job is not None and array_index is not None else str(job_id)
