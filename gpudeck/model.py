"""The shared vocabulary of jobs and nodes: states, their transitions, and the job spec.

Specs (what was asked) and runs (what happened) are separate: a `JobSpec` never changes after submit;
the coordinator's store keeps the state, attempts and exit codes beside it.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from enum import Enum
from typing import Any

from gpudeck.arrays import MAX_ARRAY_BYTES, MAX_DEPENDENCIES, parse_array, parse_ref
from gpudeck.capacity import validate_request
from gpudeck.doctor import check_args_problem
from gpudeck.project import DIGEST, path_problem
from gpudeck.text import name_problem

MAX_SCRIPT_BYTES = 1024 * 1024
MAX_TIME_LIMIT = 365 * 86400
MAX_RESTARTS = 100
MAX_PRIORITY = 1000  # either way
DOCTOR = "doctor"  # the built-in workload of `gpudeck doctor` (not one for `submit --workload`)
MAX_DOCTOR_NODES = 64
_DOCTOR_FIELDS = frozenset({"name", "run", "on_nodes"})  # all a check may set, and of its run:
_DOCTOR_RUN_FIELDS = frozenset({"workload", "args"})


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
    pending   -> failed     a job it was to run after (--after) failed or was cancelled: it never can
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
    JobState.PENDING: frozenset({JobState.STARTING, JobState.CANCELLED, JobState.FAILED}),
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


def duration_seconds(text: str) -> float:
    """'90', '90s', '10m', '1h30m', '2d' into seconds, of any length; ValueError with a sentence otherwise."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{text!r} is not a duration (examples: 90s, 10m, 1h30m, 2d)")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


def parse_duration(text: str) -> float:
    """A time limit: `duration_seconds`, more than zero and at most MAX_TIME_LIMIT."""
    seconds = duration_seconds(text)
    if not 0 < seconds <= MAX_TIME_LIMIT:
        raise ValueError(f"a time limit must be more than zero and at most {MAX_TIME_LIMIT // 86400} days")
    return seconds


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?$")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str) -> int:
    """'512M', '8G', '1.5GiB', '4096' into bytes; ValueError with a sentence otherwise."""
    match = _SIZE.match(text.strip().lower())
    if not match:
        raise ValueError(f"{text!r} is not a size (examples: 512M, 8G, 1T)")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if size <= 0:
        raise ValueError("a size must be more than zero")
    return size


def parse_shape(text: str) -> tuple[int | None, int | None, int | None]:
    """'4' -> 4 GPUs anywhere; '2x4' (or 2*4, 2 x 4) -> 2 nodes with 4 GPUs each, as (gpus, nodes,
    gpus per node). The dashboard's form and `submit --gpus` read the same text the same way."""
    cleaned = text.strip().lower().replace(" ", "").replace("*", "x").replace("×", "x")
    if not cleaned:
        raise ValueError("say how many GPUs: G, or N nodes x G GPUs per node (like 2x4)")
    if "x" in cleaned:
        nodes, _, per_node = cleaned.partition("x")
        if not nodes.isdecimal() or not per_node.isdecimal():
            raise ValueError(f"{text.strip()!r} is not NxG (like 2x4: 2 nodes with 4 GPUs each)")
        return None, int(nodes), int(per_node)
    if not cleaned.isdecimal():
        raise ValueError(f"{text.strip()!r} is not a number of GPUs (like 2, or 2x4 for 2 nodes x 4 GPUs)")
    return int(cleaned), None, None


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
class RunSpec:
    """What runs, wherever and whenever the scheduler places it: the code, its arguments and what it
    runs in. Exactly one of a script, a built-in workload or a command. A launch carries it whole to
    every node (as torch elastic keeps a worker's spec apart from the run), so a new run option is a
    field here, a flag of `gpudeck submit` and the agent code that reads it, and nothing between."""

    script_name: str = ""
    script: bytes = b""
    workload: str = ""
    args: list[str] = field(default_factory=list)
    workdir: str = ""  # without a project: the submitter's directory
    project: str = ""  # the manifest digest of the shipped project (see gpudeck.project)
    subdir: str = ""  # where in the project the job runs (the folder submit ran from)
    command: list[str] = field(default_factory=list)  # a command run once per node instead of a script
    env: dict[str, str] = field(default_factory=dict)
    python: str = ""  # an interpreter on the nodes, instead of the agent's
    venv: str = ""  # a virtual environment on the nodes, instead of the agent's
    requirements: dict[str, bytes] = field(default_factory=dict)  # what the job's environment is built from
    image: str = ""  # a container image to run the job in (podman or docker on the nodes)
    launcher: str = ""  # "torchrun": torchrun starts each node's ranks; "": the agent starts them itself

    @property
    def what(self) -> list[str]:
        """What runs, as the job's command line shows it."""
        if self.command:
            return ["--", *self.command]
        return [self.script_name or f"--workload {self.workload}", *self.args]

    def check(self) -> None:
        """ValueError with a sentence on anything wrong; the types are checked first (`_check_types`)."""
        if [bool(self.script_name), bool(self.workload), bool(self.command)].count(True) != 1:
            raise ValueError("give one of a script, a built-in workload (--workload) or a command (-- CMD)")
        self._check_code()
        self._check_environment()

    def _check_code(self) -> None:
        if self.project:
            if not DIGEST.match(self.project):
                raise ValueError("the job's project is not a manifest digest")
            for label, path in (("script", self.script_name), ("folder", self.subdir)):
                problem = path and path_problem(path)
                if problem:
                    raise ValueError(f"the {label} {path!r} is not inside the project: {problem}")
            return
        if self.script_name and not self.script:
            raise ValueError(f"the script {self.script_name} is empty")
        if len(self.script) > MAX_SCRIPT_BYTES:
            raise ValueError(f"the script is over {MAX_SCRIPT_BYTES // 1024} KiB; ship it in a project (the default)")
        if "/" in self.script_name or self.script_name.startswith("."):
            raise ValueError("the script name must be a plain file name")

    def _check_environment(self) -> None:
        if len(self.env) > MAX_ENV or sum(len(k) + len(v) for k, v in self.env.items()) > MAX_SETUP_BYTES:
            raise ValueError(f"at most {MAX_ENV} environment variables, of {MAX_SETUP_BYTES // 1024} KiB in all")
        for key, value in self.env.items():
            if not _ENV_NAME.match(key):
                raise ValueError(f"{key!r} is not a usable environment variable name (letters, digits and _)")
            if key.startswith("GPUDECK_") or key in RESERVED_ENV:
                raise ValueError(f"{key} is set by gpudeck for every job (the GPUs it was given, its rendezvous, "
                                 "its place): it cannot be set with --env")
            if "\0" in value:
                raise ValueError(f"the value of {key} holds a NUL byte")
        if sum(bool(x) for x in (self.python, self.venv, self.requirements, self.image)) > 1:
            raise ValueError("give at most one of --python, --venv, --requirements and --image")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"{self.launcher!r} is not a launcher (the agent starts the ranks, or \"torchrun\")")
        if self.launcher and self.command:
            raise ValueError("--torchrun starts a script's ranks; a command (-- CMD) starts its own")
        if self.image and not _IMAGE.match(self.image):
            raise ValueError(f"{self.image!r} is not a container image name (like python:3.11 or ghcr.io/org/img:tag)")
        for label, path in (("--python", self.python), ("--venv", self.venv)):
            if path and (not path.startswith("/") or "\0" in path):
                raise ValueError(f"{label} must be an absolute path on the nodes")
        if self.requirements and (set(self.requirements) - set(REQUIREMENT_FILES)
                                  or sum(map(len, self.requirements.values())) > MAX_SETUP_BYTES):
            raise ValueError("the requirements must be a requirements file, a pyproject.toml or a uv.lock "
                             f"with its pyproject.toml, of at most {MAX_SETUP_BYTES // 1024} KiB")


@dataclass(frozen=True)
class JobSpec:
    """What a user asked for: what runs (`run`), and how the scheduler is to place it (GPUs, nodes,
    priority, limits, order)."""

    name: str
    run: RunSpec
    gpus: int | None = None
    nodes: int | None = None
    gpus_per_node: int | None = None
    priority: int = 0
    time_limit: float | None = None
    max_restarts: int = 0
    project_files: int = 0  # of the run's project: filled in by the coordinator from the manifest
    project_bytes: int = 0
    project_uploaded: int = 0  # of which the submitting client uploaded (the rest was already there)
    preemptible: bool = False  # may be stopped (and requeued) for a pending job of higher --priority
    after: list[str] = field(default_factory=list)  # jobs ('7', or a task '12.3') that must succeed first
    after_any: list[str] = field(default_factory=list)  # jobs that must end first, however they end
    array: str = ""  # --array as given ('0-31%4'): one job per index (see gpudeck.arrays)
    hang_timeout: float | None = None  # cancel it once its ranks completed no collective this long
    on_nodes: list[str] = field(default_factory=list)  # one rank on each and no GPU: gpudeck doctor's check only

    @property
    def total_gpus(self) -> int:
        """The GPUs the job holds in all, one rank on each: --gpus, or --nodes x --gpus-per-node."""
        return self.gpus if self.gpus is not None else (self.nodes or 0) * (self.gpus_per_node or 0)

    @property
    def ranks(self) -> int:
        """The ranks it runs in all: one per GPU, one per node gpudeck doctor's check names, none
        for a command (it runs once per node, and its output is each node's own)."""
        return 0 if self.run.command else len(self.on_nodes) or self.total_gpus

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> "JobSpec":
        """Build and check a spec from a peer; ValueError with a sentence on anything wrong."""
        run = data.get("run")
        unknown = (set(data) - set(cls.__dataclass_fields__)) \
            | (set(run) - set(RunSpec.__dataclass_fields__) if isinstance(run, dict) else set())
        if unknown:
            raise ValueError(f"unknown job field {sorted(unknown)[0]!r}")
        try:
            spec = cls(**{**data, **({"run": RunSpec(**run)} if isinstance(run, dict) else {})})
        except TypeError as exc:
            raise ValueError(f"malformed job: {exc}") from None
        spec.check()
        return spec

    def check(self) -> None:
        _check_types(self)
        problem = name_problem(self.name, "job") or self._placement_problem()
        if problem:
            raise ValueError(problem)
        if self.time_limit is not None and not 0 < self.time_limit <= MAX_TIME_LIMIT:
            raise ValueError(f"a time limit must be more than zero and at most {MAX_TIME_LIMIT // 86400} days")
        if self.hang_timeout is not None and not 0 < self.hang_timeout <= MAX_TIME_LIMIT:
            raise ValueError(f"a hang timeout must be more than zero and at most {MAX_TIME_LIMIT // 86400} days")
        self.run.check()
        self._check_order()
        if not 0 <= self.max_restarts <= MAX_RESTARTS:
            raise ValueError(f"--max-restarts must be from 0 to {MAX_RESTARTS}, not {self.max_restarts}")
        if not -MAX_PRIORITY <= self.priority <= MAX_PRIORITY:
            raise ValueError(f"--priority must be from -{MAX_PRIORITY} to {MAX_PRIORITY}, not {self.priority}")

    def _placement_problem(self) -> str | None:
        """Why the GPUs or nodes asked for cannot be, or None. Only the built-in check of `gpudeck
        doctor` may name its nodes and take no GPU, and it runs gpudeck's own code and nothing else:
        a job that holds no GPU and bypasses the queue's limits can be nobody's training script (no
        project, folder, interpreter, image, environment or variables of theirs)."""
        if self.run.workload != DOCTOR and not self.on_nodes:
            return validate_request(self.gpus, self.nodes, self.gpus_per_node)
        if self.run.workload != DOCTOR or not self.on_nodes:
            return "only gpudeck doctor runs its check, on the nodes it names"
        if (self.gpus, self.nodes, self.gpus_per_node) != (None, None, None):
            return "gpudeck doctor's check takes no GPU"
        if len(self.on_nodes) > MAX_DOCTOR_NODES or len(set(self.on_nodes)) != len(self.on_nodes):
            return f"gpudeck doctor checks 1 to {MAX_DOCTOR_NODES} different nodes"
        extra = next(iter([*_set_fields(self, _DOCTOR_FIELDS), *_set_fields(self.run, _DOCTOR_RUN_FIELDS)]), None)
        if extra is not None:
            return f"gpudeck doctor's check runs gpudeck's own code as it is: it takes no {extra}"
        return next(filter(None, (name_problem(node, "node") for node in self.on_nodes)), None) \
            or check_args_problem(self.run.args)

    def _check_order(self) -> None:
        """--after, --after-any and --array: well formed, and an array that keeps at most
        MAX_ARRAY_BYTES of specs in the coordinator's memory (every task is a row of its own)."""
        if len(self.after) + len(self.after_any) > MAX_DEPENDENCIES:
            raise ValueError(f"a job may wait for at most {MAX_DEPENDENCIES} jobs (--after and --after-any together)")
        for flag, refs in (("--after", self.after), ("--after-any", self.after_any)):
            for ref in refs:
                try:
                    parse_ref(ref)
                except ValueError as exc:
                    raise ValueError(f"{flag}: {exc}") from None
        if not self.array:
            return
        try:
            tasks = len(parse_array(self.array).indices)
        except ValueError as exc:
            raise ValueError(f"--array {self.array}: {exc}") from None
        if tasks * self.kept_bytes > MAX_ARRAY_BYTES:
            raise ValueError(f"an array of {tasks} tasks of this job would keep {tasks * self.kept_bytes >> 20} MiB "
                             f"in the coordinator's memory, more than the {MAX_ARRAY_BYTES >> 20} MiB an array may: "
                             "use fewer tasks, or fewer or shorter environment variables, requirements and arguments")

    @property
    def kept_bytes(self) -> int:
        """About what one stored row of this spec holds in the coordinator's memory (its script is
        loaded only to be sent): its texts, and the objects around them."""
        run = self.run
        texts = [self.name, run.workdir, run.subdir, *run.args, *run.command, *self.after, *self.after_any,
                 *run.env, *run.env.values(), *self.on_nodes]
        return ROW_BYTES + sum(map(len, texts)) + sum(len(data) * 4 // 3 for data in run.requirements.values())


def _set_fields(spec: Any, allowed: frozenset[str]) -> list[str]:
    """The fields of a spec, other than `allowed`, that hold something besides their default."""
    return [f.name for f in fields(spec) if f.name not in allowed
            and getattr(spec, f.name) != (f.default if f.default_factory is MISSING else f.default_factory())]


_SPEC_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "run": (RunSpec,), "gpus": (int, type(None)), "nodes": (int, type(None)),
    "gpus_per_node": (int, type(None)), "priority": (int,), "time_limit": (int, float, type(None)),
    "max_restarts": (int,), "project_files": (int,), "project_bytes": (int,), "project_uploaded": (int,),
    "preemptible": (bool,), "after": (list,), "after_any": (list,), "array": (str,), "on_nodes": (list,),
}
_RUN_TYPES: dict[str, tuple[type, ...]] = {
    "script_name": (str,), "script": (bytes,), "workload": (str,), "args": (list,), "workdir": (str,),
    "project": (str,), "subdir": (str,), "command": (list,), "env": (dict,), "python": (str,), "venv": (str,),
    "requirements": (dict,), "image": (str,), "launcher": (str,),
}


# What an environment can be built from, by the name it has on the wire (see gpudeck.agent.environments).
REQUIREMENT_FILES = ("requirements.txt", "pyproject.toml", "uv.lock")
MAX_ENV = 1000
LAUNCHERS = ("", "torchrun")
# What the agent sets for a job (with every GPUDECK_ name); a job's own value would misplace it.
RESERVED_ENV = frozenset({"CUDA_VISIBLE_DEVICES", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK",
                          "GPUS_PER_NODE"})
MAX_SETUP_BYTES = 256 * 1024  # environment variables, and requirement files: kept in memory with the job
ROW_BYTES = 2048  # what a job's row costs in the coordinator's memory besides its spec's texts
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}$")


def _check_types(spec: JobSpec) -> None:
    for fields_of, types in ((spec, _SPEC_TYPES), (spec.run, _RUN_TYPES)):
        for name, allowed in types.items():
            value = getattr(fields_of, name)
            if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
                raise ValueError(f"job field {name!r} has the wrong type ({type(value).__name__})")
    run = spec.run
    if not all(isinstance(a, str) for a in [*run.args, *run.command]):
        raise ValueError("job arguments must be strings")
    if not all(isinstance(ref, str) for ref in [*spec.after, *spec.after_any, *spec.on_nodes]):
        raise ValueError("jobs and nodes must be named by strings")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in run.env.items()):
        raise ValueError("environment variables must be strings")
    if not all(isinstance(k, str) and isinstance(v, bytes) for k, v in run.requirements.items()):
        raise ValueError("requirement files must be bytes")


# Built-in workloads, by the name `gpudeck submit --workload NAME` takes, with one line each for
# help texts. The coordinator checks names here without importing torch; the code is in gpudeck.train.
WORKLOADS: dict[str, str] = {
    "data-parallel": "DDP: the whole model on every rank, gradients all-reduced every step",
    "parameter-server": "rank 0 holds the parameters; workers pull them and push gradients (--mode sync|async)",
    "pipeline": "the model cut into one stage per rank; activations and gradients pass between neighbours (GPipe)",
}
