"""The shared vocabulary of jobs and nodes: states, their transitions, and the job spec.

Specs (what was asked) and runs (what happened) are separate: a `JobSpec` never changes after submit;
the coordinator's store keeps the state, attempts and exit codes beside it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from gpudeck.capacity import validate_request
from gpudeck.text import name_problem

MAX_SCRIPT_BYTES = 1024 * 1024
MAX_TIME_LIMIT = 365 * 86400
MAX_RESTARTS = 100
MAX_PRIORITY = 1000  # either way


class JobState(str, Enum):
    """A job's life. Transitions (`TRANSITIONS`; the store refuses any other):

    pending   -> starting   the scheduler placed it; the launch is stored, then sent to its nodes
    starting  -> running    every node reported its ranks started
    starting/running -> succeeded  every node's ranks exited 0
    starting/running -> failed     a rank exited non-zero, the time limit passed, or a node was lost
                                   with no restarts left
    starting/running -> pending    a node was lost and restarts are left, or (starting only) a node
                                   found the rendezvous port taken; the next attempt gets a new number
    pending/starting/running -> cancelled  a user cancelled it
    """

    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)

    @property
    def active(self) -> bool:
        return self in (JobState.STARTING, JobState.RUNNING)


TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.STARTING, JobState.CANCELLED}),
    JobState.STARTING: frozenset({JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED, JobState.PENDING,
                                  JobState.CANCELLED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.PENDING, JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A state change the table does not allow: a bug in the coordinator, never the user's doing."""

    def __init__(self, job_id: int, old: JobState, new: JobState) -> None:
        super().__init__(f"job {job_id} cannot go from {old.value} to {new.value}")


def check_transition(job_id: int, old: JobState, new: JobState) -> None:
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(job_id, old, new)


class NodeState(str, Enum):
    """A joined node's health, from its heartbeats (mDNS adverts never change it).

    up -> suspect   its connection closed or no heartbeat for SUSPECT_AFTER seconds
    suspect -> up   it reconnected or a heartbeat arrived
    suspect -> down no heartbeat for DOWN_AFTER seconds; its jobs' other ranks are stopped
    down -> up      it reconnected
    """

    UP = "up"
    SUSPECT = "suspect"
    DOWN = "down"


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '1h30m', '2d' into seconds; ValueError with a sentence otherwise."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        seconds = float(text)
    else:
        parts = _DURATION_PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise ValueError(f"{text!r} is not a duration (examples: 90s, 10m, 1h30m, 2d)")
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if not 0 < seconds <= MAX_TIME_LIMIT:
        raise ValueError(f"a time limit must be more than zero and at most {MAX_TIME_LIMIT // 86400} days")
    return seconds


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


@dataclass(frozen=True)
class JobSpec:
    """What a user asked for. Exactly one of a script or a built-in workload."""

    name: str
    gpus: int | None = None
    nodes: int | None = None
    gpus_per_node: int | None = None
    priority: int = 0
    time_limit: float | None = None
    max_restarts: int = 0
    script_name: str = ""
    script: bytes = b""
    workload: str = ""
    args: list[str] = field(default_factory=list)
    workdir: str = ""

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> "JobSpec":
        """Build and check a spec from a peer; ValueError with a sentence on anything wrong."""
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown job field {sorted(unknown)[0]!r}")
        try:
            spec = cls(**data)
        except TypeError as exc:
            raise ValueError(f"malformed job: {exc}") from None
        spec.check()
        return spec

    def check(self) -> None:
        _check_types(self)
        problem = name_problem(self.name, "job") or validate_request(self.gpus, self.nodes, self.gpus_per_node)
        if problem:
            raise ValueError(problem)
        if self.time_limit is not None and not 0 < self.time_limit <= MAX_TIME_LIMIT:
            raise ValueError(f"a time limit must be more than zero and at most {MAX_TIME_LIMIT // 86400} days")
        if bool(self.script_name) == bool(self.workload):
            raise ValueError("give either a script or a built-in workload (--workload), not both or neither")
        if self.script_name and not self.script:
            raise ValueError(f"the script {self.script_name} is empty")
        if len(self.script) > MAX_SCRIPT_BYTES:
            raise ValueError(f"the script is over {MAX_SCRIPT_BYTES // 1024} KiB; put large code in modules on every node")
        if "/" in self.script_name or self.script_name.startswith("."):
            raise ValueError("the script name must be a plain file name")
        if not 0 <= self.max_restarts <= MAX_RESTARTS:
            raise ValueError(f"--max-restarts must be between 0 and {MAX_RESTARTS}")
        if not -MAX_PRIORITY <= self.priority <= MAX_PRIORITY:
            raise ValueError(f"--priority must be between -{MAX_PRIORITY} and {MAX_PRIORITY}")


_SPEC_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "gpus": (int, type(None)), "nodes": (int, type(None)),
    "gpus_per_node": (int, type(None)), "priority": (int,), "time_limit": (int, float, type(None)),
    "max_restarts": (int,), "script_name": (str,), "script": (bytes,), "workload": (str,),
    "args": (list,), "workdir": (str,),
}


def _check_types(spec: JobSpec) -> None:
    for name, allowed in _SPEC_TYPES.items():
        value = getattr(spec, name)
        if isinstance(value, bool) or not isinstance(value, allowed):
            raise ValueError(f"job field {name!r} has the wrong type ({type(value).__name__})")
    if not all(isinstance(a, str) for a in spec.args):
        raise ValueError("job arguments must be strings")


# Built-in workloads, by the name `gpudeck submit --workload NAME` takes, with one line each for
# help texts. The coordinator checks names here without importing torch; the code is in gpudeck.train.
WORKLOADS: dict[str, str] = {
    "data-parallel": "DDP: the whole model on every rank, gradients all-reduced every step",
    "parameter-server": "rank 0 holds the parameters; workers pull them and push gradients (--mode sync|async)",
    "pipeline": "the model cut into one stage per rank; activations and gradients pass between neighbours (GPipe)",
}
