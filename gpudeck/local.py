"""`gpudeck up`: a coordinator and an agent in one process on this machine, for trying gpudeck out
and for a single workstation. It stays on loopback (no LAN multicast) unless asked for the LAN."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from typing import Any

from gpudeck import config

log = logging.getLogger("gpudeck.up")


async def run_up(args: argparse.Namespace) -> int:
    from gpudeck.agent.gpus import open_backend
    from gpudeck.agent.health import SIMULATED_GPUS
    from gpudeck.agent.node import Agent, AgentConfig
    from gpudeck.cli import scheduling_options
    from gpudeck.coordinator.server import Coordinator

    host = "0.0.0.0" if args.lan else "127.0.0.1"
    interfaces = None if args.lan else ["127.0.0.1"]
    coordinator = Coordinator(config.coordinator_dir(), host, args.port, mdns_interfaces=interfaces,
                              **scheduling_options(args))
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
    if not getattr(args, "no_tui", False) and sys.stdin.isatty() and sys.stdout.isatty():
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
