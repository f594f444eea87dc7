"""The dashboard: `gpudeck tui` (what `gpudeck` with no command opens) in this terminal, and `gpudeck web`,
which serves it to browsers."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from gpudeck import config
from gpudeck.cli.arguments import bounded, coordinator_address
from gpudeck.cli.exits import Failure, UsageError
from gpudeck.cli.parsers import client_flags, command, mdns_flags
from gpudeck.cli.registry import Command


def _tui_parser(sub: Any) -> None:
    tui = command(sub, "tui",
                  "A keyboard-driven dashboard of nodes, GPUs, jobs and sync traffic, in this terminal. It shows "
                  "the coordinator given by --coordinator, else $GPUDECK_COORDINATOR, else the one this machine's "
                  "data dir names, else one found over mDNS. Press ? in it for every key.",
                  "gpudeck tui", "gpudeck tui --coordinator lab-head:7070 --token-file ~/gpudeck-token")
    client_flags(tui)
    tui.add_argument("--mdns-interface", action="append", metavar="IP",
                     help="look for the coordinator over mDNS only on the interface with this address")


def _web_parser(sub: Any) -> None:
    web = command(sub, "web",
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
    mdns_flags(web)


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

    from gpudeck.cli.services import until_signalled
    from gpudeck.tui.web import WebDeck, banner, is_loopback, session_command

    deck = WebDeck(session_command(_web_coordinator(args), args.mdns_interface), loopback_only=is_loopback(args.host),
                   max_sessions=args.max_sessions)
    try:
        port = await deck.start(args.host, args.port)
    except OSError as exc:
        raise Failure(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    try:
        print("\n".join(banner(args.host, port, getpass.getuser(), socket.gethostname())), flush=True)
        await until_signalled(asyncio.Event().wait())
    finally:
        await deck.stop()
    return 0


COMMANDS = {"tui": Command(_tui_parser, cmd_tui), "web": Command(_web_parser, cmd_web)}
