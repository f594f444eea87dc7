"""`gpudeck up`: a coordinator and an agent in one process on this machine, for trying gpudeck out
and for a single workstation. It stays on loopback (no LAN multicast) unless asked for the LAN."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from gpudeck import config
from gpudeck.capacity import MAX_GPUS_PER_NODE
from gpudeck.cli.arguments import port_number, simulated_gpus
from gpudeck.cli.parsers import command
from gpudeck.cli.registry import Command
from gpudeck.cli.services import scheduling_flags, scheduling_settings

if TYPE_CHECKING:
    import asyncio

def _up_parser(sub: Any) -> None:
    up = command(sub, "up",
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
    scheduling_flags(up)


async def cmd_up(args: argparse.Namespace) -> int:
    import asyncio
    import socket

    from gpudeck.agent.gpus import open_backend
    from gpudeck.agent.health import SIMULATED_GPUS
    from gpudeck.agent.node import Agent, AgentConfig
    from gpudeck.coordinator.server import Coordinator, CoordinatorConfig

    # This machine alone unless --lan, its state in the data dir, the other settings at their defaults.
    settings = CoordinatorConfig(config.coordinator_dir(), "0.0.0.0" if args.lan else "127.0.0.1", args.port,
                                 mdns_interfaces=None if args.lan else ["127.0.0.1"], **scheduling_settings(args))
    host, interfaces = settings.host, settings.mdns_interfaces
    coordinator = Coordinator(settings)
    try:
        await coordinator.start()
    except OSError as exc:
        print(f"gpudeck: cannot listen on port {args.port} ({exc.strerror}): is gpudeck already up? "
              "Try another --port.")
        return 1
    backend, found = open_backend(args.simulate_gpus, injected=config.agent_dir() / SIMULATED_GPUS)
    name = socket.gethostname().split(".")[0]
    agent = Agent(AgentConfig(name=name, token=coordinator.token, state_dir=config.agent_dir(),
                              coordinator=("127.0.0.1", coordinator.port), mdns_interfaces=interfaces), backend)
    runner = asyncio.create_task(agent.run())
    if not args.no_tui and sys.stdin.isatty() and sys.stdout.isatty():
        return await _with_dashboard(coordinator, runner, host, name, found)
    print(f"gpudeck is up: coordinator on {host}:{coordinator.port}, node {name}: {found}.\n"
          f"State is in {config.data_dir()}. In another terminal try:\n"
          f"  gpudeck nodes\n  gpudeck submit --gpus 1 train.py\n  gpudeck jobs\n"
          "Press Ctrl-C to stop; running jobs keep running and are adopted on the next `gpudeck up`.", flush=True)
    try:
        await runner
    except asyncio.CancelledError:
        pass
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await coordinator.stop()
    return 0


async def _with_dashboard(coordinator: Any, runner: asyncio.Task[Any], host: str, name: str, found: str) -> int:
    """The dashboard in this process and event loop, beside the coordinator and the agent; quitting it
    stops them (running jobs keep running and are adopted on the next `gpudeck up`). Logging goes to a
    file meanwhile, since the terminal is the dashboard's."""
    import asyncio
    import signal

    from gpudeck.config import Endpoint
    from gpudeck.tui.app import GpudeckApp, quiet_logging
    from gpudeck.tui.client import CoordinatorLink

    link = CoordinatorLink(endpoints=[Endpoint("127.0.0.1", coordinator.port, "gpudeck up")],
                           join_token=coordinator.token, name="up")
    app = GpudeckApp(link, local_node=name)
    log_file = config.data_dir() / "up.log"
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, app.exit)
    with quiet_logging(log_file):
        try:
            await app.run_async()
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
            await coordinator.stop()
    print(f"gpudeck stopped (coordinator on {host}:{coordinator.port}, node {name}: {found}). Running jobs keep "
          f"running and are adopted on the next `gpudeck up`; the log is in {log_file}.", flush=True)
    return app.return_code or 0


COMMANDS = {"up": Command(_up_parser, cmd_up)}
