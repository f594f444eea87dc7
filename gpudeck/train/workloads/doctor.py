"""gpudeck doctor's check: one rank on each node, no GPU (see :mod:`gpudeck.doctor` for the report).

The ranks meet on a TCPStore at the job's rendezvous (node rank 0, on a job port), the way every job
starts. Rank 0 does not wait for all of them like ``init_process_group`` would: a node that cannot
reach the rendezvous is the finding, so after ``--timeout`` rank 0 goes on with those that came. Then:

1. every rank listens on a job port, and tries every other node's: the interface the kernel picks
   toward it, and whether the job ports answer there;
2. every pair of nodes times a gloo all-reduce, in rounds of disjoint pairs (the circle method, so
   no node is in two pairs at once and n nodes take n-1 rounds), each pair on a group of its own
   built on a PrefixStore of the one store;
3. all nodes reached time one all-reduce together.

Each timing is the fastest of ``--reps`` all-reduces after ``WARM_UP`` untimed ones (the first connects), so a
busy CPU does not pass for a slow link. Gloo's data connections use ports the kernel picks, outside
the job range: a firewall that opens only the job ports lets the rendezvous through and stops the
all-reduce, which then shows as a broken link. Rank 0 writes the report to ``$GPUDECK_OUTPUT_DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from gpudeck import doctor
from gpudeck.netif import interface_towards, local_address_towards

NAME = "doctor"
PROBE_TIMEOUT = 3.0  # seconds to connect to a peer's job port


def main(argv: list[str]) -> int:
    try:
        options = doctor.check_args(argv)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    master, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    timeout = timedelta(seconds=options.timeout)
    try:
        store = dist.TCPStore(master, port, None, rank == 0, timeout, wait_for_workers=False)
    except (RuntimeError, OSError) as exc:  # rank 0 reports this node as not reached
        print(f"gpudeck doctor: could not reach the check's rendezvous at {master}:{port} ({exc})")
        return 0
    probe = Probe(_job_ports(options.job_ports), exclude=port)
    store.set(f"hello/{rank}", json.dumps(_hello(rank, master, probe.port)))
    present = _gather_present(store, rank, world, options.timeout)
    if rank not in present:
        return 0
    hellos = {r: json.loads(store.get(f"hello/{r}")) for r in present}
    mine: dict[str, Any] = {"routes": [_route(hellos[rank]["node"], hellos[r]) for r in present if r != rank]}
    _barrier(store, "routes", len(present), (len(present) + 2) * PROBE_TIMEOUT + options.timeout)
    probe.close()
    mine["pairs"] = _pairs(store, rank, present, hellos, options)
    if len(present) > 2:
        mine["all"] = _timed(store, "all", present, rank, hellos, options)
    store.set(f"result/{rank}", json.dumps(mine))
    if rank == 0:
        _report(store, options, present, hellos)
    return 0


def _job_ports(text: str) -> range:
    first, _, last = text.partition("-")
    return range(int(first), int(last) + 1)


def _hello(rank: int, master: str, probe_port: int) -> dict[str, Any]:
    seen = os.environ.get("GPUDECK_MDNS_SEEN")
    address = master if rank == 0 else local_address_towards(master)
    return {"node": os.environ.get("GPUDECK_NODE", f"rank {rank}"), "address": address, "probe_port": probe_port,
            "mdns": json.loads(seen) if seen else None}


def _gather_present(store: dist.Store, rank: int, world: int, timeout: float) -> list[int]:
    """Rank 0 waits up to `timeout` for every rank's hello and says who came; the others learn it."""
    if rank == 0:
        deadline = time.monotonic() + timeout
        present = [0]
        for other in range(1, world):
            try:
                store.wait([f"hello/{other}"], timedelta(seconds=max(0.001, deadline - time.monotonic())))
                present.append(other)
            except RuntimeError:  # a DistStoreError: it did not come in time
                pass
        store.set("present", json.dumps(present))
        return present
    try:
        store.wait(["present"], timedelta(seconds=2 * timeout))
    except RuntimeError:
        return []
    return json.loads(store.get("present"))


class Probe:
    """A listener on a free job port that accepts and closes, so that peers can test they reach it."""

    def __init__(self, ports: range, exclude: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        candidates = [p for p in ports if p != exclude]
        random.shuffle(candidates)
        self.port = 0
        for candidate in candidates[:64]:
            try:
                self.sock.bind(("", candidate))
            except OSError:
                continue
            self.port = candidate
            break
        self.sock.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.close()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept, so the port is free at once
        except OSError:
            pass
        self.sock.close()


def _route(source: str, target: dict[str, Any]) -> dict[str, Any]:
    """Toward one peer: the interface and source address used, and whether its job port answers."""
    address = target["address"]
    try:
        local = local_address_towards(address)
    except OSError as exc:
        local = f"no route ({exc.strerror or exc})"
    error = None
    if not target["probe_port"]:
        error = "it found no free job port to listen on"
    else:
        try:
            socket.create_connection((address, target["probe_port"]), timeout=PROBE_TIMEOUT).close()
        except OSError as exc:
            error = "no answer in 3 s" if isinstance(exc, socket.timeout) else (exc.strerror or str(exc))
    return {"source": source, "target": target["node"], "interface": interface_towards(address), "address": local,
            "ports_reachable": error is None, "port": target["probe_port"], "error": error}


def _barrier(store: dist.Store, name: str, count: int, wait: float) -> None:
    """Wait until `count` ranks reached `name`, or `wait` seconds passed (a dead peer must not hang
    the check); the last to come says so with one key, so nobody polls rank 0's store."""
    if store.add(f"barrier/{name}", 1) >= count:
        store.set(f"barrier/{name}/all", "1")
        return
    try:
        store.wait([f"barrier/{name}/all"], timedelta(seconds=wait))
    except RuntimeError:  # a DistStoreError: someone never came; go on with what there is
        pass


def rounds(ranks: list[int]) -> list[list[tuple[int, int]]]:
    """Every pair once, in rounds of disjoint pairs (the circle method; an odd count sits one out)."""
    seats: list[int | None] = [*ranks, None] if len(ranks) % 2 else list(ranks)
    result = []
    for _ in range(len(seats) - 1):
        half = len(seats) // 2
        pairs = [(seats[i], seats[-1 - i]) for i in range(half)]
        result.append([(min(a, b), max(a, b)) for a, b in pairs if a is not None and b is not None])
        seats = [seats[0], seats[-1], *seats[1:-1]]
    return result


def _pairs(store: dist.Store, rank: int, present: list[int], hellos: dict[int, Any],
           options: argparse.Namespace) -> list[dict[str, Any]]:
    measured = []
    for number, pairs in enumerate(rounds(present)):
        pair = next((p for p in pairs if rank in p), None)
        if pair is not None:
            measured.append(_timed(store, f"pair/{pair[0]}-{pair[1]}", list(pair), rank, hellos, options))
        _barrier(store, f"round/{number}", len(present), doctor.step_wait(options.timeout, options.reps))
    return measured


def _timed(store: dist.Store, label: str, members: list[int], rank: int, hellos: dict[int, Any],
           options: argparse.Namespace) -> dict[str, Any]:
    """Time an all-reduce among `members` on a group of their own."""
    names = [hellos[r]["node"] for r in members]
    try:
        group = dist.ProcessGroupGloo(dist.PrefixStore(label, store), members.index(rank), len(members),
                                      timedelta(seconds=options.timeout))
        tensor = torch.ones(options.bytes // 4, dtype=torch.float32)
        for _ in range(doctor.WARM_UP):
            group.allreduce([tensor]).wait()  # type: ignore[attr-defined]  # torch's stubs lack Backend.allreduce
        fastest = float("inf")
        for _ in range(options.reps):
            start = time.perf_counter()
            group.allreduce([tensor]).wait()  # type: ignore[attr-defined]  # torch's stubs lack Backend.allreduce
            fastest = min(fastest, time.perf_counter() - start)
    except RuntimeError as exc:
        return {"nodes": names, "error": str(exc).splitlines()[0][:300]}
    size = tensor.numel() * 4
    return {"nodes": names, "seconds": fastest, "busbw": doctor.bus_bandwidth(size, fastest, len(members))}


def _report(store: dist.Store, options: argparse.Namespace, present: list[int], hellos: dict[int, Any]) -> None:
    """Gather every rank's findings into the report, print it, and leave it for the command line."""
    results, late = {}, []
    for r in present:
        try:
            store.wait([f"result/{r}"], timedelta(seconds=2 * options.timeout))
            results[r] = json.loads(store.get(f"result/{r}"))
        except RuntimeError:
            results[r] = {"routes": [], "pairs": []}
            late.append(hellos[r]["node"])
    names = options.nodes.split(",")
    nodes = [doctor.NodeSeen(name=name, address=hellos[r]["address"] if r in hellos else "", reached=r in hellos,
                             mdns=hellos[r]["mdns"] if r in hellos else None) for r, name in enumerate(names)]
    routes = [doctor.Route(**route) for r in present for route in results[r]["routes"]]
    pairs = [doctor.AllReduce(**pair) for r in present for pair in results[r]["pairs"]
             if pair["nodes"][0] == hellos[r]["node"]]
    everyone = results[0].get("all")
    found = doctor.report(nodes, routes, pairs, doctor.AllReduce(**everyone) if everyone else None,
                          options.bytes // 4 * 4, options.job_ports, late)
    print(doctor.table(found))
    out = os.environ.get("GPUDECK_OUTPUT_DIR")
    if out:
        with open(os.path.join(out, doctor.REPORT_FILE), "w") as file:
            json.dump(found.to_json(), file, indent=2)
