"""What every command's parser is built from: its help, and the flags that several commands share."""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

from gpudeck.cli.arguments import coordinator_address
from gpudeck.cli.registry import COMMANDS

JOB_HELP = "the job's id, as submit printed it and `gpudeck jobs` lists it (ARRAY.INDEX for a task of an array)"


def command(sub: Any, name: str, description: str, *examples: str) -> argparse.ArgumentParser:
    """A subcommand whose --help starts with a paragraph on what it does and ends with examples, so a
    newcomer can use it from its help alone."""
    return sub.add_parser(name, help=COMMANDS[name].summary, description=textwrap.fill(description, 100),
                          epilog="examples:\n" + "\n".join(f"  {example}" for example in examples),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def client_flags(parser: argparse.ArgumentParser) -> None:
    """Where the coordinator is and who is asking, for the commands that connect to it (`connection`)."""
    parser.add_argument("--coordinator", type=coordinator_address, metavar="HOST:PORT",
                        help="the coordinator (default: $GPUDECK_COORDINATOR, "
                        "the coordinator of this machine's data dir, or one found over mDNS)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--token", help="your token: the one `gpudeck user add` made for you, or the cluster's "
                       "join token (default: $GPUDECK_TOKEN)")
    group.add_argument("--token-file", metavar="F", help="a file holding your token")


def mdns_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-mdns", action="store_true", help="do not use multicast DNS at all")
    parser.add_argument("--mdns-interface", action="append", metavar="IP",
                        help="multicast only on the interface with this address (repeatable; default: all)")
