"""The headless services, for systemd: `gpudeck coordinator`, `gpudeck agent`, and `gpudeck token`, which
prints what agents and clients need to join the coordinator. `gpudeck up` runs the first two in one process."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable

from gpudeck import config
from gpudeck.capacity import MAX_GPUS_PER_NODE
from gpudeck.cli.arguments import (
    bounded, coordinator_address, duration, metrics_address, port_number, port_range, priority_weights, simulated_gpus,
    size,
)
from gpudeck.cli.exits import Failure, UsageError
from gpudeck.cli.parsers import command, mdns_flags
from gpudeck.cli.registry import Command
from gpudeck.config import split_address
from gpudeck.project import DEFAULT_CAP

if TYPE_CHECKING:
    from gpudeck.coordinator.server import CoordinatorConfig
    from gpudeck.protocol import auth


def _coordinator_parser(sub: Any) -> None:
    coord = command(sub, "coordinator",
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
    scheduling_flags(coord)
    mdns_flags(coord)


def scheduling_flags(parser: argparse.ArgumentParser) -> None:
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


def _agent_parser(sub: Any) -> None:
    agent = command(sub, "agent",
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
    mdns_flags(agent)


def _token_parser(sub: Any) -> None:
    token = command(sub, "token",
                    "Print the join token of the coordinator whose state is on this machine. Agents and clients on "
                    "other machines need it (--token, --token-file or $GPUDECK_TOKEN): it holds the fingerprint "
                    "of the coordinator's certificate and the cluster's secret, so keep it as you would a password.",
                    "gpudeck token", "gpudeck token --state-dir /var/lib/gpudeck > token && chmod 600 token")
    token.add_argument("--state-dir", type=Path,
                       help="the coordinator's state dir (default: the data dir's coordinator/)")


def scheduling_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The CoordinatorConfig settings of the scheduling flags, which `gpudeck coordinator` and `gpudeck up`
    both take (`scheduling_flags`)."""
    from gpudeck.coordinator.priority import Policy, Weights

    if args.preempt_grace > 3600:
        raise UsageError("--preempt-grace is at most 1h: a stopped job's GPUs stay idle for that long")
    return {"priority": Policy(Weights(**args.priority_weights), args.fair_share_half_life, args.priority_age_cap),
            "default_time_limit": args.default_time_limit, "preempt_grace": args.preempt_grace}


def coordinator_config(args: argparse.Namespace) -> CoordinatorConfig:
    """The coordinator `gpudeck coordinator` asks for: every setting has its flag."""
    from gpudeck.coordinator.server import CoordinatorConfig

    return CoordinatorConfig(args.state_dir or config.coordinator_dir(), args.host, args.port,
                             mdns_interfaces=args.mdns_interface, use_mdns=not args.no_mdns,
                             job_ports=args.job_ports, project_cap=args.project_cap,
                             project_store=args.project_store, idle_after=args.idle_after,
                             idle_cancel=args.idle_cancel, metrics=args.metrics, hang_after=args.hang_after,
                             **scheduling_settings(args))


async def until_signalled(main: Awaitable[Any]) -> None:
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

    coordinator = Coordinator(coordinator_config(args))
    await coordinator.start()
    try:
        await until_signalled(asyncio.Event().wait())
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
    await until_signalled(agent.run())
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


def cmd_token(args: argparse.Namespace) -> int:
    from gpudeck.protocol import auth

    identity = auth.CoordinatorIdentity(args.state_dir or config.coordinator_dir())
    print(identity.token())
    return 0


COMMANDS = {"coordinator": Command(_coordinator_parser, cmd_coordinator), "agent": Command(_agent_parser, cmd_agent),
            "token": Command(_token_parser, cmd_token)}
