"""Human-readable output of the CLI: tables, a job's detail, and per-rank log lines.

The commands hand over what the coordinator answered, as `--json` prints it; the jobs and nodes in
it are read here as the typed views the coordinator built them from (`gpudeck.protocol.views`),
imported by the functions that read them: a command that prints none (`gpudeck logs`) does not
create their classes as it starts."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, TextIO

from gpudeck.arrays import compress, job_label
from gpudeck.model import format_duration
from gpudeck.text import counted, human_bytes, idle_note, safe_output, spoken_duration, visible, visible_data

if TYPE_CHECKING:
    from gpudeck.protocol.views import HangView, JobView, ProgressView, UsageView, UserUsage

GIB = 1 << 30


def table(headers: list[str], rows: list[list[str]]) -> str:
    rows = [[visible(cell) for cell in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [headers, *rows]]
    return "\n".join(lines)


def _runtime(job: JobView) -> str:
    if not job.started_at:
        return "-"
    end = job.ended_at or time.time()
    return format_duration(end - job.started_at)


def _request(job: JobView) -> str:
    req = job.request
    if req.gpus is None and req.nodes is None:
        return "no GPU"  # gpudeck doctor's check: one rank on each of the nodes it names
    return counted(req.gpus, "GPU") if req.gpus is not None else f"{req.nodes}x{req.gpus_per_node}"


def jobs_table(jobs: list[dict[str, Any]], filtered: bool = False) -> str:
    """The jobs (`JobView`s as `--json` has them) as a table; with none, a line that says why
    (`filtered`: none matched what was asked)."""
    if not jobs:
        return ("no jobs match: `gpudeck jobs --all` lists every job" if filtered
                else "no jobs yet: queue one with `gpudeck submit train.py`")
    from gpudeck.protocol.views import JobView

    now = time.time()
    rows = [[label, j.name, j.owner or "-", j.state + (" HUNG" if _hung(j) else ""), _request(j),
             ",".join(j.nodes) or "-", _runtime(j),
             starts_text(j.estimated_start, now) if j.state == "pending" else "-",
             str(j.attempt), "-" if j.exit_code is None else str(j.exit_code), _reason(j)]
            for label, j in _listed([JobView.from_json(job) for job in jobs])]
    return table(["ID", "NAME", "OWNER", "STATE", "ASKED", "NODES", "RUNTIME", "STARTS", "ATTEMPT", "EXIT", "REASON"],
                 rows)


def _listed(jobs: list[JobView]) -> list[tuple[str, JobView]]:
    """Each job with the ID it is listed under: a task of an array as ARRAY.INDEX, and the pending
    tasks of one array together, as squeue lists them (12.[4-31%4]), in the row of the first."""
    pending: dict[int, list[int]] = {}
    for job in jobs:
        if job.array_job is not None and job.array_index is not None and job.state == "pending":
            pending.setdefault(job.array_job, []).append(job.array_index)
    listed: list[tuple[str, JobView]] = []
    for job in jobs:
        array = job.array_job
        if array is None or job.state != "pending" or len(pending[array]) == 1:
            listed.append((job_label(job.id, array, job.array_index), job))
        elif pending[array][0] == job.array_index:
            _, percent, throttle = job.array.partition("%")
            listed.append((f"{array}.[{compress(pending[array])}{percent}{throttle}]", job))
    return listed


def starts_text(estimated_start: float | None, now: float) -> str:
    """When a pending job is planned to start, as `squeue --start` tells it: 'in 3m20s', 'now' once
    that time has come (the jobs it waits for are past their time limits), '-' when not planned."""
    if estimated_start is None:
        return "-"
    return f"in {format_duration(estimated_start - now)}" if estimated_start - now >= 0.5 else "now"


def _number(value: float) -> str:
    """1 decimal at most: '10,000', '0.3', '5,000.5'."""
    return f"{value:,.1f}".removesuffix(".0")


def priority_text(job: JobView) -> list[str]:
    """A pending job's priority score as `sprio` explains it: each factor's value times its weight,
    and their sum, which the queue is ordered by (no lines for a job without factors)."""
    factors = job.priority_factors
    if not factors:
        return []
    cells = [(f.name.replace("_", " "), f"{f.value:.3f}", _number(f.weight), _number(f.contribution))
             for f in factors]
    widths = [max(len(row[i]) for row in cells) for i in range(4)]
    lines = [f"  score     {_number(job.priority_score or 0.0)}, the sum of each factor's value x weight (the queue "
             "goes highest first)"]
    lines += [f"              {name.ljust(widths[0])}  {value} x {weight.rjust(widths[2])} = {part.rjust(widths[3])}"
              for name, value, weight, part in cells]
    return lines


def _reason(job: JobView) -> str:
    """The job's reason, or for a running job: that it is hung, that its GPUs all read 0 % (and how
    long), or which rank the others wait for."""
    hung = _hung(job)
    return (job.reason or (hung.sentence if hung else "") or idle_note(job.idle_since, time.time())
            or (job.progress.straggler if job.progress else ""))


def _hung(job: JobView) -> HangView | None:
    return job.progress.hung if job.progress else None


HEAT = " ▁▂▃▄▅▆▇█"


def wait_heatmap(progress: ProgressView, most_ranks: int = 32) -> list[str]:
    """Per rank, a cell per interval of the share of time spent waiting in collectives (█ all of it,
    blank none, · nothing reported), oldest on the left; the ranks beyond `most_ranks` summed up."""
    wait = progress.wait
    width = max(len(str(rank)) for rank in wait)
    lines = [f"rank {rank:>{width}} |" + "".join("·" if cell is None else HEAT[round(cell * (len(HEAT) - 1))]
                                                  for cell in cells) + "|"
             for rank, cells in list(wait.items())[:most_ranks]]
    if len(wait) > most_ranks:
        lines.append(f"... and {len(wait) - most_ranks} more ranks (`gpudeck show --json` has them all)")
    return lines


def users_table(users: list[dict[str, Any]]) -> str:
    if not users:
        return "no users yet: the join token's holder is the only one (add one with `gpudeck user add NAME`)"
    rows = [[u["name"], "admin" if u["admin"] else "user", "-" if u["max_gpus"] is None else str(u["max_gpus"]),
             time.strftime("%Y-%m-%d %H:%M", time.localtime(u["created_at"]))] for u in users]
    return table(["NAME", "ROLE", "MAX GPUS", "ADDED"], rows)


def how_it_ended(job_id: int | str, state: str, reason: str) -> str:
    """The closing line of a followed log: 'job 4 succeeded', 'job 4 failed: rank 1 exited with code 3',
    'job 4 was cancelled (cancelled by a user)'."""
    reason = visible(reason)
    if state == "failed":
        return f"job {job_id} failed" + (f": {reason}" if reason else "")
    if state == "cancelled":
        return f"job {job_id} was cancelled" + (f" ({reason})" if reason else "")
    return f"job {job_id} {state}"


def _value(value: Any, unit: str = "", scale: float = 1.0) -> str:
    return "n/a" if value is None else f"{value / scale:.0f}{unit}"


def nodes_table(data: dict[str, Any]) -> str:
    """`gpudeck nodes`: each node (a `NodeView` as `--json` has it) with a row per GPU, then the
    machines seen on the network that have not joined."""
    from gpudeck.protocol.views import NodeView

    nodes = [NodeView.from_json(node) for node in visible_data(data["nodes"])]
    unjoined = visible_data(data["unjoined"])
    lines = []
    if not nodes:
        lines.append("no nodes have joined: start `gpudeck agent` on each machine")
    for node in nodes:
        sim = " SIM" if node.simulated else ""
        sim += " draining" if node.draining else ""
        lines.append(f"{node.name}  {node.state}{sim}  {node.address}  {counted(len(node.gpus), 'GPU')}  "
                     f"jobs: {','.join(map(str, node.jobs)) or '-'}  heartbeat {node.last_heartbeat_age}s ago")
        rows = []
        for gpu in node.gpus:
            foreign = [p for p in gpu.processes if p.foreign]
            memory = f"{_value(gpu.memory_used, '', GIB)}/{_value(gpu.memory_total, ' GiB', GIB)}"
            rows.append([f"  {gpu.index}", ("SIM " if node.simulated else "") + gpu.name,
                         _value(gpu.utilization, "%"), memory, _value(gpu.temperature, "C"),
                         _value(gpu.power, "W"),
                         ", ".join(f"{p.name} pid {p.pid}" for p in foreign) or "-"])
        if rows:
            lines.append(table(["  GPU", "NAME", "UTIL", "MEMORY", "TEMP", "POWER", "OTHER PROCESSES"], rows))
        lines += [f"  GPU {c.gpu} is cordoned (no new jobs) since "
                  f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(c.since))}: {c.cause}"
                  for c in node.cordoned]
    if unjoined:
        lines.append("\nseen on the network but not joined:")
        lines += [f"  {u['name']} at {u['address']} ({counted(u['gpus'], 'GPU')}): {u['why']}" for u in unjoined]
    return "\n".join(lines)


def foreign_processes(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every process on a GPU that belongs to no gpudeck job, longest held first (`nodes --foreign`,
    whose `--json` prints these records)."""
    from gpudeck.protocol.views import NodeView

    held = [{"node": node.name, "gpu": gpu.index, "uuid": gpu.uuid, "pid": p.pid, "name": p.name,
             "memory_used": p.memory_used, "since": p.since}
            for node in map(NodeView.from_json, nodes) for gpu in node.gpus for p in gpu.processes if p.foreign]
    return sorted(held, key=lambda p: (p["since"] is None, p["since"] or 0, p["node"], p["gpu"]))


def foreign_table(held: list[dict[str, Any]], now: float) -> str:
    if not held:
        return "no process outside gpudeck holds a GPU"
    rows = [[p["node"], str(p["gpu"]), str(p["pid"]), p["name"] or "?", _value(p["memory_used"], " MiB", 2**20),
             spoken_duration(now - p["since"]) if p["since"] is not None else "?"] for p in visible_data(held)]
    return table(["NODE", "GPU", "PID", "PROCESS", "MEMORY", "HELD FOR"], rows) + (
        "\n(held for: since the node's agent first saw it there)")


def job_detail(data: dict[str, Any]) -> str:
    """`gpudeck show`: a job (a `JobView` as `--json` has it) in detail."""
    from gpudeck.protocol.views import JobView

    job = JobView.from_json(visible_data(data))
    label = job_label(job.id, job.array_job, job.array_index)
    lines = [f"job {label} {job.name}: {job.state}" + (f" ({_reason(job)})" if _reason(job) else ""),
             f"  owner     {job.owner or '-'}",
             f"  command   {' '.join(job.command)}",
             f"  asked     {_request(job)}, priority {job.priority}, restarts "
             f"{job.restarts}/{job.max_restarts}",
             f"  attempt   {job.attempt}, runtime {_runtime(job)}, exit code "
             f"{'-' if job.exit_code is None else job.exit_code}", *_order_text(job)]
    if job.state == "pending":
        start = job.estimated_start
        lines.append("  starts    " + (f"{starts_text(start, time.time())}, at "
                                       f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(start))} (planned from the "
                                       "time limits of the jobs it waits for)" if start is not None else
                                       "not planned: only the next job in line that cannot start gets a planned start"))
        lines += priority_text(job)
    for place in job.placement:
        held = (f"GPU{'s' if len(place.gpus) > 1 else ''} {','.join(map(str, place.gpus))}" if place.gpus
                else "no GPU")
        lines.append(f"  node {place.node_rank}    {place.node} {held}")
    traffic = job.traffic.by_kind
    if traffic:
        lines.append("  traffic   " + ", ".join(f"{kind} {moved:,} B" for kind, moved in traffic.items()))
    kept = outputs_text(job)
    if kept:
        lines.append(f"  outputs   {kept}")
    lines += _progress_text(job)
    return "\n".join(lines)


def _progress_text(job: JobView) -> list[str]:
    progress = job.progress
    if not progress:
        return []
    lines = []
    if progress.hung:
        kill = (f"; it is cancelled once hung for {format_duration(job.hang_timeout)}" if job.hang_timeout
                else "; it is left running (submit --hang-timeout cancels a hung job)")
        lines.append(f"  HUNG      {progress.hung.sentence}{kill}")
    if progress.straggler:
        lines.append(f"  straggler {progress.straggler}")
    minutes = len(next(iter(progress.wait.values()), [])) * progress.bucket_seconds / 60
    lines.append(f"  waiting in collectives, the last {minutes:g} minutes ({progress.bucket_seconds:g} s a cell):")
    lines += [f"    {line}" for line in wait_heatmap(progress)]
    return lines


def _order_text(job: JobView) -> list[str]:
    """The array a job is a task of and the jobs it runs after, as lines of its detail."""
    lines = []
    if job.array_job is not None:
        lines.append(f"  array     task {job.array_index} of array {job.array_job} (--array {job.array})")
    if job.after:
        lines.append(f"  after     {', '.join(job.after)} succeeded (--after)")
    if job.after_any:
        lines.append(f"  after     {', '.join(job.after_any)} ended, however they ended (--after-any)")
    return lines


USAGE_JOBS_SHOWN = 20  # jobs `gpudeck usage` lists (--json: up to MAX_USAGE_JOBS)


def energy_text(joules: float | None, simulated: bool) -> str:
    """Energy in watt-hours or kilowatt-hours ('n/a' where the GPUs report none), marked SIM when
    any of it comes from simulated GPUs."""
    if joules is None:
        return "n/a"
    watt_hours = joules / 3600
    shown = f"{watt_hours / 1000:.1f} kWh" if watt_hours >= 1000 else f"{watt_hours:.1f} Wh"
    return f"{shown} SIM" if simulated else shown


def _wait(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(seconds)


def gpu_hours_text(hours: float) -> str:
    """GPU-hours to two decimals; a little that would print as 0.00 reads <0.01."""
    return "<0.01" if 0 < hours < 0.005 else f"{hours:.2f}"


def usage_report(data: dict[str, Any]) -> str:
    """`gpudeck usage` (a `UsageView` as `--json` has it): the totals in a sentence, a row per user,
    then the jobs that held the most."""
    from gpudeck.protocol.views import UsageView

    usage = UsageView.from_json(visible_data(data))
    since = ("since " + time.strftime("%Y-%m-%d %H:%M", time.localtime(usage.since))
             if usage.since is not None else "ever")
    if not usage.jobs:
        whose = f" of {usage.user or '-'}'s" if usage.user is not None else ""
        return f"nothing to count: no job{whose} held GPUs {since}"
    energy = energy_text(usage.energy_j, usage.energy_simulated)
    whose = f"{usage.user or '-'}: " if usage.user is not None else ""
    headline = (f"{whose}{gpu_hours_text(usage.gpu_hours)} GPU-hours in {counted(usage.jobs, 'job')} {since}, "
                f"mean wait {_wait(usage.mean_wait_s)}, energy {energy}"
                + (" (SIM: counted from simulated GPUs, not measured)" if usage.energy_simulated else ""))
    return "\n".join([headline, "", _usage_users(usage.users), "", _usage_jobs(usage)])


def _usage_users(users: list[UserUsage]) -> str:
    return table(["USER", "GPU-HOURS", "SHARE", "JOBS", "MEAN WAIT", "ENERGY"], [
        [u.user or "-", gpu_hours_text(u.gpu_hours), f"{u.share:.0%}", str(u.jobs),
         _wait(u.mean_wait_s), energy_text(u.energy_j, u.energy_simulated)] for u in users])


def _usage_jobs(usage: UsageView) -> str:
    """The jobs that held the most, and a line saying how many more there are."""
    jobs = usage.by_job[:USAGE_JOBS_SHOWN]
    text = table(["JOB", "NAME", "OWNER", "STATE", "GPUS", "GPU-HOURS", "WAIT", "ENERGY"], [
        [str(j.id), j.name, j.owner or "-", j.state, str(j.gpus), gpu_hours_text(j.gpu_hours),
         _wait(j.wait_s), energy_text(j.energy_j, j.energy_simulated)] for j in jobs])
    more = usage.jobs - len(jobs)
    if more:
        text += (f"\n... and {counted(more, 'more job')} that held less: `gpudeck usage --json` lists the "
                 f"{len(usage.by_job)} that held the most")
    return text


def outputs_text(job: JobView, most: int = 5) -> str:
    """The outputs a job's nodes keep, in one line, with how to fetch them ("" when none)."""
    files = [(node, f) for node, kept in sorted(job.outputs.items()) for f in kept]
    if not files:
        return ""
    named = ", ".join(f"{visible(f.path)} ({human_bytes(f.size)}, {visible(node)})" for node, f in files[:most])
    more = f" and {len(files) - most} more" if len(files) > most else ""
    return f"{named}{more}: fetch with `gpudeck outputs {job.id}`"


class LogPrinter:
    """Prints whole lines of several ranks' streams, each prefixed with where it came from."""

    def __init__(self, out: TextIO, include_launcher: bool, raw: bool = False) -> None:
        self.out = out
        self.include_launcher = include_launcher
        self.raw = raw  # pass the job's bytes as they are, escape sequences and all (`logs --raw`)

    @staticmethod
    def label(rank: int) -> str:
        return f"[rank {rank}]" if rank >= 0 else f"[node {-rank - 1}]"

    def write(self, lines: list[tuple[int, bytes]]) -> None:
        for rank, line in lines:
            if rank < 0 and not self.include_launcher:
                continue
            text = line.decode(errors="replace")
            self.out.write(f"{self.label(rank)} {text if self.raw else safe_output(text)}\n")
        self.out.flush()
