"""Human-readable output of the CLI: tables, a job's detail, and per-rank log lines."""

from __future__ import annotations

import time
from typing import Any, TextIO

from gpudeck.model import format_duration
from gpudeck.text import counted, human_bytes, safe_output, visible, visible_data

GIB = 1 << 30


def table(headers: list[str], rows: list[list[str]]) -> str:
    rows = [[visible(cell) for cell in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [headers, *rows]]
    return "\n".join(lines)


def _runtime(job: dict[str, Any]) -> str:
    if not job["started_at"]:
        return "-"
    end = job["ended_at"] or time.time()
    return format_duration(end - job["started_at"])


def _request(job: dict[str, Any]) -> str:
    req = job["request"]
    return counted(req["gpus"], "GPU") if req["gpus"] is not None else f"{req['nodes']}x{req['gpus_per_node']}"


def jobs_table(jobs: list[dict[str, Any]], filtered: bool = False) -> str:
    """The jobs as a table; with none, a line that says why (`filtered`: none matched what was asked)."""
    if not jobs:
        return ("no jobs match: `gpudeck jobs --all` lists every job" if filtered
                else "no jobs yet: queue one with `gpudeck submit train.py`")
    rows = [[str(j["id"]), j["name"], j["state"], _request(j), ",".join(j["nodes"]) or "-", _runtime(j),
             str(j["attempt"]), "-" if j["exit_code"] is None else str(j["exit_code"]), j["reason"]] for j in jobs]
    return table(["ID", "NAME", "STATE", "ASKED", "NODES", "RUNTIME", "ATTEMPT", "EXIT", "REASON"], rows)


def how_it_ended(job_id: int, state: str, reason: str) -> str:
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
    nodes, unjoined = visible_data(data["nodes"]), visible_data(data["unjoined"])
    lines = []
    if not nodes:
        lines.append("no nodes have joined: start `gpudeck agent` on each machine")
    for node in nodes:
        sim = " SIM" if node["simulated"] else ""
        sim += " draining" if node.get("draining") else ""
        lines.append(f"{node['name']}  {node['state']}{sim}  {node['address']}  {counted(len(node['gpus']), 'GPU')}  "
                     f"jobs: {','.join(map(str, node['jobs'])) or '-'}  heartbeat {node['last_heartbeat_age']}s ago")
        rows = []
        for gpu in node["gpus"]:
            foreign = [p for p in gpu["processes"] or [] if p.get("foreign")]
            memory = f"{_value(gpu['memory_used'], '', GIB)}/{_value(gpu['memory_total'], ' GiB', GIB)}"
            rows.append([f"  {gpu['index']}", ("SIM " if node["simulated"] else "") + gpu["name"],
                         _value(gpu["utilization"], "%"), memory, _value(gpu["temperature"], "C"),
                         _value(gpu["power"], "W"),
                         ", ".join(f"{p['name']} pid {p['pid']}" for p in foreign) or "-"])
        if rows:
            lines.append(table(["  GPU", "NAME", "UTIL", "MEMORY", "TEMP", "POWER", "OTHER PROCESSES"], rows))
    if unjoined:
        lines.append("\nseen on the network but not joined:")
        lines += [f"  {u['name']} at {u['address']} ({counted(u['gpus'], 'GPU')}): {u['why']}" for u in unjoined]
    return "\n".join(lines)


def job_detail(job: dict[str, Any]) -> str:
    job = visible_data(job)
    lines = [f"job {job['id']} {job['name']}: {job['state']}" + (f" ({job['reason']})" if job["reason"] else ""),
             f"  command   {' '.join(job['command'])}",
             f"  asked     {_request(job)}, priority {job['priority']}, restarts {job['restarts']}/{job['max_restarts']}",
             f"  attempt   {job['attempt']}, runtime {_runtime(job)}, exit code "
             f"{'-' if job['exit_code'] is None else job['exit_code']}"]
    for place in job["placement"]:
        gpus = "GPU" if len(place["gpus"]) == 1 else "GPUs"
        lines.append(f"  node {place['node_rank']}    {place['node']} {gpus} {','.join(map(str, place['gpus']))}")
    traffic = job["traffic"]["by_kind"]
    if traffic:
        lines.append("  traffic   " + ", ".join(f"{kind} {moved:,} B" for kind, moved in traffic.items()))
    kept = outputs_text(job)
    if kept:
        lines.append(f"  outputs   {kept}")
    return "\n".join(lines)


def outputs_text(job: dict[str, Any], most: int = 5) -> str:
    """The outputs a job's nodes keep, in one line, with how to fetch them ("" when none)."""
    files = [(node, f) for node, kept in sorted(job.get("outputs", {}).items()) for f in kept]
    if not files:
        return ""
    named = ", ".join(f"{visible(f['path'])} ({human_bytes(f['size'])}, {visible(node)})" for node, f in files[:most])
    more = f" and {len(files) - most} more" if len(files) > most else ""
    return f"{named}{more}: fetch with `gpudeck outputs {job['id']}`"


class LogPrinter:
    """Prints whole lines of several ranks' streams, each prefixed with where it came from."""

    def __init__(self, out: TextIO, include_launcher: bool, raw: bool = False) -> None:
        self.out = out
        self.include_launcher = include_launcher
        self.raw = raw  # pass the job's bytes as they are, escape sequences and all (`logs --raw`)
        self._partial: dict[int, bytes] = {}

    @staticmethod
    def label(rank: int) -> str:
        return f"[rank {rank}]" if rank >= 0 else f"[node {-rank - 1}]"

    def feed(self, rank: int, data: bytes) -> None:
        buffered = self._partial.get(rank, b"") + data
        *lines, rest = buffered.split(b"\n")
        self._partial[rank] = rest
        for line in lines:
            self._emit(rank, line)

    def _emit(self, rank: int, line: bytes) -> None:
        if rank < 0 and not self.include_launcher:
            return
        text = line.decode(errors="replace")
        self.out.write(f"{self.label(rank)} {text if self.raw else safe_output(text)}\n")

    def flush(self) -> None:
        for rank, rest in sorted(self._partial.items()):
            if rest:
                self._emit(rank, rest)
        self._partial.clear()
        self.out.flush()
