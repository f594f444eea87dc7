"""Which module holds each command, by name, with the line `gpudeck --help` gives it.

A command's module is imported only when its command is built or run, as pip's command registry
does: `gpudeck submit` builds only submit's parser and imports only what submit needs (building
every parser was a tenth of a submit's start, and asyncio a sixth: issue 25).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from typing import Any, Callable, Coroutine

# A command's run: an exit code, or a coroutine for one, which runs in an event loop of its own.
Run = Callable[[argparse.Namespace], "int | Coroutine[Any, Any, int]"]


@dataclasses.dataclass(frozen=True)
class Command:
    """What a command's module gives for it: `add_parser` adds its subcommand, `run` runs it."""

    add_parser: Callable[[Any], None]
    run: Run


@dataclasses.dataclass(frozen=True)
class CommandInfo:
    module: str  # its module, whose COMMANDS maps the command's name to its Command
    summary: str  # its line in `gpudeck --help`


COMMANDS: dict[str, CommandInfo] = {  # in the order --help lists them
    "tui": CommandInfo("gpudeck.cli.dashboard", "the dashboard (what `gpudeck` with no command opens)"),
    "up": CommandInfo("gpudeck.cli.up",
                      "run a coordinator and an agent on this machine (loopback only), with the dashboard"),
    "coordinator": CommandInfo("gpudeck.cli.services", "run the coordinator (headless, for systemd)"),
    "agent": CommandInfo("gpudeck.cli.services", "run a node agent (headless, for systemd)"),
    "token": CommandInfo("gpudeck.cli.services", "print the join token of the coordinator on this machine"),
    "web": CommandInfo("gpudeck.cli.dashboard", "the dashboard in a browser, for a laptop or a wall screen"),
    "submit": CommandInfo("gpudeck.cli.submit", "queue a job; prints its id"),
    "jobs": CommandInfo("gpudeck.cli.jobs", "list jobs: those not finished and the latest finished ones"),
    "nodes": CommandInfo("gpudeck.cli.nodes", "list nodes and their GPUs"),
    "show": CommandInfo("gpudeck.cli.jobs", "one job in detail, with its traffic"),
    "cancel": CommandInfo("gpudeck.cli.jobs", "cancel a job, stopping its ranks"),
    "drain": CommandInfo("gpudeck.cli.nodes", "stop placing new jobs on a node (running jobs go on)"),
    "outputs": CommandInfo("gpudeck.cli.results", "download what a job wrote to $GPUDECK_OUTPUT_DIR"),
    "logs": CommandInfo("gpudeck.cli.results", "a job's output, every rank's lines prefixed with its rank"),
    "user": CommandInfo("gpudeck.cli.users", "the cluster's people: add, list and remove users (admins)"),
    "gpu": CommandInfo("gpudeck.cli.nodes", "keep one faulty GPU out of the schedule, or offer it again (admins)"),
    "doctor": CommandInfo("gpudeck.cli.doctor",
                          "pre-flight check of the network between nodes: interfaces, ports, mDNS, bandwidth"),
    "usage": CommandInfo("gpudeck.cli.users", "GPU-hours per user and per job, with waits and energy"),
}


def load(name: str) -> Command:
    """The command `name`, importing its module."""
    commands: dict[str, Command] = importlib.import_module(COMMANDS[name].module).COMMANDS
    return commands[name]
