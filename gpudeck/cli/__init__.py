"""The `gpudeck` command. Exit codes: 0 success, 1 the request was refused (reason on stderr), 2 usage.

This package is the composition root: the only code that imports every part (the agent, the
coordinator, the dashboard), each inside the command that runs it. A command lives in the module
`registry` names for it, which adds its parser and runs it; `exits` turns how it ended into the exit
code. Each command imports what it uses when it runs (asyncio, TLS, the protocol, zeroconf only where
mDNS is asked), so `gpudeck --version` starts in the time of a small Python program and `submit` pays
only for the connection it makes.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys

from gpudeck import __version__
from gpudeck.cli import registry
from gpudeck.cli.arguments import coordinator_address
from gpudeck.cli.exits import exit_code

TOP_OPTIONS_WITH_VALUES = ("--coordinator", "--token", "--token-file")  # gpudeck's own, before a command


@functools.cache
def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line, built once a process (parsing does not change it). With `command`, only that
    subcommand's parser is built, which is all a run of it needs: building all of them was a tenth of a
    submit's start."""
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
    for name in registry.COMMANDS:
        if command in (None, name):
            registry.load(name).add_parser(sub)
    return parser


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
            return word if word in registry.COMMANDS else None
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
        from gpudeck.cli.dashboard import on_terminal

        if not on_terminal():
            parser.print_help()
            return 2
        args.command = "tui"
        args.coordinator, args.token = args.dashboard_coordinator, args.dashboard_token
        args.token_file = args.dashboard_token_file
    return exit_code(parser.prog, args.command, lambda: _dispatch(args))


def _dispatch(args: argparse.Namespace) -> int:
    """Run the command: a plain function returns its exit code; a coroutine runs in an event loop of its own
    (submit is blocking and the dashboard runs its own loop, so they load no asyncio of ours)."""
    outcome = registry.load(args.command).run(args)
    if isinstance(outcome, int):
        return outcome
    import asyncio

    return asyncio.run(outcome)
