"""The types of the command line's values for argparse: each reads a word into a value, or says why it
cannot, so that a wrong value is a usage error (exit code 2) before anything is asked of the coordinator."""

from __future__ import annotations

import argparse
from typing import Callable

from gpudeck import config
from gpudeck.arrays import parse_array, parse_ref, ref_text
from gpudeck.capacity import MAX_GPUS_PER_NODE
from gpudeck.config import split_address
from gpudeck.model import JobState, duration_seconds, parse_duration, parse_shape, parse_size

UNFINISHED_STATES = [state.value for state in JobState if not state.finished]
FINISHED_STATES = [state.value for state in JobState if state.finished]


def job_id(text: str) -> tuple[int, int | None]:
    """A job for argparse: its id (12), or ARRAY.INDEX for one task of an array (12.3), as (12, 3)."""
    try:
        return parse_ref(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def job_list(text: str) -> list[str]:
    """--after for argparse: jobs separated by commas (7,12.3), each as `job_id` reads it."""
    return [ref_text(*job_id(part)) for part in text.split(",")]


def job_array(text: str) -> str:
    """--array for argparse: indices and an optional throttle (0-31%4, 0,3,5-7), checked here so that
    a wrong one is a usage error before anything is shipped."""
    try:
        parse_array(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.strip()


def bounded(low: int, high: int) -> Callable[[str], int]:
    """An argparse type for a whole number from `low` to `high`, so that no number from the command line
    overflows the wire (msgpack), SQLite or a socket call; out of range is a usage error (2)."""

    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is not from {low} to {high}")
        return value

    return whole_number


small_int = bounded(-1_000_000, 1_000_000)  # ranks (negative: torchrun's own output) and attempts
port_number = bounded(1, 65535)
simulated_gpus = bounded(0, MAX_GPUS_PER_NODE)  # 0: the node's real GPUs, as without the flag


def duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


WEIGHT_NAMES = ("fair-share", "age", "priority")  # the factors of a pending job's priority


def priority_weights(text: str) -> dict[str, float]:
    """--priority-weights for argparse: 'fair-share=10000,age=1000,priority=1000', any of them."""
    weights = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip().replace("_", "-")
        if name not in WEIGHT_NAMES:
            raise argparse.ArgumentTypeError(f"{name!r} is not a priority factor (they are {', '.join(WEIGHT_NAMES)}; "
                                             "example: fair-share=10000,age=1000,priority=1000)")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not 0 <= weight <= 1e9:
            raise argparse.ArgumentTypeError(f"the weight of {name} must be a number from 0 to 1000000000, "
                                             f"not {value.strip()!r}")
        weights[name.replace("-", "_")] = weight
    return weights


def size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def gpu_shape(text: str) -> tuple[int | None, int | None, int | None]:
    """--gpus for argparse: G GPUs, or NxG (N nodes with G GPUs each), read as the dashboard's form reads it."""
    try:
        return parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def job_states(text: str) -> list[str]:
    """--state for argparse: states separated by commas; any other word is a usage error naming the states."""
    states = [part.strip().lower() for part in text.split(",")]
    for state in states:
        if state not in UNFINISHED_STATES + FINISHED_STATES:
            raise argparse.ArgumentTypeError(f"{state!r} is not a job state (the states are "
                                             f"{', '.join(UNFINISHED_STATES + FINISHED_STATES)})")
    return states


def since_time(text: str) -> float:
    """--since for argparse: how long ago (2h, 3d, 1h30m) or a date with an optional time (2026-12-01,
    2026-12-01T09:30, in local time unless it names a zone), as epoch seconds."""
    import datetime
    import time

    try:
        return max(time.time() - duration_seconds(text), 0.0)
    except ValueError:
        pass
    try:
        return datetime.datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither how long ago (like 2h or 3d) nor a date (like "
                                         "2026-12-01 or 2026-12-01T09:30)") from None


def coordinator_address(text: str) -> str:
    """--coordinator for argparse: a malformed HOST:PORT is a usage error (2), not a refusal."""
    try:
        split_address(text, config.DEFAULT_PORT)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def metrics_address(text: str) -> tuple[str, int]:
    """--metrics for argparse: HOST:PORT, or a port alone for loopback (nobody else reads it then)."""
    if text.isdigit():
        text = f"127.0.0.1:{text}"
    try:
        return split_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def port_range(text: str) -> tuple[int, int]:
    """'29500-29999' (or one port) for argparse, with a sentence when it is not a range of ports."""
    first, _, last = text.partition("-")
    try:
        low, high = int(first), int(last or first)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not FIRST-LAST (like 29500-29999)") from None
    if not 1024 <= low <= high <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} must be ports from 1024 to 65535, the first not above the last")
    return low, high


def gpu_ref(text: str) -> tuple[str, int]:
    """NODE:INDEX for argparse ('node-b:3')."""
    node, sep, index = text.rpartition(":")
    if not sep or not node or not index.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not NODE:INDEX (like node-b:3, as `gpudeck nodes` lists them)")
    return node, int(index)
