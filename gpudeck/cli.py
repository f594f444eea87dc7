"""The `gpudeck` command. Exit codes: 0 success, 1 the request was refused (reason on stderr), 2 usage.

Each command imports what it uses when it runs (asyncio, TLS, the protocol, zeroconf only where mDNS
is asked), so `gpudeck --version` starts in the time of a small Python program and `submit` pays
only for the connection it makes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import logging
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from gpudeck import __version__, config
from gpudeck.capacity import MAX_GPUS, MAX_GPUS_PER_NODE, MAX_NODES
from gpudeck.arrays import MAX_ARRAY_TASKS, parse_array, parse_ref, ref_text
from gpudeck.config import split_address
from gpudeck.model import (
    DOCTOR, MAX_PRIORITY, MAX_RESTARTS, MAX_TIME_LIMIT, WORKLOADS, JobSpec, JobState, duration_seconds, parse_duration,
    parse_shape, parse_size,
)
from gpudeck.project import DEFAULT_CAP, OUTPUTS_HERE
from gpudeck.text import counted, visible, visible_data

if TYPE_CHECKING:
    from gpudeck.protocol import auth
    from gpudeck.protocol.session import ClientSession


class Failure(Exception):
    """A refusal to report on stderr with exit code 1."""


class UsageError(Failure):
    """Arguments that cannot make a request: reported like argparse's own errors, exit code 2."""


JOBS_PAGE = 1000  # jobs per list request; the coordinator allows at most this many
RECENT_FINISHED = 20  # finished jobs `gpudeck jobs` shows by default, the most recent
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


def _scheduling_flags(parser: argparse.ArgumentParser) -> None:
    """How the coordinator orders and plans the queue (`gpudeck.coordinator.priority`, the scheduler)."""
    parser.add_argument("--fair-share-half-life", type=duration, default=7 * 86400.0, metavar="DUR",
                        help="how fast past use stops counting against a person's fair share: a GPU-hour used this "
                        "long ago counts half (default: 7d)")
    parser.add_argument("--priority-age-cap", type=duration, default=7 * 86400.0, metavar="DUR",
                        help="a waiting job's age factor grows until it has waited this long (default: 7d)")
    parser.add_argument("--priority-weights", type=priority_weights, default={}, metavar="NAME=W,...",
                        help="what each factor of a pending job's priority counts for "
                        "(default: fair-share=10000,age=1000,priority=1000)")
    parser.add_argument("--default-time-limit", type=duration, default=86400.0, metavar="DUR",
                        help="how long a job without --time-limit is expected to run when planning reservations "
                        "and estimated starts; it is not stopped then (default: 1d)")
    parser.add_argument("--preempt-grace", type=duration, default=30.0, metavar="DUR",
                        help="how long a preempted job's ranks have between SIGTERM and SIGKILL to save and stop; "
                        "jobs see it as $GPUDECK_PREEMPT_GRACE (default: 30s)")


def scheduling_options(args: argparse.Namespace) -> dict[str, Any]:
    """The Coordinator's scheduling arguments from `_scheduling_flags`."""
    from gpudeck.coordinator.priority import Policy, Weights

    policy = Policy(Weights(**args.priority_weights), args.fair_share_half_life, args.priority_age_cap)
    if args.preempt_grace > 3600:
        raise UsageError("--preempt-grace is at most 1h: a stopped job's GPUs stay idle for that long")
    return {"priority": policy, "default_time_limit": args.default_time_limit, "preempt_grace": args.preempt_grace}


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


# --- argument parsing ----------------------------------------------------------------------------


def _client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coordinator", type=coordinator_address, metavar="HOST:PORT",
                        help="the coordinator (default: $GPUDECK_COORDINATOR, "
                        "the coordinator of this machine's data dir, or one found over mDNS)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--token", help="your token: the one `gpudeck user add` made for you, or the cluster's "
                       "join token (default: $GPUDECK_TOKEN)")
    group.add_argument("--token-file", metavar="F", help="a file holding your token")


def _mdns_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-mdns", action="store_true", help="do not use multicast DNS at all")
    parser.add_argument("--mdns-interface", action="append", metavar="IP",
                        help="multicast only on the interface with this address (repeatable; default: all)")


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


def _command(sub: Any, name: str, summary: str, description: str, *examples: str) -> argparse.ArgumentParser:
    """A subcommand whose --help starts with a paragraph on what it does and ends with examples, so a
    newcomer can use it from its help alone."""
    return sub.add_parser(name, help=summary, description=textwrap.fill(description, 100),
                          epilog="examples:\n" + "\n".join(f"  {example}" for example in examples),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


TOP_OPTIONS_WITH_VALUES = ("--coordinator", "--token", "--token-file")  # gpudeck's own, before a command
JOB_HELP = "the job's id, as submit printed it and `gpudeck jobs` lists it (ARRAY.INDEX for a task of an array)"


@functools.cache
def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line, built once a process (submit reads it again to warn about its own options
    given after a script; parsing does not change it). With `command`, only that subcommand's parser
    is built, which is all a run of it needs: building all of them was a tenth of a submit's start."""
    parser = argparse.ArgumentParser(
        prog="gpudeck", description="Run your own GPU cluster from a terminal.", allow_abbrev=False,
        epilog="Start here: `gpudeck up --simulate-gpus 4` runs a whole cluster on this machine.")
    parser.add_argument("--version", action="version", version=f"gpudeck {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    # With no command, gpudeck opens the dashboard; these flags are for it (as on `gpudeck tui`).
    parser.add_argument("--coordinator", dest="dashboard_coordinator", type=coordinator_address, metavar="HOST:PORT",
                        help="with no command: the coordinator the dashboard shows")
    top_token = parser.add_mutually_exclusive_group()
    top_token.add_argument("--token", dest="dashboard_token", metavar="T",
                           help="with no command: the cluster's join token")
    top_token.add_argument("--token-file", dest="dashboard_token_file", metavar="F",
                           help="with no command: a file holding the join token")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, add in PARSERS.items():
        if command in (None, name):
            add(sub)
    return parser


def _tui_parser(sub: Any) -> None:
    tui = _command(sub, "tui", "the dashboard (what `gpudeck` with no command opens)",
                   "A keyboard-driven dashboard of nodes, GPUs, jobs and sync traffic, in this terminal. It shows "
                   "the coordinator given by --coordinator, else $GPUDECK_COORDINATOR, else the one this machine's "
                   "data dir names, else one found over mDNS. Press ? in it for every key.",
                   "gpudeck tui", "gpudeck tui --coordinator lab-head:7070 --token-file ~/gpudeck-token")
    _client_flags(tui)
    tui.add_argument("--mdns-interface", action="append", metavar="IP",
                     help="look for the coordinator over mDNS only on the interface with this address")


def _up_parser(sub: Any) -> None:
    up = _command(sub, "up", "run a coordinator and an agent on this machine (loopback only), with the dashboard",
                  "Everything on this one machine, for trying gpudeck out or for a single workstation: a "
                  "coordinator and an agent for this machine's GPUs, listening on loopback only (--lan to let "
                  "other machines join), with their state in the data dir ($GPUDECK_HOME), and the dashboard. "
                  "Without GPUs, --simulate-gpus N gives the agent simulated ones.",
                  "gpudeck up --simulate-gpus 4", "gpudeck up --lan --no-tui")
    up.add_argument("--simulate-gpus", type=simulated_gpus, metavar="N",
                    help=f"give the local agent N simulated GPUs (at most {MAX_GPUS_PER_NODE})")
    up.add_argument("--port", type=port_number, default=config.DEFAULT_PORT,
                    help="coordinator port (default: %(default)s)")
    up.add_argument("--lan", action="store_true", help="listen and advertise on the LAN instead of loopback only")
    up.add_argument("--no-tui", action="store_true", help="do not open the dashboard; run until Ctrl-C (also "
                    "when not on a terminal)")
    _scheduling_flags(up)


def _coordinator_parser(sub: Any) -> None:
    coord = _command(sub, "coordinator", "run the coordinator (headless, for systemd)",
                     "Run the coordinator of a cluster, without a dashboard: it keeps the job queue and the nodes "
                     "in one SQLite file under --state-dir, places jobs on the agents that join with its token, "
                     "and relays their logs, telemetry and traffic to the CLI and the dashboard. `gpudeck token` "
                     "prints the token that agents and clients need.",
                     "gpudeck coordinator", "gpudeck coordinator --port 7070 --state-dir /var/lib/gpudeck --no-mdns")
    coord.add_argument("--host", default="0.0.0.0", help="address to listen on (default: %(default)s)")
    coord.add_argument("--port", type=port_number, default=config.DEFAULT_PORT, help="port (default: %(default)s)")
    coord.add_argument("--state-dir", type=Path, help="where the database, certificate and token live "
                       "(default: the data dir's coordinator/)")
    coord.add_argument("--job-ports", type=port_range, default=(29500, 29999), metavar="FIRST-LAST",
                       help="ports for the rendezvous of jobs' ranks, on the first node of each job; open them "
                       "between the nodes (default: 29500-29999)")
    coord.add_argument("--project-cap", type=size, default=DEFAULT_CAP, metavar="SIZE",
                       help="the most a job's project may ship (default: 512M)")
    coord.add_argument("--project-store", type=size, default=config.PROJECT_STORE_LIMIT, metavar="SIZE",
                       help="room for shipped projects on the coordinator; the least recently used that no "
                       "unfinished job needs go first (default: 8G)")
    coord.add_argument("--idle-after", type=duration, default=config.IDLE_AFTER, metavar="DUR",
                       help="mark a running job idle when every GPU it holds has read 0%% use for this long "
                       "(`gpudeck jobs` and the dashboard say so; default: 30m)")
    coord.add_argument("--idle-cancel", action="store_true",
                       help="cancel a job once it has been idle for --idle-after, so its GPUs go to others")
    coord.add_argument("--hang-after", type=duration, default=config.HANG_AFTER, metavar="DUR",
                       help="flag a running job hung once its ranks have completed no collective for this long, "
                       "naming the rank that stopped first (default: 10m; a job is cancelled for it only "
                       "when submitted with --hang-timeout)")
    coord.add_argument("--metrics", type=metrics_address, metavar="[HOST:]PORT",
                       help="serve Prometheus metrics (GPU series under dcgm-exporter's names, nodes, jobs, queue "
                       "wait, traffic) at http://HOST:PORT/metrics, without a token: give only a port to keep it "
                       "on loopback (default: off)")
    _scheduling_flags(coord)
    _mdns_flags(coord)


def _agent_parser(sub: Any) -> None:
    agent = _command(sub, "agent", "run a node agent (headless, for systemd)",
                     "Run the agent of one node, without a dashboard: it joins the coordinator with the cluster's "
                     "token, reports this machine's GPUs every second and starts the ranks of the jobs placed on "
                     "it. It connects out to the coordinator (found by --coordinator, or over mDNS) and never "
                     "listens for commands; when the coordinator goes away, jobs keep running and the agent "
                     "reconnects.",
                     "gpudeck agent --coordinator lab-head:7070 --token-file /etc/gpudeck/token",
                     "gpudeck agent --simulate-gpus 2 --name test-node --no-mdns --coordinator 127.0.0.1:7070")
    agent.add_argument("--coordinator", type=coordinator_address, metavar="HOST:PORT",
                       help="the coordinator (default: $GPUDECK_COORDINATOR or mDNS)")
    group = agent.add_mutually_exclusive_group()
    group.add_argument("--token", help="the cluster's join token (default: $GPUDECK_TOKEN)")
    group.add_argument("--token-file", metavar="F", help="a file holding the join token")
    agent.add_argument("--name", help="this node's name in the cluster (default: the host name)")
    agent.add_argument("--simulate-gpus", type=simulated_gpus, metavar="N",
                       help=f"N simulated GPUs instead of NVML, shown as SIM (at most {MAX_GPUS_PER_NODE}); lines in "
                       "the file simulated-gpus of the state dir inject faults ('0 xid 79', '1 ecc 2') and outside "
                       "processes ('0 process PID') to try cordons and `nodes --foreign`")
    agent.add_argument("--state-dir", type=Path, help="job directories and logs (default: the data dir's agent/)")
    agent.add_argument("--keep-outputs", type=duration, default=config.KEEP_OUTPUTS_FOR, metavar="DUR",
                       help="how long jobs' outputs are kept on this node (default: 7d)")
    agent.add_argument("--outputs-space", type=size, default=config.OUTPUTS_SPACE, metavar="SIZE",
                       help="the most space jobs' kept outputs take on this node; the oldest go first (default: 10G)")
    agent.add_argument("--cache-space", type=size, default=config.NODE_CACHE_LIMIT, metavar="SIZE",
                       help="the most space this node's cache of project files takes (default: 16G)")
    agent.add_argument("--environments", type=bounded(1, 1000), default=config.ENVIRONMENTS_KEPT, metavar="N",
                       help="how many environments built from requirements files this node keeps (default: 8)")
    agent.add_argument("--warm", type=bounded(0, 64), default=config.WARM_INTERPRETERS, metavar="N",
                       help="interpreters with torch already imported that this node keeps, to fork ranks from so "
                       "that a script starts at once (0: none; each holds a few hundred MB; default: 1)")
    agent.add_argument("--run-as-owner", action="store_true",
                       help="run each job's processes as this machine's account named like the job's owner (its "
                       "uid, gid, groups and home), or as the agent's user where there is none; the agent must run "
                       "as root")
    _mdns_flags(agent)


def _token_parser(sub: Any) -> None:
    token = _command(sub, "token", "print the join token of the coordinator on this machine",
                     "Print the join token of the coordinator whose state is on this machine. Agents and clients on "
                     "other machines need it (--token, --token-file or $GPUDECK_TOKEN): it holds the fingerprint "
                     "of the coordinator's certificate and the cluster's secret, so keep it as you would a password.",
                     "gpudeck token", "gpudeck token --state-dir /var/lib/gpudeck > token && chmod 600 token")
    token.add_argument("--state-dir", type=Path,
                       help="the coordinator's state dir (default: the data dir's coordinator/)")


def _web_parser(sub: Any) -> None:
    web = _command(sub, "web", "the dashboard in a browser, for a laptop or a wall screen",
                   "Serve the dashboard as a web page (with textual-serve), for a lab member on a laptop without a "
                   "terminal set up, or for a wall screen. Each browser tab gets its own dashboard, which first asks "
                   "for the cluster's join token: this server holds none and shows nothing of the cluster before a "
                   "token is typed. It listens on loopback by default; from a laptop, open an SSH tunnel to this "
                   "machine and browse to the address it prints.",
                   "gpudeck web",
                   "ssh -L 7080:127.0.0.1:7080 you@lab-head    # on the laptop; then open http://127.0.0.1:7080",
                   "gpudeck web --coordinator lab-head:7070 --port 8080 --no-mdns")
    web.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, reached "
                     "through an SSH tunnel; with any other, everyone who can reach it can open the page and "
                     "try tokens)")
    web.add_argument("--port", type=bounded(0, 65535), default=config.WEB_PORT,
                     help="port (default: %(default)s; 0: any free one, printed)")
    web.add_argument("--coordinator", type=coordinator_address, metavar="HOST:PORT",
                     help="the coordinator the sessions show (default: $GPUDECK_COORDINATOR, the coordinator of this "
                     "machine's data dir, or one found over mDNS)")
    web.add_argument("--max-sessions", type=bounded(1, 64), default=4, metavar="N",
                     help="browser sessions open at once, each a dashboard process of its own (default: %(default)s)")
    _mdns_flags(web)


def _submit_parser(sub: Any) -> None:
    submit = sub.add_parser(
        "submit", help="queue a job; prints its id",
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
    _client_flags(submit)


def _jobs_parser(sub: Any) -> None:
    jobs = _command(sub, "jobs", "list jobs: those not finished and the latest finished ones",
                    f"List jobs, oldest first: by default every job that is pending, starting or running and the "
                    f"{RECENT_FINISHED} that finished last, with a line saying how many older ones are left out. "
                    "--all lists the whole history; --state, --since and --limit choose which jobs, with --json "
                    "too (--json alone prints every job).",
                    "gpudeck jobs", "gpudeck jobs --state failed,cancelled --since 2d",
                    "gpudeck jobs --limit 5 --json")
    shown = jobs.add_mutually_exclusive_group()
    shown.add_argument("--all", action="store_true", help="every job that matches, however old")
    shown.add_argument("--limit", type=bounded(1, 1_000_000), metavar="N",
                       help="only the N most recent jobs that match")
    jobs.add_argument("--state", type=job_states, action="extend", metavar="STATE[,STATE]",
                      help=f"only jobs in these states: {', '.join(UNFINISHED_STATES + FINISHED_STATES)}")
    jobs.add_argument("--since", type=since_time, metavar="WHEN",
                      help="only jobs not finished before WHEN: how long ago (90m, 2h, 3d) or a date "
                      "(2026-12-01, 2026-12-01T09:30)")
    whose = jobs.add_mutually_exclusive_group()
    whose.add_argument("--mine", action="store_true", help="only your jobs (those submitted with your token)")
    whose.add_argument("--user", metavar="NAME", help="only this user's jobs")
    jobs.add_argument("--json", action="store_true", help="print JSON with stable field names")
    _client_flags(jobs)


def _nodes_parser(sub: Any) -> None:
    nodes = _command(sub, "nodes", "list nodes and their GPUs",
                     "List the nodes that have joined, each with its state, address and jobs, and under it every "
                     "GPU's use, memory, temperature, power and the processes on it that are not gpudeck's; then "
                     "the machines advertising an agent on the network that have not joined, and why.",
                     "gpudeck nodes", "gpudeck nodes --json")
    nodes.add_argument("--foreign", action="store_true",
                       help="list only the processes on GPUs that belong to no gpudeck job (a forgotten notebook), "
                       "with how long each has held its GPU")
    nodes.add_argument("--json", action="store_true", help="print JSON with stable field names")
    _client_flags(nodes)


def _show_parser(sub: Any) -> None:
    show = _command(sub, "show", "one job in detail, with its traffic",
                    "One job in detail: what it runs, what it asked for, the nodes and GPUs it was given, its "
                    "attempt, runtime and exit code, the bytes its ranks moved by kind of operation, and the "
                    "outputs its nodes keep. With --json: also the traffic by rank.",
                    "gpudeck show 12", "gpudeck show 12 --json")
    show.add_argument("job", type=job_id, metavar="JOB", help=JOB_HELP)
    show.add_argument("--json", action="store_true", help="print JSON with stable field names")
    _client_flags(show)


def _cancel_parser(sub: Any) -> None:
    cancel = _command(sub, "cancel", "cancel a job, stopping its ranks",
                      "Cancel a job: a pending job leaves the queue, and a starting or running one has its ranks "
                      "stopped on every node. Its logs and the outputs its nodes keep stay.",
                      "gpudeck cancel 12")
    cancel.add_argument("job", type=job_id, metavar="JOB", help=JOB_HELP)
    _client_flags(cancel)


def _drain_parser(sub: Any) -> None:
    drain = _command(sub, "drain", "stop placing new jobs on a node (running jobs go on)",
                     "Keep new jobs off a node, before maintenance or to keep its GPUs for something else: the jobs "
                     "running there go on to their end, and the scheduler places nothing new on it until "
                     "`gpudeck drain NODE --off`.",
                     "gpudeck drain node-b", "gpudeck drain node-b --off")
    drain.add_argument("node", metavar="NODE", help="the node's name, as `gpudeck nodes` lists it")
    drain.add_argument("--off", action="store_true", help="let the node take new jobs again")
    _client_flags(drain)


def _outputs_parser(sub: Any) -> None:
    outputs = _command(sub, "outputs", "download what a job wrote to $GPUDECK_OUTPUT_DIR",
                       "Download the files a job wrote under $GPUDECK_OUTPUT_DIR, which its nodes keep after it "
                       "ends (for a time and a space each agent sets). With several nodes, each node's files go in "
                       "a folder named after it.",
                       "gpudeck outputs 12", "gpudeck outputs 12 --to results/ --node node-a")
    outputs.add_argument("job", type=job_id, metavar="JOB", help=JOB_HELP)
    outputs.add_argument("--to", type=Path, metavar="DIR",
                         help="where to put them (default: gpudeck-outputs/JOB here); "
                         "files there are never overwritten")
    outputs.add_argument("--node", metavar="NODE", help="only what this node keeps (a name `gpudeck nodes` lists)")
    _client_flags(outputs)


def _logs_parser(sub: Any) -> None:
    logs = _command(sub, "logs", "a job's output, every rank's lines prefixed with its rank",
                    "A job's output, every line prefixed with the rank that printed it ([rank 0]), or with the node "
                    "([node 0]) for what a node itself printed while it set the job up or ran torchrun. Without "
                    "--follow it prints what there is now; with it, it goes on until the job ends, then says how it "
                    "ended. A job that was restarted has one log per attempt: --attempt picks an earlier one.",
                    "gpudeck logs 12", "gpudeck logs 12 --follow", "gpudeck logs 12 --rank 1 --attempt 1")
    logs.add_argument("job", type=job_id, metavar="JOB", help=JOB_HELP)
    logs.add_argument("--rank", type=small_int, metavar="R", help="only rank R (-1 for node 0's own output, -2 for "
                      "node 1's and so on)")
    logs.add_argument("--attempt", type=small_int, metavar="A", help="an earlier attempt (default: the latest)")
    logs.add_argument("--raw", action="store_true", help="pass the job's output as it is, with every escape "
                      "sequence (by default only colours are kept: titles, clipboard writes and cursor moves are "
                      "dropped)")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    logs.add_argument("--launcher", action="store_true", help="include each node's own output: torchrun's and the "
                      "environment build's (always shown for failed jobs and for commands)")
    _client_flags(logs)


def _usage_parser(sub: Any) -> None:
    usage = _command(sub, "usage", "GPU-hours per user and per job, with waits and energy",
                     "How much GPU time each person's jobs held, as Slurm's sreport does: GPU-hours (each attempt's "
                     "GPUs from its start until it gave them back, counted only inside the window), the jobs that "
                     "held GPUs, their mean wait from submit to first start, and the energy their GPUs used where "
                     "the GPUs report it (marked simulated for simulated GPUs). Then the jobs that held the most.",
                     "gpudeck usage", "gpudeck usage --since 7d", "gpudeck usage --since 2026-12-01 --user ada --json")
    usage.add_argument("--since", type=since_time, metavar="WHEN",
                       help="count from WHEN: how long ago (24h, 7d) or a date (2026-12-01, 2026-12-01T09:30); "
                       "default: ever")
    usage.add_argument("--user", metavar="NAME", help="only this user's jobs (each user's share stays of the whole "
                       "cluster's GPU time)")
    usage.add_argument("--json", action="store_true", help="print JSON with stable field names (gpu_seconds, "
                       "gpu_hours, jobs, mean_wait_s, energy_j, energy_simulated, users, by_job)")
    _client_flags(usage)


def _user_parsers(sub: Any) -> None:
    user = _command(sub, "user", "the cluster's people: add, list and remove users (admins)",
                    "Give each person a token of their own, so their jobs carry their name, only they (and admins) "
                    "can cancel them or read their logs, and limits and fair shares apply per person. The join "
                    "token stays what nodes join with; its holder is the user 'admin'. A new user's token is "
                    "printed once, as the last line, and only its hash is kept.",
                    "gpudeck user add ada --max-gpus 8", "gpudeck user add bob --admin",
                    "gpudeck user list", "gpudeck user remove ada")
    actions = user.add_subparsers(dest="user_action", metavar="ACTION", required=True,
                                  help="add, list or remove (each has its own --help)")
    add = actions.add_parser("add", help="make a user and print their token (last line)")
    add.add_argument("name", metavar="NAME", help="the person's name, like their login name (ada, j_smith)")
    add.add_argument("--admin", action="store_true", help="may cancel anyone's jobs, drain nodes and manage users")
    add.add_argument("--max-gpus", type=bounded(1, 1_000_000), metavar="N",
                     help="the most GPUs their jobs may hold at once (default: no limit)")
    listing = actions.add_parser("list", help="list the users")
    remove = actions.add_parser("remove", help="remove a user: their token stops working, their sessions close")
    remove.add_argument("name", metavar="NAME", help="the user's name, as `gpudeck user list` shows it")
    for action in (add, listing, remove):
        action.add_argument("--json", action="store_true", help="print JSON with stable field names")
        _client_flags(action)


def _doctor_parser(sub: Any) -> None:
    doctor = _command(sub, "doctor",
                      "pre-flight check of the network between nodes: interfaces, ports, mDNS, bandwidth",
                      "Runs a small job of its own, one rank on each node and no GPU, so it takes the launch path "
                      "and the ports real jobs take. It shows the interface each node uses toward each other node "
                      "and whether the job ports answer there, which nodes see each other's mDNS adverts, and a "
                      "gloo all-reduce between every pair of nodes and across all of them, as bus bandwidth "
                      "(nccl-tests' algbw x 2(n-1)/n) against the best pair. It names a blocked port, a slow or "
                      "broken link, and a node all of whose links are slow. Exit code 1 when it found a problem.",
                      "gpudeck doctor", "gpudeck doctor --nodes node-a,node-b", "gpudeck doctor --size 64M --json")
    doctor.add_argument("--nodes", type=lambda text: [part for part in text.split(",") if part], metavar="A,B",
                        help="the nodes to check (default: every node that is up and not draining)")
    doctor.add_argument("--size", type=size, default=4 << 20, metavar="SIZE",
                        help="bytes in each all-reduce, at most 256M (default: 4M); larger reads closer to a "
                        "link's top speed")
    doctor.add_argument("--timeout", type=duration, default=10.0, metavar="DUR",
                        help="how long the check waits for a node at each step, at most 60s (default: 10s)")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON with stable field names")
    _client_flags(doctor)


def gpu_ref(text: str) -> tuple[str, int]:
    """NODE:INDEX for argparse ('node-b:3')."""
    node, sep, index = text.rpartition(":")
    if not sep or not node or not index.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not NODE:INDEX (like node-b:3, as `gpudeck nodes` lists them)")
    return node, int(index)


def _gpu_parsers(sub: Any) -> None:
    gpu = _command(sub, "gpu", "keep one faulty GPU out of the schedule, or offer it again (admins)",
                   "A GPU that reports a fatal fault (an Xid error, uncorrected ECC errors, a failed row remap) is "
                   "cordoned by itself: no new job is placed on it, the rest of its node goes on, and `gpudeck "
                   "nodes` shows why. Once it is fixed or reset, `gpudeck gpu uncordon NODE:INDEX` offers it again "
                   "(the faults it showed until then do not cordon it again; a new one does). `cordon` takes one "
                   "out by hand. Jobs running on it are left alone.",
                   "gpudeck gpu uncordon node-b:3", "gpudeck gpu cordon node-b:3 --reason 'fans are loud'")
    actions = gpu.add_subparsers(dest="gpu_action", metavar="ACTION", required=True,
                                 help="cordon or uncordon (each has its own --help)")
    cordon = actions.add_parser("cordon", help="keep a GPU out of the schedule")
    cordon.add_argument("--reason", default="", help="why, shown in `gpudeck nodes` and the dashboard")
    uncordon = actions.add_parser("uncordon", help="offer a cordoned GPU to jobs again")
    for action in (cordon, uncordon):
        action.add_argument("gpu", type=gpu_ref, metavar="NODE:INDEX", help="the GPU, as `gpudeck nodes` lists it")
        action.add_argument("--json", action="store_true", help="print the node as JSON with stable field names")
        _client_flags(action)


PARSERS: dict[str, Callable[[Any], None]] = {  # each adds its subcommand; in the order --help lists them
    "tui": _tui_parser,
    "up": _up_parser,
    "coordinator": _coordinator_parser,
    "agent": _agent_parser,
    "token": _token_parser,
    "web": _web_parser,
    "submit": _submit_parser,
    "jobs": _jobs_parser,
    "nodes": _nodes_parser,
    "show": _show_parser,
    "cancel": _cancel_parser,
    "drain": _drain_parser,
    "outputs": _outputs_parser,
    "logs": _logs_parser,
    "user": _user_parsers,
    "gpu": _gpu_parsers,
    "doctor": _doctor_parser,
    "usage": _usage_parser,
}


# --- client commands -----------------------------------------------------------------------------


async def _with_session(args: argparse.Namespace, work: Callable[[ClientSession], Awaitable[int]]) -> int:
    from gpudeck.client import connect, find_endpoints

    token = config.find_token(args.token, args.token_file)
    endpoints = await find_endpoints(args.coordinator)
    async with connect(endpoints, token) as session:
        return await work(session)


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
    submit = command_parser(build_parser("submit"), "submit")
    own = set(submit._option_string_actions) - {"-h", "--help"}
    return [arg.partition("=")[0] for arg in argv if arg.partition("=")[0] in own]


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
    spec = JobSpec(
        name=args.name or named,
        gpus=None if nodes is not None else (gpus if gpus is not None else 1),
        nodes=nodes, gpus_per_node=per_node, priority=args.priority, time_limit=time_limit,
        max_restarts=args.max_restarts, script_name=script_name, script=script, workload=workload,
        # A shipped project's digest is known once it is shipped (cmd_submit); this one only marks it.
        args=run_args, workdir="" if root else os.getcwd(), project="0" * 64 if root else "", subdir=subdir,
        command=list(args.command_line), env=_environment(args), python=args.python or "",
        venv=args.venv or "", requirements=_requirements(args.requirements), image=args.image or "",
        launcher="torchrun" if args.torchrun else "", preemptible=args.preemptible, after=args.after,
        after_any=args.after_any, array=args.array or "", hang_timeout=args.hang_timeout)
    try:
        spec.check()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return spec


def cmd_submit(args: argparse.Namespace) -> int:
    """Blocking, without asyncio: a shell loop of submits is bound by this command's start (issue 25)."""
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
            digest = ship(session, root, cap, [spec.script_name] if spec.script_name else [])
            spec = dataclasses.replace(spec, project=digest)
        job = session.request(Submit, spec=spec.to_wire())
    print(json.dumps(job, indent=2) if args.json else job["id"])
    return 0


async def _all_jobs(session: ClientSession, **filters: Any) -> list[dict[str, Any]]:
    """Every job that passes `filters` (see ListJobs), in id order, page by page (a long history is
    more than one frame)."""
    from gpudeck.protocol.messages import ListJobs

    jobs: list[dict[str, Any]] = []
    while True:
        page = await session.request(ListJobs, after=jobs[-1]["id"] if jobs else 0, limit=JOBS_PAGE, **filters)
        jobs += page
        if len(page) < JOBS_PAGE:
            return jobs


async def _recent_jobs(session: ClientSession, most: int, **filters: Any) -> tuple[list[dict[str, Any]], int]:
    """The `most` most recent jobs that pass `filters`, in id order, and how many older ones pass them too."""
    from gpudeck.protocol.messages import CountJobs, ListJobs

    jobs: list[dict[str, Any]] = []
    while len(jobs) < most:
        want = min(JOBS_PAGE, most - len(jobs))
        page = await session.request(ListJobs, after=0, limit=want, newest=True,
                                     before=jobs[0]["id"] if jobs else None, **filters)
        jobs = page + jobs
        if len(page) < want:
            return jobs, 0
    return jobs, await session.request(CountJobs, **filters) - len(jobs)


async def _listed_jobs(session: ClientSession, args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    """The jobs `gpudeck jobs` shows and, when it leaves some out, a line saying how many and how to see them.
    With no flag: every unfinished job and the RECENT_FINISHED latest finished; `--json` alone: every job."""
    filters = {"states": args.state or [], "since": args.since,
               "owner": session.welcome.user if args.mine and session.welcome else args.user}
    if args.limit is not None:
        jobs, older = await _recent_jobs(session, args.limit, **filters)
        return jobs, f"... and {counted(older, 'older job')} that match: raise --limit, or use --all" if older else ""
    if args.all or args.json or args.state or args.since is not None:
        return await _all_jobs(session, **filters), ""
    active = await _all_jobs(session, states=UNFINISHED_STATES, owner=filters["owner"])
    finished, older = await _recent_jobs(session, RECENT_FINISHED, states=FINISHED_STATES, owner=filters["owner"])
    jobs = sorted(active + finished, key=lambda job: job["id"])
    return jobs, f"... and {counted(older, 'older finished job')}: gpudeck jobs --all" if older else ""


async def cmd_listing(args: argparse.Namespace) -> int:
    from gpudeck import output
    from gpudeck.protocol.messages import Cancel, Drain, ListNodes, ShowJob

    async def work(session: ClientSession) -> int:
        if args.command == "jobs":
            data, left_out = await _listed_jobs(session, args)
            filtered = bool(args.state or args.since is not None or args.mine or args.user)
            print(json.dumps(data, indent=2) if args.json else output.jobs_table(data, filtered))
            if left_out and not args.json:
                print(left_out)
        elif args.command == "nodes" and args.foreign:
            data = await session.request(ListNodes)
            held = output.foreign_processes(data["nodes"])
            print(json.dumps(held, indent=2) if args.json else output.foreign_table(held, time.time()))
        elif args.command == "nodes":
            data = await session.request(ListNodes)
            print(json.dumps(data["nodes"], indent=2) if args.json else output.nodes_table(data))
        elif args.command == "show":
            data = await session.request(ShowJob, job=args.job[0], index=args.job[1])
            print(json.dumps(data, indent=2) if args.json else output.job_detail(data))
        elif args.command == "drain":
            data = await session.request(Drain, node=args.node, on=not args.off)
            print(f"node {visible(data['name'])} "
                  + ("is draining: no new jobs will be placed on it" if data["draining"] else "takes new jobs again"))
        else:
            data = await session.request(Cancel, job=args.job[0], index=args.job[1])
            whole = args.job[1] is None and data["array_job"] == data["id"]
            print(f"array {data['id']}: every task that had not ended is cancelled" if whole
                  else f"job {ref_text(*args.job)} cancelled")
        return 0

    return await _with_session(args, work)


async def cmd_gpu(args: argparse.Namespace) -> int:
    from gpudeck.protocol.messages import Cordon

    node, index = args.gpu
    on = args.gpu_action == "cordon"

    async def work(session: ClientSession) -> int:
        data = await session.request(Cordon, node=node, gpu=index, on=on, reason=args.reason if on else "")
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            print(f"GPU {index} of node {visible(node)} " + ("is cordoned: no new job will be placed on it" if on
                                                           else "is offered to jobs again"))
        return 0

    return await _with_session(args, work)


async def cmd_user(args: argparse.Namespace) -> int:
    from gpudeck import output
    from gpudeck.protocol.messages import AddUser, ListUsers, RemoveUser

    async def work(session: ClientSession) -> int:
        if args.user_action == "add":
            user = await session.request(AddUser, name=args.name, admin=args.admin, max_gpus=args.max_gpus)
            if args.json:
                print(json.dumps(user, indent=2))
            else:
                role = "an admin" if user["admin"] else "a user"
                limit = f", at most {counted(user['max_gpus'], 'GPU')} at once" if user["max_gpus"] else ""
                print(f"{visible(user['name'])} is {role}{limit}. Their token, shown only this once "
                      "(they pass it with --token, --token-file or $GPUDECK_TOKEN):")
                print(user["token"])
        elif args.user_action == "remove":
            data = await session.request(RemoveUser, name=args.name)
            print(json.dumps(data) if args.json else f"{visible(args.name)} is removed: their token no longer works")
        else:
            users = await session.request(ListUsers)
            print(json.dumps(users, indent=2) if args.json else output.users_table(users))
        return 0

    return await _with_session(args, work)


async def cmd_usage(args: argparse.Namespace) -> int:
    from gpudeck import output
    from gpudeck.protocol.messages import Usage

    async def work(session: ClientSession) -> int:
        data = await session.request(Usage, since=args.since, user=args.user)
        print(json.dumps(data, indent=2) if args.json else output.usage_report(data))
        return 0

    return await _with_session(args, work)


async def cmd_logs(args: argparse.Namespace) -> int:
    import asyncio

    from gpudeck import output
    from gpudeck.protocol.messages import ReadLogs

    async def work(session: ClientSession) -> int:
        printer = output.LogPrinter(sys.stdout,
                                    include_launcher=args.launcher or args.rank is not None and args.rank < 0,
                                    raw=args.raw)
        offsets: dict[str, int] = {}
        while True:
            reply = await session.request(ReadLogs, job=args.job[0], index=args.job[1], attempt=args.attempt,
                                          rank=args.rank, offsets=offsets)
            printer.include_launcher |= reply["state"] == "failed" or reply["per_node"]
            for rank, data in sorted(reply["chunks"].items(), key=lambda kv: int(kv[0])):
                offsets[rank] = offsets.get(rank, 0) + len(data)
                printer.feed(int(rank), data)
            more = any(reply["chunks"].values())
            if not more and (not args.follow or reply["finished"]):
                break
            if not more:
                await asyncio.sleep(0.5)
        printer.flush()
        if args.follow:
            print(f"gpudeck: {output.how_it_ended(ref_text(*args.job), reply['state'], reply.get('reason', ''))}",
                  file=sys.stderr)
        return 0

    return await _with_session(args, work)


async def cmd_outputs(args: argparse.Namespace) -> int:
    from gpudeck.protocol.messages import ShowJob
    from gpudeck.upload import download_outputs

    async def work(session: ClientSession) -> int:
        job = await session.request(ShowJob, job=args.job[0], index=args.job[1])
        named = ref_text(*args.job)
        kept = {node: files for node, files in job["outputs"].items() if args.node in (None, node)}
        if not kept:
            where = f" on {args.node}" if args.node else ""
            raise Failure(f"job {named} has no outputs kept{where}: it wrote nothing to $GPUDECK_OUTPUT_DIR, "
                          "or its nodes have let them go")
        destination = args.to or Path(OUTPUTS_HERE) / named
        count = await download_outputs(session, job["id"], kept, destination)
        print(f"{counted(count, 'file')} of job {named} in {destination}", file=sys.stderr)
        return 0

    return await _with_session(args, work)


async def cmd_doctor(args: argparse.Namespace) -> int:
    """Submit gpudeck doctor's check, wait for it, print its report; 1 when it found a problem."""
    from gpudeck import doctor
    from gpudeck.protocol.messages import ListNodes, Submit

    if args.size > doctor.MAX_SIZE or args.timeout > doctor.MAX_TIMEOUT:
        raise UsageError(f"--size is at most {doctor.MAX_SIZE >> 20}M and --timeout at most {doctor.MAX_TIMEOUT:g}s")

    async def work(session: ClientSession) -> int:
        names = doctor.chosen_nodes((await session.request(ListNodes))["nodes"], args.nodes)
        spec = JobSpec(name="doctor", workload=DOCTOR, on_nodes=names,
                       args=["--bytes", str(args.size), "--timeout", f"{args.timeout:g}"])
        job = await session.request(Submit, spec=spec.to_wire())
        print(f"gpudeck: checking {', '.join(names)} (job {job['id']})", file=sys.stderr)
        rounds = len(names) + 1  # the pairs' rounds (n - 1, or n when odd), then all of them
        data = await _doctor_report(session, job["id"], names[0], 60 + doctor.step_wait(args.timeout, 5) * rounds)
        try:
            found = doctor.Report.from_json(visible_data(data))
        except (KeyError, TypeError, ValueError) as exc:
            raise Failure(f"the check's report could not be read ({type(exc).__name__}: {exc}); do the agents run "
                          "the same version of gpudeck as this command?") from None
        print(json.dumps(found.to_json(), indent=2) if args.json else doctor.table(found))
        return 0 if not found.problems else 1

    return await _with_session(args, work)


async def _doctor_report(session: ClientSession, job_id: int, first: str, wait: float) -> dict[str, Any]:
    """The report the check's rank 0 (on node `first`) left in its outputs; a Failure if the job
    ended without one, or did not end in `wait` seconds (then it is cancelled)."""
    import asyncio
    import tempfile

    from gpudeck import doctor, output
    from gpudeck.protocol.messages import Cancel, ShowJob
    from gpudeck.upload import download_outputs

    deadline = time.monotonic() + wait
    while True:
        job = await session.request(ShowJob, job=job_id)
        kept = [f for f in job["outputs"].get(first, []) if f["path"] == doctor.REPORT_FILE]
        if kept or JobState(job["state"]).finished:  # a node sends its outputs before it says its ranks ended
            break
        if time.monotonic() > deadline:
            await session.request(Cancel, job=job_id)
            raise Failure(f"the check (job {job_id}) did not finish in {wait:.0f} s, so it was cancelled; it "
                          f"was {job['state']}: {job.get('reason') or 'no reason given'}")
        await asyncio.sleep(0.2)
    if not kept:
        raise Failure(f"the check itself {output.how_it_ended(str(job_id), job['state'], job.get('reason', ''))}; "
                      f"`gpudeck logs {job_id}` shows what it printed")
    with tempfile.TemporaryDirectory() as folder:
        await download_outputs(session, job_id, {first: kept}, Path(folder), io.StringIO())
        return json.loads((Path(folder) / doctor.REPORT_FILE).read_text())


def cmd_token(args: argparse.Namespace) -> int:
    from gpudeck.protocol import auth

    identity = auth.CoordinatorIdentity(args.state_dir or config.coordinator_dir())
    print(identity.token())
    return 0


# --- services ------------------------------------------------------------------------------------


async def _until_signalled(main: Awaitable[Any]) -> None:
    import asyncio
    import signal

    task = asyncio.ensure_future(main)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        pass


async def cmd_coordinator(args: argparse.Namespace) -> int:
    import asyncio

    from gpudeck.coordinator.server import Coordinator

    coordinator = Coordinator(args.state_dir or config.coordinator_dir(), args.host, args.port,
                              mdns_interfaces=args.mdns_interface, use_mdns=not args.no_mdns,
                              job_ports=args.job_ports, project_cap=args.project_cap,
                              project_store=args.project_store, idle_after=args.idle_after,
                              idle_cancel=args.idle_cancel, metrics=args.metrics, hang_after=args.hang_after,
                              **scheduling_options(args))
    await coordinator.start()
    try:
        await _until_signalled(asyncio.Event().wait())
    finally:
        await coordinator.stop()
    return 0


def _agent_token(args: argparse.Namespace) -> auth.JoinToken:
    from gpudeck.protocol import auth

    text = args.token or os.environ.get("GPUDECK_TOKEN")
    path = args.token_file or os.environ.get("GPUDECK_TOKEN_FILE")
    return auth.read_token_text(text, path) if text or path else config.find_token(None, None)


async def cmd_agent(args: argparse.Namespace) -> int:
    import socket

    from gpudeck.agent.gpus import open_backend
    from gpudeck.agent.health import SIMULATED_GPUS
    from gpudeck.agent.node import Agent, AgentConfig

    state_dir = args.state_dir or config.agent_dir()
    if args.run_as_owner:
        _check_run_as_owner(state_dir)
    token = _agent_token(args)
    address = args.coordinator or os.environ.get("GPUDECK_COORDINATOR")
    coordinator = split_address(address, config.DEFAULT_PORT) if address else None
    if coordinator is None and args.no_mdns:
        raise Failure("with --no-mdns the agent needs --coordinator HOST:PORT")
    backend, found = open_backend(args.simulate_gpus, injected=state_dir / SIMULATED_GPUS)
    logging.getLogger("gpudeck.agent").info("%s", found)
    agent = Agent(AgentConfig(name=args.name or socket.gethostname().split(".")[0], token=token,
                              state_dir=state_dir, coordinator=coordinator,
                              mdns_interfaces=args.mdns_interface, use_mdns=not args.no_mdns,
                              keep_outputs_for=args.keep_outputs, outputs_space=args.outputs_space,
                              cache_space=args.cache_space, environments=args.environments,
                              warm=args.warm, run_as_owner=args.run_as_owner), backend)
    await _until_signalled(agent.run())
    return 0


def _check_run_as_owner(state_dir: Path) -> None:
    """--run-as-owner needs root (no other user may start a process as another account) and a state
    dir every account may pass through (each job's processes use their own part of it)."""
    from gpudeck.agent.accounts import closed_to_others

    if os.geteuid() != 0:
        raise Failure("--run-as-owner starts each job as its owner's account, which only an agent running as root "
                      "can do: run the agent as root or leave the flag out")
    closed = closed_to_others(state_dir)
    if closed is not None:
        raise Failure(f"with --run-as-owner every job's account must pass through the state dir {state_dir}, but "
                      f"{closed} is closed to other accounts: pass a --state-dir whose folders all have o+x")


# --- the dashboard -------------------------------------------------------------------------------


def on_terminal() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def cmd_tui(args: argparse.Namespace) -> int:
    if not on_terminal():
        raise Failure("the dashboard needs a terminal; for scripts use `gpudeck nodes`, `gpudeck jobs` and the "
                      "other commands (with --json)")
    from gpudeck.tui.app import run_dashboard

    return run_dashboard(args.coordinator, args.token, args.token_file, getattr(args, "mdns_interface", None))


def _web_coordinator(args: argparse.Namespace) -> str | None:
    """Where the browser sessions look for the coordinator: where the user said, else (with --no-mdns,
    which forbids looking over mDNS) the coordinator of this machine's data dir."""
    named = args.coordinator or os.environ.get("GPUDECK_COORDINATOR")
    if named or not args.no_mdns:
        return named
    local = config.local_endpoint()
    if local is None:
        raise UsageError("with --no-mdns, gpudeck web needs --coordinator HOST:PORT (no coordinator runs from this "
                         "machine's data dir)")
    return f"[{local.host}]:{local.port}" if ":" in local.host else f"{local.host}:{local.port}"


async def cmd_web(args: argparse.Namespace) -> int:
    import asyncio
    import getpass
    import socket

    from gpudeck.tui.web import WebDeck, banner, is_loopback, session_command

    deck = WebDeck(session_command(_web_coordinator(args), args.mdns_interface), loopback_only=is_loopback(args.host),
                   max_sessions=args.max_sessions)
    try:
        port = await deck.start(args.host, args.port)
    except OSError as exc:
        raise Failure(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    try:
        print("\n".join(banner(args.host, port, getpass.getuser(), socket.gethostname())), flush=True)
        await _until_signalled(asyncio.Event().wait())
    finally:
        await deck.stop()
    return 0


# --- entry point ---------------------------------------------------------------------------------

# Plain functions: no event loop of ours (the dashboard runs its own, submit is blocking).
SYNC_COMMANDS = {"submit": cmd_submit, "tui": cmd_tui, "token": cmd_token}
ASYNC_COMMANDS = {"jobs": cmd_listing, "nodes": cmd_listing, "show": cmd_listing,
                  "cancel": cmd_listing, "drain": cmd_listing, "logs": cmd_logs, "outputs": cmd_outputs,
                  "coordinator": cmd_coordinator, "agent": cmd_agent,
                  "web": cmd_web, "user": cmd_user, "gpu": cmd_gpu,
                  "usage": cmd_usage, "doctor": cmd_doctor}


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse, with `submit [OPTIONS] -- CMD ARGS...` giving CMD its own line (after a script, `--`
    is only one of the script's arguments)."""
    if "--" in argv:
        cut = argv.index("--")
        head = _parse(parser, argv[:cut])
        if head.command == "submit" and not head.script and head.workload is None:
            head.command_line = argv[cut + 1:]
            return head
    return _parse(parser, argv)


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`parse_args`, but an argument no parser takes is reported by the command it was given to, with
    that command's usage (`gpudeck jobs: error: unrecognized arguments: --bogus`): argparse itself
    reports it from the top parser, whose usage does not help."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command_parser(parser, args.command).error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def named_command(words: list[str]) -> str | None:
    """The subcommand the command line names (None for none, or for a word that names none: the whole
    parser then says which there are), skipping the values of the options before it."""
    takes_value = False
    for word in words:
        if not takes_value and not word.startswith("-"):
            return word if word in PARSERS else None
        takes_value = word in TOP_OPTIONS_WITH_VALUES
    return None


def command_parser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    """The parser of one subcommand (the top parser for none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


def main(argv: list[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(named_command(words))
    args = parse_command_line(parser, words)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    given = {"coordinator": args.dashboard_coordinator, "token": args.dashboard_token,
             "token_file": args.dashboard_token_file}
    if args.command is not None and any(given.values()):
        # `gpudeck --coordinator X nodes`: the flags before the command count for it too.
        for name, value in given.items():
            if value is None:
                continue
            if not hasattr(args, name):
                parser.error(f"--{name.replace('_', '-')} does not apply to `gpudeck {args.command}`")
            if getattr(args, name) is None:
                setattr(args, name, value)
    if args.command is None:
        if not on_terminal():
            parser.print_help()
            return 2
        args.command = "tui"
        args.coordinator, args.token = args.dashboard_coordinator, args.dashboard_token
        args.token_file = args.dashboard_token_file
    try:
        return _run(args)
    except UsageError as exc:
        print(f"{parser.prog} {args.command}: error: {visible(str(exc))}", file=sys.stderr)
        return 2
    except (Failure, ValueError) as exc:
        return _refused(str(exc))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - _why_refused words refusals and failed connections, re-raises the rest
        return _refused(_why_refused(exc))


def _why_refused(exc: Exception) -> str:
    """The sentence for a refusal or a failed connection (their types come with the modules that
    raise them, imported only by the commands that connect); anything else is a bug and goes on."""
    from gpudeck.client import NoCoordinator
    from gpudeck.protocol import auth
    from gpudeck.protocol.handshake import Refused

    if isinstance(exc, (Refused, auth.TokenError, auth.PinMismatch, NoCoordinator)):
        return str(exc)
    if isinstance(exc, (ConnectionError, TimeoutError, *_asyncio_timeout())):
        return ("the coordinator closed the connection or stopped answering before it replied "
                f"({exc or type(exc).__name__})")
    if isinstance(exc, OSError):
        return str(exc)
    raise exc


def _asyncio_timeout() -> tuple[type[BaseException], ...]:
    """asyncio's timeout where a command loaded asyncio (on Python 3.10 it is not `TimeoutError`)."""
    asyncio = sys.modules.get("asyncio")
    return (asyncio.TimeoutError,) if asyncio is not None else ()


def _run(args: argparse.Namespace) -> int:
    """Run the command; a reader that closes our stdout early (`gpudeck jobs | head -1`) ends it
    quietly with 141, the status of a process that SIGPIPE ended, as `ls | head` gives. Stdout is
    flushed here, since output still buffered would otherwise fail at exit, where nothing catches it."""
    try:
        code = _dispatch(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python flushes stdout at exit
        return 141


def _dispatch(args: argparse.Namespace) -> int:
    if args.command in SYNC_COMMANDS:
        return SYNC_COMMANDS[args.command](args)
    import asyncio

    if args.command == "up":
        from gpudeck.local import run_up
        return asyncio.run(run_up(args))
    return asyncio.run(ASYNC_COMMANDS[args.command](args))


def _refused(reason: str) -> int:
    print(f"gpudeck: {visible(reason)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
