"""`gpudeck logs` and `outputs`: what a job printed, and the files it wrote."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpudeck.arrays import ref_text
from gpudeck.cli.arguments import job_id, small_int
from gpudeck.cli.connection import with_session
from gpudeck.cli.exits import Failure
from gpudeck.cli.parsers import JOB_HELP, client_flags, command
from gpudeck.cli.registry import Command
from gpudeck.project import OUTPUTS_HERE
from gpudeck.text import counted

if TYPE_CHECKING:
    from gpudeck.protocol.session import ClientSession


def _logs_parser(sub: Any) -> None:
    logs = command(sub, "logs",
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
    client_flags(logs)


def _outputs_parser(sub: Any) -> None:
    outputs = command(sub, "outputs",
                      "Download the files a job wrote under $GPUDECK_OUTPUT_DIR, which its nodes keep after it "
                      "ends (for a time and a space each agent sets). With several nodes, each node's files go in "
                      "a folder named after it.",
                      "gpudeck outputs 12", "gpudeck outputs 12 --to results/ --node node-a")
    outputs.add_argument("job", type=job_id, metavar="JOB", help=JOB_HELP)
    outputs.add_argument("--to", type=Path, metavar="DIR",
                         help="where to put them (default: gpudeck-outputs/JOB here); "
                         "files there are never overwritten")
    outputs.add_argument("--node", metavar="NODE", help="only what this node keeps (a name `gpudeck nodes` lists)")
    client_flags(outputs)


async def cmd_logs(args: argparse.Namespace) -> int:
    import asyncio

    from gpudeck import output
    from gpudeck.logtail import LogTail
    from gpudeck.protocol.messages import ReadLogs

    async def work(session: ClientSession) -> int:
        printer = output.LogPrinter(sys.stdout,
                                    include_launcher=args.launcher or args.rank is not None and args.rank < 0,
                                    raw=args.raw)
        tail = LogTail()
        while True:
            reply = await session.request(ReadLogs, job=args.job[0], index=args.job[1], attempt=args.attempt,
                                          rank=args.rank, offsets=tail.offsets)
            printer.include_launcher |= reply["state"] == "failed" or reply["per_node"]
            step = tail.take(reply)
            printer.write(step.lines)
            if not step.more and (not args.follow or step.finished):
                break
            if not step.more:
                await asyncio.sleep(0.5)
        printer.write(tail.rest())
        if args.follow:
            print(f"gpudeck: {output.how_it_ended(ref_text(*args.job), reply['state'], reply.get('reason', ''))}",
                  file=sys.stderr)
        return 0

    return await with_session(args, work)


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

    return await with_session(args, work)


COMMANDS = {"logs": Command(_logs_parser, cmd_logs), "outputs": Command(_outputs_parser, cmd_outputs)}
