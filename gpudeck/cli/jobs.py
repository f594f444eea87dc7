"""`gpudeck jobs`, `show` and `cancel`: the queue and its history, one job, and its end."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from gpudeck.arrays import ref_text
from gpudeck.cli.arguments import FINISHED_STATES, UNFINISHED_STATES, bounded, job_id, job_states, since_time
from gpudeck.cli.connection import with_session
from gpudeck.cli.parsers import JOB_HELP, client_flags, command
from gpudeck.cli.registry import Command
from gpudeck.text import counted

if TYPE_CHECKING:
    from gpudeck.protocol.session import ClientSession

JOBS_PAGE = 1000  # jobs per list request; the coordinator allows at most this many
RECENT_FINISHED = 20  # finished jobs `gpudeck jobs` shows by default, the most recent


def _jobs_parser(sub: Any) -> None:
    jobs = command(sub, "jobs",
                   f"List jobs, oldest first: by default every job that is pending, starting or running and the "
                   f"{RECENT_FINISHED} that finished last, with a line saying how many older ones are left out. "
                   "--all lists the whole history; --state, --since and --limit choose which jobs, with --json "
                   "too (--json alone prints every job).",
                   "gpudeck jobs", "gpudeck jobs --state failed,cancelled --since 2d",
                   "gpudeck jobs --limit 5 --json")
    shown = jobs.add_mutually_exclusive_group()
    shown.add_argument("--all", action="store_true", help="every job that matches, however old")
    shown.add_argument("--limit", type=bounded(1, 1_000_000), metavar="N",
                       help="only the N most recent jobs that match")
    jobs.add_argument("--state", type=job_states, action="extend", metavar="STATE[,STATE]",
                      help=f"only jobs in these states: {', '.join(UNFINISHED_STATES + FINISHED_STATES)}")
    jobs.add_argument("--since", type=since_time, metavar="WHEN",
                      help="only jobs not finished before WHEN: how long ago (90m, 2h, 3d) or a date "
                      "(2026-12-01, 2026-12-01T09:30)")
    whose = jobs.add_mutually_exclusive_group()
    whose.add_argument("--mine", action="store_true", help="only your jobs (those submitted with your token)")
    whose.add_argument("--user", metavar="NAME", help="only this user's jobs")
    jobs.add_argument("--json", action="store_true", help="print JSON with stable field names")
    client_flags(jobs)


def _show_parser(sub: Any) -> None:
    show = command(sub, "show",
                   "One job in detail: what it runs, what it asked for, the nodes and GPUs it was given, its "
                   "attempt, runtime and exit code, the bytes its ranks moved by kind of operation, and the "
                   "outputs its nodes keep. With --json: also the traffic by rank.",
                   "gpudeck show 12", "gpudeck show 12 --json")
    show.add_argument("job", type=job_id, metavar="JOB", help=JOB_HELP)
    show.add_argument("--json", action="store_true", help="print JSON with stable field names")
    client_flags(show)


def _cancel_parser(sub: Any) -> None:
    cancel = command(sub, "cancel",
                     "Cancel a job: a pending job leaves the queue, and a starting or running one has its ranks "
                     "stopped on every node. Its logs and the outputs its nodes keep stay.",
                     "gpudeck cancel 12")
    cancel.add_argument("job", type=job_id, metavar="JOB", help=JOB_HELP)
    client_flags(cancel)


async def _all_jobs(session: ClientSession, **filters: Any) -> list[dict[str, Any]]:
    """Every job that passes `filters` (see ListJobs), in id order, page by page (a long history is
    more than one frame)."""
    from gpudeck.protocol.messages import ListJobs

    jobs: list[dict[str, Any]] = []
    while True:
        page = await session.request(ListJobs, after=jobs[-1]["id"] if jobs else 0, limit=JOBS_PAGE, **filters)
        jobs += page
        if len(page) < JOBS_PAGE:
            return jobs


async def _recent_jobs(session: ClientSession, most: int, **filters: Any) -> tuple[list[dict[str, Any]], int]:
    """The `most` most recent jobs that pass `filters`, in id order, and how many older ones pass them too."""
    from gpudeck.protocol.messages import CountJobs, ListJobs

    jobs: list[dict[str, Any]] = []
    while len(jobs) < most:
        want = min(JOBS_PAGE, most - len(jobs))
        page = await session.request(ListJobs, after=0, limit=want, newest=True,
                                     before=jobs[0]["id"] if jobs else None, **filters)
        jobs = page + jobs
        if len(page) < want:
            return jobs, 0
    return jobs, await session.request(CountJobs, **filters) - len(jobs)


async def _listed_jobs(session: ClientSession, args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    """The jobs `gpudeck jobs` shows and, when it leaves some out, a line saying how many and how to see them.
    With no flag: every unfinished job and the RECENT_FINISHED latest finished; `--json` alone: every job."""
    filters = {"states": args.state or [], "since": args.since,
               "owner": session.welcome.user if args.mine and session.welcome else args.user}
    if args.limit is not None:
        jobs, older = await _recent_jobs(session, args.limit, **filters)
        return jobs, f"... and {counted(older, 'older job')} that match: raise --limit, or use --all" if older else ""
    if args.all or args.json or args.state or args.since is not None:
        return await _all_jobs(session, **filters), ""
    active = await _all_jobs(session, states=UNFINISHED_STATES, owner=filters["owner"])
    finished, older = await _recent_jobs(session, RECENT_FINISHED, states=FINISHED_STATES, owner=filters["owner"])
    jobs = sorted(active + finished, key=lambda job: job["id"])
    return jobs, f"... and {counted(older, 'older finished job')}: gpudeck jobs --all" if older else ""


async def cmd_jobs(args: argparse.Namespace) -> int:
    from gpudeck import output

    async def work(session: ClientSession) -> int:
        data, left_out = await _listed_jobs(session, args)
        filtered = bool(args.state or args.since is not None or args.mine or args.user)
        print(json.dumps(data, indent=2) if args.json else output.jobs_table(data, filtered))
        if left_out and not args.json:
            print(left_out)
        return 0

    return await with_session(args, work)


async def cmd_show(args: argparse.Namespace) -> int:
    from gpudeck import output
    from gpudeck.protocol.messages import ShowJob

    async def work(session: ClientSession) -> int:
        data = await session.request(ShowJob, job=args.job[0], index=args.job[1])
        print(json.dumps(data, indent=2) if args.json else output.job_detail(data))
        return 0

    return await with_session(args, work)


async def cmd_cancel(args: argparse.Namespace) -> int:
    from gpudeck.protocol.messages import Cancel

    async def work(session: ClientSession) -> int:
        data = await session.request(Cancel, job=args.job[0], index=args.job[1])
        whole = args.job[1] is None and data["array_job"] == data["id"]
        print(f"array {data['id']}: every task that had not ended is cancelled" if whole
              else f"job {ref_text(*args.job)} cancelled")
        return 0

    return await with_session(args, work)


COMMANDS = {"jobs": Command(_jobs_parser, cmd_jobs), "show": Command(_show_parser, cmd_show),
            "cancel": Command(_cancel_parser, cmd_cancel)}
