"""What `gpudeck doctor` found, and what it means: the report its check writes, the verdict, the table.

The check itself runs as a job (`gpudeck.train.workloads.doctor`, one rank per node, no GPU), so it
uses the launch path and the ports real jobs use. Its rank 0 gathers what every rank measured and
calls `report` here; the command line prints `table` of it (or the report as JSON). Nothing here
imports torch: the coordinator's host and the CLI read reports too.

Bus bandwidth follows nccl-tests: an all-reduce of S bytes over n ranks that takes t seconds has an
algorithm bandwidth S/t and a bus bandwidth S/t x 2(n-1)/n, the bytes each link carries, so that
pairs and the whole cluster compare on one scale. A pair is slow below SLOW of the best pair; the
best is the yardstick because the nodes of a lab are usually cabled alike, and a link far below its
siblings is the one to look at.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn

SLOW = 0.5  # a pair below this share of the best pair's bus bandwidth is named slow
REPORT_FILE = "doctor.json"  # what rank 0 leaves in $GPUDECK_OUTPUT_DIR for the command line
MAX_SIZE = 256 << 20  # bytes in one all-reduce: every node holds two such buffers
MAX_REPS = 20
MAX_TIMEOUT = 60.0  # seconds the check waits for a node at each step
WARM_UP = 2  # untimed all-reduces before the timed ones: the first connects, the first few touch fresh memory


class _Refusal(Exception):
    pass


class _ArgsParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _Refusal(message)


def check_args(argv: list[str]) -> argparse.Namespace:
    """The check's options (what the command line and the coordinator put on its command line);
    ValueError with the reason when they are not ones it takes, or not within its bounds (a check
    must cost the nodes seconds, not hours)."""
    parser = _ArgsParser(prog="gpudeck doctor's check", add_help=False)
    parser.add_argument("--nodes", required=True)  # the nodes in node-rank order, comma-separated
    parser.add_argument("--job-ports", required=True)  # the cluster's job ports, FIRST-LAST
    parser.add_argument("--bytes", type=int, default=4 << 20)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=10.0)
    try:
        options = parser.parse_args(argv)
    except _Refusal as refusal:
        raise ValueError(f"gpudeck doctor's check: {refusal}") from None
    if not (4 <= options.bytes <= MAX_SIZE and 1 <= options.reps <= MAX_REPS and 0 < options.timeout <= MAX_TIMEOUT):
        raise ValueError(f"gpudeck doctor's check takes --bytes 4 to {MAX_SIZE}, --reps 1 to {MAX_REPS} and "
                         f"--timeout up to {MAX_TIMEOUT:g} seconds")
    return options


def check_args_problem(argv: list[str]) -> str | None:
    """Why `argv` are not the check's options, or None. The coordinator adds --nodes and
    --job-ports (after what the client sent, so its own count), so they may be missing here."""
    try:
        check_args([*argv, "--nodes", "-", "--job-ports", "0-0"])
    except ValueError as exc:
        return str(exc)
    return None


def step_wait(timeout: float, reps: int) -> float:
    """The longest one step of the check may take when every wait in it runs to `timeout`: a pair's
    group is set up, warmed up and timed, each part allowed `timeout`."""
    return timeout * (2 + WARM_UP + reps)


def bus_bandwidth(size: int, seconds: float, ranks: int) -> float:
    """Bytes per second each link carries in an all-reduce of `size` bytes (nccl-tests' busbw)."""
    return size / seconds * 2 * (ranks - 1) / ranks


@dataclass
class NodeSeen:
    """One node as the check saw it: whether its rank reached the rendezvous, what it sees over mDNS."""

    name: str
    address: str = ""
    reached: bool = True
    error: str | None = None
    mdns: dict[str, list[str]] | None = None  # node names by role; None: mDNS is off on that node


@dataclass
class Route:
    """From one node toward another: the interface used and whether the job ports answer there."""

    source: str
    target: str
    interface: str | None
    address: str  # the source address the kernel picks toward the target
    ports_reachable: bool
    port: int
    error: str | None = None


@dataclass
class AllReduce:
    """One timed all-reduce among `nodes`: a pair, or every node reached."""

    nodes: list[str]
    busbw: float | None = None  # bytes per second
    seconds: float | None = None  # per all-reduce
    error: str | None = None
    vs_best: float | None = None  # busbw over the best pair's


@dataclass
class Report:
    nodes: list[NodeSeen]
    paths: list[Route]
    pairs: list[AllReduce]
    everyone: AllReduce | None
    size: int
    job_ports: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    late: list[str] = field(default_factory=list)  # nodes whose findings did not reach rank 0 in time

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["all"] = data.pop("everyone")
        data["ok"] = not self.problems
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Report":
        everyone = data.get("all")
        return cls(nodes=[NodeSeen(**n) for n in data["nodes"]], paths=[Route(**p) for p in data["paths"]],
                   pairs=[AllReduce(**p) for p in data["pairs"]], everyone=AllReduce(**everyone) if everyone else None,
                   size=data["size"], job_ports=data["job_ports"], problems=data["problems"], warnings=data["warnings"],
                   late=data.get("late", []))


def report(nodes: list[NodeSeen], paths: list[Route], pairs: list[AllReduce], everyone: AllReduce | None,
           size: int, job_ports: str, late: list[str] | None = None) -> Report:
    """The report with each all-reduce set against the best pair, and the verdict. `late`: nodes
    that took part but whose findings (their routes, the pairs they timed) never came."""
    pairs = sorted(pairs, key=lambda p: p.nodes)
    best = max((p.busbw for p in pairs if p.busbw), default=None)
    for measured in [*pairs, *([everyone] if everyone else [])]:
        measured.vs_best = measured.busbw / best if best and measured.busbw else None
    result = Report(nodes, paths, pairs, everyone, size, job_ports, late=list(late or []))
    result.problems = [*_unreached(nodes), *_blocked(paths), *_links(pairs, best),
                       *(f"{name}'s findings never reached {nodes[0].name}: its routes and some pairs are not in "
                         "this report (its rank stopped, or its node was too slow)" for name in result.late)]
    result.warnings = _unseen(nodes)
    return result


def _unreached(nodes: list[NodeSeen]) -> list[str]:
    first = nodes[0]
    return [f"{n.name} did not reach the check's rendezvous on {first.name} ({first.address}): "
            f"{n.error or 'it never answered'}" for n in nodes if not n.reached]


def _blocked(paths: list[Route]) -> list[str]:
    return [f"{p.source} cannot reach {p.target} on the job ports ({p.target}:{p.port} via "
            f"{p.interface or 'no known interface'}: {p.error or 'no answer'}); jobs across them will hang "
            "in their rendezvous" for p in paths if not p.ports_reachable]


def _links(pairs: list[AllReduce], best: float | None) -> list[str]:
    broken = [f"the link {' ↔ '.join(p.nodes)} is broken: its all-reduce failed ({p.error})"
              for p in pairs if p.error]
    slow = [p for p in pairs if p.vs_best is not None and p.vs_best < SLOW]
    top = next((p for p in pairs if p.busbw == best), None)
    named = [f"the link {' ↔ '.join(p.nodes)} is slow: {gbps(p.busbw)}, {p.vs_best:.2f}× the best pair "
             f"({' ↔ '.join(top.nodes)}, {gbps(best)})" for p in slow if top is not None and best is not None]
    return broken + named + _common_node(slow, pairs)


def _common_node(slow: list[AllReduce], pairs: list[AllReduce]) -> list[str]:
    """Name the node every slow link shares, when all of its links are slow: look there first."""
    if len(slow) < 2:
        return []
    shared = set(slow[0].nodes).intersection(*(p.nodes for p in slow[1:]))
    return [f"every link of {name} is slow: look at {name}'s network first (cable, port speed, MTU)"
            for name in sorted(shared) if all(p in slow for p in pairs if name in p.nodes)]


def _unseen(nodes: list[NodeSeen]) -> list[str]:
    """Who does not see whose mDNS advert: agents that see no coordinator need --coordinator."""
    names = [n.name for n in nodes if n.reached]
    notes = []
    for node in nodes:
        if not node.reached:
            continue
        if node.mdns is None:
            notes.append(f"{node.name} runs without mDNS, so it finds the coordinator only by its address")
            continue
        missing = [name for name in names if name != node.name and name not in node.mdns.get("agent", [])]
        if missing:
            notes.append(f"{node.name} does not see the mDNS adverts of {', '.join(missing)} (multicast does not "
                         "pass between them: a different subnet or a switch that filters it)")
        if not node.mdns.get("coordinator"):
            notes.append(f"{node.name} sees no coordinator's mDNS advert: start its agent with --coordinator HOST:PORT")
    return notes


def gbps(rate: float | None) -> str:
    """Bytes per second as GB/s, the unit nccl-tests prints."""
    return "-" if rate is None else f"{rate / 1e9:.3g} GB/s"


def table(result: Report) -> str:
    """The report for a person: paths, then the all-reduces, then the verdict."""
    lines = [f"{'FROM':<16} {'TO':<16} {'INTERFACE':<12} {'SOURCE ADDRESS':<16} JOB PORTS ({result.job_ports})"]
    lines += [f"{p.source:<16} {p.target:<16} {p.interface or '?':<12} {p.address:<16} "
              f"{'reachable' if p.ports_reachable else 'BLOCKED: ' + (p.error or 'no answer')}" for p in result.paths]
    lines += ["", f"{'ALL-REDUCE OF ' + _size(result.size):<34} {'BUS BANDWIDTH':>14} {'VS BEST PAIR':>13}"]
    for measured in [*result.pairs, *([result.everyone] if result.everyone else [])]:
        label = " ↔ ".join(measured.nodes) if len(measured.nodes) == 2 else f"all {len(measured.nodes)} nodes"
        shown = f"failed: {measured.error}" if measured.error else gbps(measured.busbw)
        ratio = f"{measured.vs_best:.2f}×" if measured.vs_best is not None else ""
        lines.append(f"{label:<34} {shown:>14} {ratio:>13}")
    unreached = [n.name for n in result.nodes if not n.reached]
    if unreached:
        lines.append(f"(not measured: {', '.join(unreached)}, which did not reach the rendezvous)")
    lines.append("")
    lines += [f"problem: {text}" for text in result.problems] + [f"note: {text}" for text in result.warnings]
    if not result.problems:
        lines.append(f"no problems found on {len(result.nodes)} node{'s' if len(result.nodes) != 1 else ''}")
    return "\n".join(lines)


def _size(size: int) -> str:
    return f"{size / 2**20:g} MiB" if size >= 2**20 else f"{size / 2**10:g} KiB"


def chosen_nodes(nodes: list[dict[str, Any]], asked: list[str] | None) -> list[str]:
    """The nodes to check, by name: those asked for, or every node that is up and not draining;
    ValueError with the reason when one asked for cannot take the check."""
    by_name = {node["name"]: node for node in nodes}
    if not asked:
        names = sorted(name for name, node in by_name.items() if node["state"] == "up" and not node["draining"])
        if not names:
            raise ValueError("no node is up and taking jobs, so there is nothing to check (gpudeck nodes says why)")
        return names
    for name in asked:
        node = by_name.get(name)
        if node is None:
            raise ValueError(f"there is no node {name!r} in this cluster (gpudeck nodes lists them)")
        if node["state"] != "up":
            raise ValueError(f"{name} is {node['state']}: the check needs its agent connected")
        if node["draining"]:
            raise ValueError(f"{name} is draining: `gpudeck drain {name} --off` lets the check (and jobs) on it")
    return sorted(set(asked))
