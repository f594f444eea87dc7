"""The orders that start and stop attempts on nodes: launches (with their rendezvous port), launches
sent again to a reconnected agent, kills.

Every launch is stored (`Store.start_attempt`) before it is sent, so that a coordinator restarted
between the two sends it again (`send_launch`) instead of losing it.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from typing import Callable

from gpudeck.coordinator.registry import Registry
from gpudeck.coordinator.scheduler import Placement
from gpudeck.coordinator.store import JobRow, Store
from gpudeck.protocol.messages import Message
from gpudeck.protocol.node_messages import Kill, Launch

log = logging.getLogger(__name__)
Send = Callable[[str, Message], bool]  # queues the message for a node; never waits on it


def _launch_order(row: JobRow, attempt: int, node_rank: int, shape: list[int], gpus: list[int], master_addr: str,
                  master_port: int, script: bytes, preempt_grace: float) -> Launch:
    """`shape`: how many GPUs each node holds, in node-rank order; ranks go node by node, one per GPU
    (and one on a node given none: gpudeck doctor's check)."""
    ranks = [max(1, gpus_held) for gpus_held in shape]
    return Launch(job=row.id, attempt=attempt, node_rank=node_rank, nnodes=len(shape), gpus=gpus,
                  first_rank=sum(ranks[:node_rank]), world_size=sum(ranks),
                  master_addr=master_addr, master_port=master_port,
                  run=dataclasses.replace(row.spec.run, script=script),
                  array_job=row.array_job, array_index=row.array_index, owner=row.owner,
                  preempt_grace=preempt_grace if row.spec.preemptible else 0.0)


class Launcher:
    def __init__(self, store: Store, registry: Registry, send: Send, clock: Callable[[], float],
                 job_ports: tuple[int, int], preempt_grace: float) -> None:
        self.store = store
        self.registry = registry
        self.send = send
        self.clock = clock
        self.job_ports = job_ports
        self.preempt_grace = preempt_grace

    def _free_port(self, master_addr: str) -> int | None:
        """A rendezvous port no attempt of ours uses on that address, picked at random so that other
        programs there (another cluster's jobs, a torchrun started by hand on 29500) rarely hold it."""
        used = self.store.open_master_ports(master_addr)
        first, last = self.job_ports
        free = [port for port in range(first, last + 1) if port not in used]
        return random.choice(free) if free else None

    def launch(self, row: JobRow, placement: Placement) -> bool:
        """Store the attempt and send each node its launch; False (with the job's reason) when every
        rendezvous port on the first node is taken."""
        hosts = [(node, list(gpus)) for node, gpus in placement.hosts]
        master = self.registry.links[hosts[0][0]].address
        port = self._free_port(master)
        if port is None:
            first, last = self.job_ports
            self.store.set_reasons({row.id: f"every rendezvous port ({first}-{last}) on {master} is in use by "
                                            "running jobs; it starts when one ends"})
            return False
        attempt = row.attempt + 1
        self.store.start_attempt(row.id, attempt, hosts, master, port, self.clock())
        log.info("job %d attempt %d placed on %s", row.id, attempt, ", ".join(n for n, _ in hosts))
        script = self.store.script(row.id)
        for node_rank, (node, gpus) in enumerate(hosts):
            self.send(node, _launch_order(row, attempt, node_rank, [len(g) for _, g in hosts], gpus, master, port,
                                          script, self.preempt_grace))
        return True

    def send_launch(self, job_id: int, attempt: int, node: str) -> None:
        """Send a stored launch again (its agent reconnected without having started it)."""
        row = self.store.job(job_id)
        shares = self.store.attempt_nodes(job_id, attempt)
        share = next((s for s in shares if s.node == node), None)
        if row is None or share is None:
            return
        master_addr, master_port = self.store.master(job_id, attempt)
        shape = [len(s.gpus) for s in sorted(shares, key=lambda s: s.node_rank)]
        self.send(node, _launch_order(row, attempt, share.node_rank, shape, share.gpus, master_addr,
                                      master_port, self.store.script(job_id), self.preempt_grace))

    def kill_open(self, job_id: int, attempt: int, reason: str, grace: float = 0.0) -> None:
        """Stop the attempt's ranks on every node that has not reported them ended."""
        for share in self.store.attempt_nodes(job_id, attempt):
            if share.exit_code is None:
                self.send(share.node, Kill(job=job_id, attempt=attempt, reason=reason, grace=grace))
