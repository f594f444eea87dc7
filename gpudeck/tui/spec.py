"""The submit form's logic, without Textual: from the text in its fields to a checked `JobSpec`.

Checks run as the user types, so they touch the disk only to `stat` the script; its bytes are read
when the form is sent. The request is checked against the nodes this client knows of, in the
scheduler's words, so an impossible request says why before anything is sent; `JobSpec.check` adds
the rules every client shares.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from gpudeck.model import MAX_SCRIPT_BYTES, JobSpec, RunSpec, parse_duration, parse_shape
from gpudeck.protocol.views import NodeView
from gpudeck.tui.model import request_problem

SCRIPT = ""  # the workload choice that means "run a script"


@dataclass
class Form:
    """The raw text of every field."""

    name: str = ""
    script: str = ""  # "train.py --epochs 3": the script, then its arguments (a workload's arguments only)
    workload: str = SCRIPT
    gpus: str = "1"  # "G" or "NxG"
    priority: str = "0"
    time_limit: str = ""
    max_restarts: str = "0"


@dataclass
class Checked:
    """The outcome of checking a form: a spec when it can be sent, else a problem per field."""

    spec: JobSpec | None
    problems: dict[str, str] = field(default_factory=dict)
    summary: str = ""  # what will be asked for, in words

    @property
    def first_problem(self) -> str | None:
        return next(iter(self.problems.values()), None)


def _int(text: str, label: str, default: int) -> int:
    text = text.strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{label} must be a whole number, not {text!r}") from None


def split_command(text: str) -> tuple[str, list[str]]:
    """The script and its arguments, split as a shell would."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ValueError(f"cannot split the command: {exc}") from None
    if not words:
        return "", []
    return words[0], words[1:]


def check_form(form: Form, nodes: Iterable[NodeView], workloads: dict[str, str],
               cwd: str | None = None, read: bool = False) -> Checked:
    """Check every field; with `read`, read the script's bytes into the spec (only when sending)."""
    cwd = cwd or os.getcwd()
    problems: dict[str, str] = {}
    script_path, args = "", list[str]()
    script_name, script = "", b""
    if form.workload and form.workload not in workloads:
        problems["workload"] = f"there is no built-in workload {form.workload!r}"
    try:
        script_path, args = split_command(form.script)
    except ValueError as exc:
        problems["script"] = str(exc)
    if form.workload:  # the field then holds the workload's arguments
        args = [script_path, *args] if script_path else []
        script_path = ""
    elif not script_path and "script" not in problems:
        problems["script"] = "give a script to run (train.py --epochs 3)" + (
            " or choose a built-in workload" if workloads else "")
    if script_path:
        path = Path(script_path).expanduser()
        path = path if path.is_absolute() else Path(cwd) / path
        script_name = path.name
        try:
            info = path.stat()
        except OSError as exc:
            problems["script"] = f"cannot read {script_path}: {exc.strerror or exc}"
        else:
            if not path.is_file():
                problems["script"] = f"{script_path} is not a file"
            elif info.st_size == 0:
                problems["script"] = f"the script {script_name} is empty"
            elif info.st_size > MAX_SCRIPT_BYTES:
                problems["script"] = (f"the script is over {MAX_SCRIPT_BYTES // 1024} KiB; "
                                      "put large code in modules on every node")
            elif read:
                try:
                    script = path.read_bytes()
                except OSError as exc:
                    problems["script"] = f"cannot read {script_path}: {exc.strerror or exc}"
            else:
                script = b"#"  # stands in for the bytes while typing; read when sent
    gpus = nodes_count = per_node = None
    try:
        gpus, nodes_count, per_node = parse_shape(form.gpus)
    except ValueError as exc:
        problems["gpus"] = str(exc)
    else:
        problem = request_problem(gpus, nodes_count, per_node, nodes)
        if problem:
            problems["gpus"] = problem
    priority = max_restarts = 0
    time_limit = None
    try:
        priority = _int(form.priority, "priority", 0)
    except ValueError as exc:
        problems["priority"] = str(exc)
    try:
        max_restarts = _int(form.max_restarts, "max restarts", 0)
    except ValueError as exc:
        problems["max_restarts"] = str(exc)
    if form.time_limit.strip():
        try:
            time_limit = parse_duration(form.time_limit)
        except ValueError as exc:
            problems["time_limit"] = str(exc)
    name = form.name.strip() or (Path(script_name).stem if script_name else form.workload)
    summary = _summary(gpus, nodes_count, per_node)
    if problems:
        return Checked(None, problems, summary)
    spec = JobSpec(name=name, gpus=gpus, nodes=nodes_count, gpus_per_node=per_node, priority=priority,
                   time_limit=time_limit, max_restarts=max_restarts,
                   run=RunSpec(script_name=script_name, script=script, workload=form.workload, args=args, workdir=cwd))
    try:
        spec.check()
    except ValueError as exc:
        field_name = ("name" if "name" in str(exc) and "script" not in str(exc) else
                      "priority" if "priority" in str(exc) else
                      "max_restarts" if "restarts" in str(exc) else "script")
        return Checked(None, {field_name: str(exc).replace("--max-restarts", "max restarts")
                              .replace("--priority", "priority")}, summary)
    return Checked(spec, {}, summary)


def _summary(gpus: int | None, nodes: int | None, per_node: int | None) -> str:
    if gpus is not None:
        return f"{gpus} GPU{'s' if gpus != 1 else ''} on as few nodes as possible"
    if nodes is not None and per_node is not None:
        return f"{nodes} node{'s' if nodes != 1 else ''} x {per_node} GPU{'s' if per_node != 1 else ''} each"
    return ""
