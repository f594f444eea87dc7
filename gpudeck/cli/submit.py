"""`gpudeck submit`: the job a command line asks for (`spec_from_args`), and its shipping to the coordinator.

Blocking, without asyncio: a shell loop of submits is bound by this command's start (issue 25).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

from gpudeck import config
from gpudeck.arrays import MAX_ARRAY_TASKS
from gpudeck.capacity import MAX_GPUS, MAX_GPUS_PER_NODE, MAX_NODES
from gpudeck.cli.arguments import duration, gpu_shape, job_array, job_list
from gpudeck.cli.exits import Failure, UsageError
from gpudeck.cli.parsers import client_flags
from gpudeck.cli import registry
from gpudeck.model import (
    MAX_PRIORITY, MAX_RESTARTS, MAX_TIME_LIMIT, WORKLOADS, JobSpec, RunSpec, parse_duration,
)
from gpudeck.project import DEFAULT_CAP


def _submit_parser(sub: Any) -> None:
    submit = sub.add_parser(
        "submit", help=registry.COMMANDS["submit"].summary,
        description=textwrap.fill("Queue a job: a Python script (one rank per GPU, as torchrun starts them; everything "
        "after SCRIPT is passed to it), a built-in --workload, or any command after `--`, run once per node with "
        "MASTER_ADDR, MASTER_PORT, NNODES, NODE_RANK and GPUS_PER_NODE set (for your own torchrun, accelerate "
        "or shell script). Scripts and commands take the directory submit runs in along (the project: every "
        "file but what .gitignore and .gpudeckignore leave out); each node runs the job in its own copy.", 100),
        epilog="examples:\n"
        "  gpudeck submit --gpus 2 train.py --epochs 3\n"
        "  gpudeck submit --gpus 4 --requirements requirements.txt train.py\n"
        "  gpudeck submit --nodes 2 --gpus-per-node 8 -- ./launch.sh\n"
        "      (launch.sh runs: torchrun --nnodes $NNODES --node-rank $NODE_RANK --nproc-per-node $GPUS_PER_NODE\n"
        "       --master-addr $MASTER_ADDR --master-port $MASTER_PORT train.py)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _submit_arguments(submit)


def _submit_arguments(submit: argparse.ArgumentParser) -> None:
    """Submit's own options and arguments; `_own_options` reads them too."""
    submit.add_argument("--name", help="a name for the job (default: the script's, command's or workload's name)")
    # The ranges are checked by JobSpec.check, as for the dashboard's form and the coordinator.
    submit.add_argument("--gpus", type=gpu_shape, metavar="G|NxG",
                        help=f"G GPUs on as few nodes as possible, 1 to {MAX_GPUS} (default: 1); or NxG, N nodes "
                        "with G GPUs each, as --nodes N --gpus-per-node G")
    submit.add_argument("--nodes", type=int, metavar="N",
                        help=f"exactly N nodes, 1 to {MAX_NODES} (with --gpus-per-node)")
    submit.add_argument("--gpus-per-node", type=int, metavar="G",
                        help=f"G GPUs on each of the --nodes, 1 to {MAX_GPUS_PER_NODE}")
    submit.add_argument("--priority", type=int, default=0,
                        help=f"higher runs first, -{MAX_PRIORITY} to {MAX_PRIORITY} (default: 0)")
    submit.add_argument("--time-limit", metavar="DUR",
                        help=f"stop the job after this long (90s, 10m, 2h; at most {MAX_TIME_LIMIT // 86400}d)")
    submit.add_argument("--hang-timeout", type=duration, metavar="DUR",
                        help="cancel the job once its ranks have completed no collective (all-reduce, send, ...) "
                        "for this long; without it a hung job is only flagged in `gpudeck jobs`")
    submit.add_argument("--max-restarts", type=int, default=0, metavar="K",
                        help=f"requeue the job up to K times when one of its nodes is lost, 0 to {MAX_RESTARTS} "
                        "(default: 0)")
    where = submit.add_mutually_exclusive_group()
    where.add_argument("--project", metavar="DIR", type=Path,
                       help="ship this directory with the job (default: the directory submit runs in)")
    where.add_argument("--no-project", action="store_true",
                       help="ship only the script; the job runs in this directory where a node has it (a shared "
                       "file system), else in an empty one")
    setup = submit.add_mutually_exclusive_group()
    setup.add_argument("--requirements", metavar="FILE", type=Path,
                       help="a requirements.txt, pyproject.toml or uv.lock: each node builds the environment once "
                       "with uv and keeps it for later jobs (the agent's torch is used unless the file names one)")
    setup.add_argument("--python", metavar="PATH", help="an interpreter that exists on every node")
    setup.add_argument("--venv", metavar="PATH", help="a virtual environment that exists on every node")
    setup.add_argument("--image", metavar="IMAGE", help="run the job in this container image, with podman or docker "
                       "on the nodes (its own python runs a script; traffic is not counted inside containers)")
    submit.add_argument("--preemptible", action="store_true",
                        help="let the scheduler stop this job for a waiting job of higher --priority that cannot "
                        "start otherwise: SIGTERM, the cluster's grace ($GPUDECK_PREEMPT_GRACE seconds), then SIGKILL; "
                        "it goes back to the queue without spending a restart (built-in workloads resume from a "
                        "checkpoint saved at the SIGTERM)")
    submit.add_argument("--torchrun", action="store_true",
                        help="start each node's ranks with torchrun, for a script that needs its elastic features "
                        "(by default the agent starts the ranks itself, with the same variables, and sooner)")
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="set an environment variable for the job (repeatable)")
    submit.add_argument("--env-file", metavar="FILE", type=Path,
                        help="environment variables for the job, one KEY=VALUE a line (# starts a comment)")
    submit.add_argument("--workload", nargs=argparse.REMAINDER, metavar="W [ARGS]",
                        help="a built-in workload instead of a script, then its options (last on the line): "
                        + "; ".join(f"{name}: {text}" for name, text in sorted(WORKLOADS.items())))
    submit.add_argument("--after", type=job_list, action="extend", default=[], metavar="JOB[,JOB]",
                        help="start only once these jobs succeeded (an array's id: all its tasks); if one fails or "
                        "is cancelled, this job fails")
    submit.add_argument("--after-any", type=job_list, action="extend", default=[], metavar="JOB[,JOB]",
                        help="start only once these jobs ended, however they ended")
    submit.add_argument("--array", type=job_array, metavar="INDICES[%N]",
                        help=f"one job per index (0-31, 0,3,5-7; at most {MAX_ARRAY_TASKS}), each with "
                        "$GPUDECK_ARRAY_INDEX set; %%N: at most N of them run at once. Its tasks are named "
                        "JOB.INDEX, and JOB alone is the whole array")
    submit.add_argument("--json", action="store_true", help="print the job as JSON")
    submit.add_argument("script", nargs="?", metavar="SCRIPT", help="a Python training script, as for torchrun")
    submit.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments for the script")
    submit.set_defaults(command_line=[])  # what follows `--` (see parse_command_line)
    client_flags(submit)


def _read_script(path: str) -> tuple[str, bytes]:
    script = Path(path)
    try:
        data = script.read_bytes()
    except OSError as exc:
        raise Failure(f"cannot read the script {path}: {exc.strerror}") from None
    return script.name, data


def _what_to_run(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The workload name ("" for a script or command) and the arguments for the script or workload."""
    known = ", ".join(sorted(WORKLOADS))
    if args.command_line:
        if args.script or args.workload is not None:
            raise UsageError("give a script, --workload or a command after --, only one of them")
        return "", []
    if args.workload is None:
        if not args.script:
            raise UsageError("nothing to run: give a script (gpudeck submit train.py), --workload NAME, or a "
                             "command after -- (gpudeck submit -- ./run.sh)")
        return "", list(args.args)
    if not args.workload:
        raise UsageError(f"--workload needs a name: {known}")
    if args.script:
        raise UsageError("give a script or --workload, not both (the workload's options go after its name)")
    if args.workload[0] not in WORKLOADS:
        raise UsageError(f"there is no built-in workload {args.workload[0]!r} (built-in workloads: {known})")
    _check_workload_options(args.workload[0], args.workload[1:])
    return args.workload[0], args.workload[1:]


def _check_workload_options(name: str, argv: list[str]) -> None:
    """Refuse options the workload does not take now, with the parser its ranks would use, instead of
    letting every rank fail once the job has waited for and been given its GPUs."""
    from gpudeck.train.workloads import options

    problem = options.problem(name, argv)
    if problem is None:
        return
    names = options.option_names(name)
    ours = [arg for arg in _submit_options(argv) if arg not in names]
    one = len(ours) == 1
    before = (f" ({' and '.join(ours)} {'is an option' if one else 'are options'} of submit: put "
              f"{'it' if one else 'them'} before --workload)") if ours else ""
    raise UsageError(f"--workload {name}: {problem}{before}; its options are {', '.join(names)} "
                     f"(gpudeck submit --workload {name} --help says what each does)")


def _submit_options(argv: list[str]) -> list[str]:
    """Which of `argv` are options of `gpudeck submit` itself (a script's or workload's arguments that
    were likely meant for submit), as written before any '='."""
    own = _own_options()
    return [arg.partition("=")[0] for arg in argv if arg.partition("=")[0] in own]


@functools.cache
def _own_options() -> frozenset[str]:
    """The option strings of submit, from its arguments alone (not the whole command line's parser)."""
    submit = argparse.ArgumentParser(add_help=False)
    _submit_arguments(submit)
    return frozenset(submit._option_string_actions)


def project_root(args: argparse.Namespace) -> Path | None:
    """The directory to ship: --project; else, for a script or a command, the current directory, or
    the script's own where it lies outside the current one (a built-in workload needs none)."""
    if args.no_project:
        return None
    if args.project is not None:
        if not args.project.is_dir():
            raise UsageError(f"--project {args.project}: no such directory")
        return args.project.resolve()
    here = Path.cwd().resolve()
    if args.script and not Path(args.script).resolve().is_relative_to(here):
        return Path(args.script).resolve().parent
    return here if args.script or args.command_line else None


def _inside(path: Path, root: Path, what: str) -> str:
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        raise UsageError(f"{what} {path} is outside the project {root}: run submit in the project, give "
                         "--project DIR, or --no-project") from None


def _environment(args: argparse.Namespace) -> dict[str, str]:
    env: dict[str, str] = {}
    if args.env_file is not None:
        try:
            lines = args.env_file.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise Failure(f"cannot read --env-file {args.env_file}: {getattr(exc, 'strerror', None) or exc}") from None
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                key, value = _assignment(line.removeprefix("export "), f"{args.env_file} line {number}")
                env[key] = value
    for item in args.env:
        key, value = _assignment(item, "--env")
        env[key] = value
    return env


def _assignment(text: str, where: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"{where}: {text!r} is not KEY=VALUE")
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    return key.strip(), value


def _requirements(path: Path | None) -> dict[str, bytes]:
    """The files an environment is built from, by their name on the wire (see model.REQUIREMENT_FILES)."""
    if path is None:
        return {}
    kind = "uv.lock" if path.name == "uv.lock" else "pyproject.toml" if path.suffix == ".toml" else "requirements.txt"
    wanted = {kind: path}
    if kind == "uv.lock":
        wanted["pyproject.toml"] = path.with_name("pyproject.toml")
    files = {}
    for name, source in wanted.items():
        try:
            files[name] = source.read_bytes()
        except OSError as exc:
            beside = " (a uv.lock needs the pyproject.toml beside it)" if source != path else ""
            raise Failure(f"cannot read {source}{beside}: {exc.strerror}") from None
    return files


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    """The job as asked, without its project's digest (known once it is shipped: `cmd_submit`)."""
    workload, run_args = _what_to_run(args)
    if args.gpus is not None and (args.nodes is not None or args.gpus_per_node is not None):
        raise UsageError("use either --gpus G (or NxG), or --nodes N with --gpus-per-node G, not both")
    if (args.nodes is None) != (args.gpus_per_node is None):
        raise UsageError("--nodes and --gpus-per-node go together")
    gpus, nodes, per_node = args.gpus or (None, args.nodes, args.gpus_per_node)
    root = project_root(args)
    script_name, script, subdir = "", b"", ""
    if args.script and root is not None:
        try:
            with open(args.script, "rb"):
                pass
        except OSError as exc:
            raise Failure(f"cannot read the script {args.script}: {exc.strerror}") from None
        script_name = _inside(Path(args.script), root, "the script")
    elif args.script:
        script_name, script = _read_script(args.script)
    if root is not None and Path.cwd().resolve().is_relative_to(root):
        inside = Path.cwd().resolve().relative_to(root).as_posix()
        subdir = "" if inside == "." else inside
    try:
        time_limit = parse_duration(args.time_limit) if args.time_limit else None
    except ValueError as exc:
        raise UsageError(f"--time-limit: {exc}") from None
    named = Path(args.script).stem if args.script else workload or Path(args.command_line[0]).name
    run = RunSpec(
        script_name=script_name, script=script, workload=workload, args=run_args,
        # A shipped project's digest is known once it is shipped (cmd_submit); this one only marks it.
        workdir="" if root else os.getcwd(), project="0" * 64 if root else "", subdir=subdir,
        command=list(args.command_line), env=_environment(args), python=args.python or "",
        venv=args.venv or "", requirements=_requirements(args.requirements), image=args.image or "",
        launcher="torchrun" if args.torchrun else "")
    spec = JobSpec(
        name=args.name or named, run=run,
        gpus=None if nodes is not None else (gpus if gpus is not None else 1),
        nodes=nodes, gpus_per_node=per_node, priority=args.priority, time_limit=time_limit,
        max_restarts=args.max_restarts, preemptible=args.preemptible, after=args.after,
        after_any=args.after_any, array=args.array or "", hang_timeout=args.hang_timeout)
    try:
        spec.check()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return spec


def cmd_submit(args: argparse.Namespace) -> int:
    from gpudeck.client import connect_blocking
    from gpudeck.protocol.messages import Submit
    from gpudeck.upload import ship

    spec = spec_from_args(args)
    misplaced = _submit_options(args.args) if args.script else []
    if misplaced:
        goes = "goes" if len(misplaced) == 1 else "go"
        print(f"gpudeck: warning: {' and '.join(misplaced)} after {args.script} {goes} to the script, not to submit; "
              "to give submit an option, put it before the script", file=sys.stderr)
    root = project_root(args)
    if args.project is None and root is not None and not Path.cwd().resolve().is_relative_to(root) \
            and sys.stderr.isatty():
        print(f"gpudeck: the script is outside {Path.cwd()}: shipping its folder {root} as the project",
              file=sys.stderr)

    with connect_blocking(args.coordinator, config.find_token(args.token, args.token_file)) as session:
        if root is not None:
            cap = session.welcome.project_cap if session.welcome else DEFAULT_CAP
            digest = ship(session, root, cap, [spec.run.script_name] if spec.run.script_name else [])
            spec = dataclasses.replace(spec, run=dataclasses.replace(spec.run, project=digest))
        job = session.request(Submit, spec=spec.to_wire())
    print(json.dumps(job, indent=2) if args.json else job["id"])
    return 0


COMMANDS = {"submit": registry.Command(_submit_parser, cmd_submit)}
