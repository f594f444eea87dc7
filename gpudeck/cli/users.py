"""`gpudeck user` and `usage`: the cluster's people, and the GPU time their jobs held."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from gpudeck.cli.arguments import bounded, since_time
from gpudeck.cli.connection import with_session
from gpudeck.cli.parsers import client_flags, command
from gpudeck.cli.registry import Command
from gpudeck.text import counted, visible

if TYPE_CHECKING:
    from gpudeck.protocol.session import ClientSession


def _user_parsers(sub: Any) -> None:
    user = command(sub, "user",
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
        client_flags(action)


def _usage_parser(sub: Any) -> None:
    usage = command(sub, "usage",
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
    client_flags(usage)


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

    return await with_session(args, work)


async def cmd_usage(args: argparse.Namespace) -> int:
    from gpudeck import output
    from gpudeck.protocol.messages import Usage

    async def work(session: ClientSession) -> int:
        data = await session.request(Usage, since=args.since, user=args.user)
        print(json.dumps(data, indent=2) if args.json else output.usage_report(data))
        return 0

    return await with_session(args, work)


COMMANDS = {"user": Command(_user_parsers, cmd_user), "usage": Command(_usage_parser, cmd_usage)}
