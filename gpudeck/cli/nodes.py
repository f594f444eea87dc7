"""`gpudeck nodes`, `drain` and `gpu`: the nodes and their GPUs, and keeping jobs off them."""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING, Any

from gpudeck.cli.arguments import gpu_ref
from gpudeck.cli.connection import with_session
from gpudeck.cli.parsers import client_flags, command
from gpudeck.cli.registry import Command
from gpudeck.text import visible

if TYPE_CHECKING:
    from gpudeck.protocol.session import ClientSession


def _nodes_parser(sub: Any) -> None:
    nodes = command(sub, "nodes",
                    "List the nodes that have joined, each with its state, address and jobs, and under it every "
                    "GPU's use, memory, temperature, power and the processes on it that are not gpudeck's; then "
                    "the machines advertising an agent on the network that have not joined, and why.",
                    "gpudeck nodes", "gpudeck nodes --json")
    nodes.add_argument("--foreign", action="store_true",
                       help="list only the processes on GPUs that belong to no gpudeck job (a forgotten notebook), "
                       "with how long each has held its GPU")
    nodes.add_argument("--json", action="store_true", help="print JSON with stable field names")
    client_flags(nodes)


def _drain_parser(sub: Any) -> None:
    drain = command(sub, "drain",
                    "Keep new jobs off a node, before maintenance or to keep its GPUs for something else: the jobs "
                    "running there go on to their end, and the scheduler places nothing new on it until "
                    "`gpudeck drain NODE --off`.",
                    "gpudeck drain node-b", "gpudeck drain node-b --off")
    drain.add_argument("node", metavar="NODE", help="the node's name, as `gpudeck nodes` lists it")
    drain.add_argument("--off", action="store_true", help="let the node take new jobs again")
    client_flags(drain)


def _gpu_parsers(sub: Any) -> None:
    gpu = command(sub, "gpu",
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
        client_flags(action)


async def cmd_nodes(args: argparse.Namespace) -> int:
    from gpudeck import output
    from gpudeck.protocol.messages import ListNodes

    async def work(session: ClientSession) -> int:
        data = await session.request(ListNodes)
        if args.foreign:
            held = output.foreign_processes(data["nodes"])
            print(json.dumps(held, indent=2) if args.json else output.foreign_table(held, time.time()))
        else:
            print(json.dumps(data["nodes"], indent=2) if args.json else output.nodes_table(data))
        return 0

    return await with_session(args, work)


async def cmd_drain(args: argparse.Namespace) -> int:
    from gpudeck.protocol.messages import Drain

    async def work(session: ClientSession) -> int:
        data = await session.request(Drain, node=args.node, on=not args.off)
        print(f"node {visible(data['name'])} "
              + ("is draining: no new jobs will be placed on it" if data["draining"] else "takes new jobs again"))
        return 0

    return await with_session(args, work)


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

    return await with_session(args, work)


COMMANDS = {"nodes": Command(_nodes_parser, cmd_nodes), "drain": Command(_drain_parser, cmd_drain),
            "gpu": Command(_gpu_parsers, cmd_gpu)}
