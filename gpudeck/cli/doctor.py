"""`gpudeck doctor`: the network between the nodes, checked by a small job of its own."""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpudeck.cli.arguments import duration, size
from gpudeck.cli.connection import with_session
from gpudeck.cli.exits import Failure, UsageError
from gpudeck.cli.parsers import client_flags, command
from gpudeck.cli.registry import Command
from gpudeck.model import DOCTOR, JobSpec, JobState, RunSpec
from gpudeck.text import visible_data

if TYPE_CHECKING:
    from gpudeck.protocol.session import ClientSession


def _doctor_parser(sub: Any) -> None:
    doctor = command(sub, "doctor",
                     "Runs a small job of its own, one rank on each node and no GPU, so it takes the launch path "
                     "and the ports real jobs take. It shows the interface each node uses toward each other node "
                     "and whether the job ports answer there, which nodes see each other's mDNS adverts, and a "
                     "gloo all-reduce between every pair of nodes and across all of them, as bus bandwidth "
                     "(nccl-tests' algbw x 2(n-1)/n) against the best pair. It names a blocked port, a slow or "
                     "broken link, and a node all of whose links are slow. Exit code 1 when it found a problem.",
                     "gpudeck doctor", "gpudeck doctor --nodes node-a,node-b", "gpudeck doctor --size 64M --json")
    doctor.add_argument("--nodes", type=lambda text: [part for part in text.split(",") if part], metavar="A,B",
                        help="the nodes to check (default: every node that is up and not draining)")
    doctor.add_argument("--size", type=size, default=4 << 20, metavar="SIZE",
                        help="bytes in each all-reduce, at most 256M (default: 4M); larger reads closer to a "
                        "link's top speed")
    doctor.add_argument("--timeout", type=duration, default=10.0, metavar="DUR",
                        help="how long the check waits for a node at each step, at most 60s (default: 10s)")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON with stable field names")
    client_flags(doctor)


async def cmd_doctor(args: argparse.Namespace) -> int:
    """Submit gpudeck doctor's check, wait for it, print its report; 1 when it found a problem."""
    from gpudeck import doctor
    from gpudeck.protocol.messages import ListNodes, Submit

    if args.size > doctor.MAX_SIZE or args.timeout > doctor.MAX_TIMEOUT:
        raise UsageError(f"--size is at most {doctor.MAX_SIZE >> 20}M and --timeout at most {doctor.MAX_TIMEOUT:g}s")

    async def work(session: ClientSession) -> int:
        names = doctor.chosen_nodes((await session.request(ListNodes))["nodes"], args.nodes)
        spec = JobSpec(name="doctor", on_nodes=names, run=RunSpec(
            workload=DOCTOR, args=["--bytes", str(args.size), "--timeout", f"{args.timeout:g}"]))
        job = await session.request(Submit, spec=spec.to_wire())
        print(f"gpudeck: checking {', '.join(names)} (job {job['id']})", file=sys.stderr)
        rounds = len(names) + 1  # the pairs' rounds (n - 1, or n when odd), then all of them
        data = await _doctor_report(session, job["id"], names[0], 60 + doctor.step_wait(args.timeout, 5) * rounds)
        try:
            found = doctor.Report.from_json(visible_data(data))
        except (KeyError, TypeError, ValueError) as exc:
            raise Failure(f"the check's report could not be read ({type(exc).__name__}: {exc}); do the agents run "
                          "the same version of gpudeck as this command?") from None
        print(json.dumps(found.to_json(), indent=2) if args.json else doctor.table(found))
        return 0 if not found.problems else 1

    return await with_session(args, work)


async def _doctor_report(session: ClientSession, job_id: int, first: str, wait: float) -> dict[str, Any]:
    """The report the check's rank 0 (on node `first`) left in its outputs; a Failure if the job
    ended without one, or did not end in `wait` seconds (then it is cancelled)."""
    import asyncio
    import tempfile

    from gpudeck import doctor, output
    from gpudeck.protocol.messages import Cancel, ShowJob
    from gpudeck.upload import download_outputs

    deadline = time.monotonic() + wait
    while True:
        job = await session.request(ShowJob, job=job_id)
        kept = [f for f in job["outputs"].get(first, []) if f["path"] == doctor.REPORT_FILE]
        if kept or JobState(job["state"]).finished:  # a node sends its outputs before it says its ranks ended
            break
        if time.monotonic() > deadline:
            await session.request(Cancel, job=job_id)
            raise Failure(f"the check (job {job_id}) did not finish in {wait:.0f} s, so it was cancelled; it "
                          f"was {job['state']}: {job.get('reason') or 'no reason given'}")
        await asyncio.sleep(0.2)
    if not kept:
        raise Failure(f"the check itself {output.how_it_ended(str(job_id), job['state'], job.get('reason', ''))}; "
                      f"`gpudeck logs {job_id}` shows what it printed")
    with tempfile.TemporaryDirectory() as folder:
        await download_outputs(session, job_id, {first: kept}, Path(folder), io.StringIO())
        return json.loads((Path(folder) / doctor.REPORT_FILE).read_text())


COMMANDS = {"doctor": Command(_doctor_parser, cmd_doctor)}
