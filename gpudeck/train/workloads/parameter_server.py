"""parameter-server: rank 0 holds the parameters and the optimizer; the other ranks are workers.

Every step each worker *pulls* the parameters from the server, computes the gradient of its shard
of the batch and *pushes* it back; the server applies the gradients with SGD and saves and loads
the checkpoints (parameters and momentum), so workers hold no state of their own.

* ``--mode sync`` (default): the server waits for every worker's gradient, averages them and takes
  one step. With W workers on shards of B/W points this equals one process on the whole batch.
* ``--mode async``: the server applies each gradient as it arrives (scaled by 1/W, so W pushes move
  the parameters as far as one synchronous step) and sends that worker the parameters as they are
  now; workers never wait for each other, at the price of gradients computed on stale parameters.

Transport: point-to-point ``send``/``recv`` of one flat tensor per direction on the job's process
group (gloo, or NCCL with the tensors on the GPU). Not ``torch.distributed.rpc``: RPC brings a
second transport (TensorPipe) with its own ports and network interface choice and, on GPUs, device
maps, while the process group already reaches every rank; and point-to-point bytes are counted
exactly on both ends. The asynchronous server receives from whichever worker is first, which only
gloo can do: on GPUs that mode sends over a gloo group of its own, through the CPU (:class:`Link`).

Traffic per worker and step: ``recv`` = the parameter bytes (pull), ``send`` = the gradient bytes
(push, the same size); the server counts the sum over workers under ``send`` and ``recv``. In
asynchronous mode the server also sends every worker one int64 (its first iteration) at start.
Plus ``all_gather`` for the checkpoint agreement.

Workers print their shard's loss, the server the evaluation loss.

    gpudeck submit --nodes 2 --gpus-per-node 1 --workload parameter-server --steps 300 [--mode async]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from gpudeck.train.workloads import options, session as sessions, task
from gpudeck.train.workloads.checkpoint import Checkpoints

NAME = "parameter-server"
SERVER = 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """This workload's options (the shared ones and its own)."""
    return options.parse(NAME, argv)


def main(argv: Sequence[str]) -> int:
    return sessions.run(parse_args(argv), train)


def train(args: argparse.Namespace, session: sessions.Session) -> None:
    if session.world < 2:
        raise SystemExit("the parameter server needs at least 2 ranks: a server and a worker")
    config = options.config(args)
    workers = session.world - 1
    if config.batch_size % workers:
        raise SystemExit(f"--batch-size {config.batch_size} must be a multiple of the {workers} workers")
    checkpoints = Checkpoints(args.checkpoint_dir, NAME, {
        "config": {k: v for k, v in vars(config).items() if k not in ("lr", "momentum")},
        "world": session.world, "mode": args.mode})
    start, states = checkpoints.restore(session, {"server": {SERVER}})
    final = args.steps * workers if args.mode == "async" else args.steps
    if start >= final:
        session.log(f"nothing to do: the checkpoint of step {start} is at or past the end ({final})")
        return
    link = make_link(args, session)
    if session.rank == SERVER:
        server = Server(args, session, link, config, checkpoints, states.get("server"))
        if start:
            session.log(f"resuming from the checkpoint of {'update' if args.mode == 'async' else 'step'} {start}")
        server.run_async(start) if args.mode == "async" else server.run_sync(start)
    else:
        Worker(args, session, link, config).run(start)


@dataclass
class Link:
    """What pulls and pushes travel on: the job's process group and device, except that the
    asynchronous mode needs receive-from-any-source, which only gloo has: on GPUs it then uses a
    gloo group of its own, with the tensors staged through the CPU."""

    group: dist.ProcessGroup | None
    device: torch.device


def make_link(args: argparse.Namespace, session: sessions.Session) -> Link:
    if args.mode == "async" and session.backend != "gloo":
        return Link(dist.new_group(backend="gloo"), torch.device("cpu"))
    return Link(None, session.device)


class Server:
    """Rank 0: the parameters, the optimizer, evaluation and checkpoints."""

    def __init__(self, args: argparse.Namespace, session: sessions.Session, link: Link, config: task.Config,
                 checkpoints: Checkpoints, state: dict | None) -> None:
        self.args, self.session, self.link, self.checkpoints = args, session, link, checkpoints
        self.data = task.Data(config, session.device)
        self.model = task.build_model(config).to(session.device)
        self.params = list(self.model.parameters())
        self.optimizer = task.make_optimizer(self.params, config)
        self.workers = list(range(1, session.world))
        self.counts = [0] * len(self.workers)  # pushes applied from each worker (async mode)
        # Async mode: the worker of every push applied, in order, and the updates at which the server
        # started again from a checkpoint (every worker then computes on the parameters as saved).
        # With the seed they determine the whole run, which can so be replayed in one process.
        self.arrivals: list[int] = []
        self.resumed_at: list[int] = []
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.counts = list(state.get("counts", self.counts))
            self.arrivals = list(state.get("arrivals", []))
            self.resumed_at = list(state.get("resumed_at", [])) + [len(self.arrivals)]
        self.timer = sessions.StepTimer(session.device)

    def flat(self) -> torch.Tensor:
        """A fresh flat copy of the parameters, which a pending send may hold on to."""
        return parameters_to_vector(self.params).detach()

    def apply(self, gradient: torch.Tensor) -> None:
        step_with(self.params, self.optimizer, gradient)

    def save(self, step: int, stopping: bool = False) -> None:
        self.checkpoints.save("server", step, {"model": self.model.state_dict(),
                                               "optimizer": self.optimizer.state_dict(), "counts": self.counts,
                                               "arrivals": self.arrivals, "resumed_at": self.resumed_at})

    def report(self, step: int) -> None:
        self.session.log(f"step {step} eval loss {task.eval_loss(self.model, self.data):.6f}")

    def run_sync(self, start: int) -> None:
        args = self.args
        gradients = [torch.empty_like(self.flat()) for _ in self.workers]
        with sessions.Stopping() as stopping:
            for step in range(start, args.steps):
                self._sync_step(step, gradients)
                done = step + 1
                if done % args.checkpoint_every == 0 or done == args.steps:
                    self.save(done)
                elif done < args.steps:
                    stopping.stop_after(done, self.save, self.session)
        self.session.log(self.timer.summary())

    def _sync_step(self, step: int, gradients: list[torch.Tensor]) -> None:
        """Send the parameters to every worker, take their gradients, apply the mean."""
        flat = self.flat()
        works = [sessions.started(dist.isend(flat, worker)) for worker in self.workers]
        works += [sessions.started(dist.irecv(gradient, worker)) for gradient, worker in zip(gradients, self.workers)]
        for work in works:
            work.wait()
        total = gradients[0].clone()
        for gradient in gradients[1:]:
            total += gradient
        self.apply(total / len(self.workers))
        self.timer.step_done()
        if step % self.args.log_every == 0 or step + 1 == self.args.steps:
            self.report(step)

    def run_async(self, updates: int) -> None:
        """Serve pushes in arrival order until every worker did --steps iterations."""
        args, workers, link = self.args, len(self.workers), self.link
        for index, worker in enumerate(self.workers):  # where each worker resumes
            dist.send(torch.tensor([self.counts[index]], dtype=torch.int64, device=link.device), worker, link.group)
        sending: dict[int, tuple[dist.Work, torch.Tensor]] = {}
        left = 0
        for index, worker in enumerate(self.workers):
            if self.counts[index] < args.steps:
                sending[worker] = self._send(worker)
                left += args.steps - self.counts[index]
        gradient = torch.empty_like(self.flat(), device=link.device)
        with sessions.Stopping() as stopping:
            for _ in range(left):
                worker = dist.recv(gradient, group=link.group)  # from whichever worker is first
                sending.pop(worker)[0].wait()  # done: that worker computed on what it was sent
                index = self.workers.index(worker)
                self.apply(gradient.to(self.session.device) / workers)
                self.counts[index] += 1
                self.arrivals.append(worker)
                updates += 1
                self.timer.step_done()
                if self.counts[index] < args.steps:
                    sending[worker] = self._send(worker)
                last = not sending
                if updates % (args.log_every * workers) == 0 or last:
                    self.report(updates // workers)
                if updates % (args.checkpoint_every * workers) == 0 or last:
                    self.save(updates)
                else:
                    stopping.stop_after(updates, self.save, self.session)
        self.session.log(self.timer.summary().replace("steps", "updates", 1))

    def _send(self, worker: int) -> tuple[dist.Work, torch.Tensor]:
        """Start sending the parameters as they are now; the tensor must live until the send is done."""
        flat = self.flat().to(self.link.device)
        return sessions.started(dist.isend(flat, worker, self.link.group)), flat


class Worker:
    """Ranks 1..: pull the parameters, push the gradient of this worker's shard."""

    def __init__(self, args: argparse.Namespace, session: sessions.Session, link: Link, config: task.Config) -> None:
        self.args, self.session, self.link = args, session, link
        self.data = task.Data(config, session.device)
        self.model = task.build_model(config).to(session.device)
        self.params = list(self.model.parameters())
        # The parameters become views into one flat buffer, so a pull lands in them directly.
        self.flat = parameters_to_vector(self.params).detach()
        vector_to_parameters(self.flat, self.params)
        self.index, self.workers = session.rank - 1, session.world - 1

    def run(self, start: int) -> None:
        args, session = self.args, self.session
        link = self.link
        if args.mode == "async":
            first = torch.zeros(1, dtype=torch.int64, device=link.device)
            dist.recv(first, SERVER, link.group)
            start = int(first.item())
        staging = self.flat if link.device == self.flat.device else torch.empty_like(self.flat, device=link.device)
        timer = sessions.StepTimer(session.device)
        for step in range(start, args.steps):
            dist.recv(staging, SERVER, link.group)
            if staging is not self.flat:
                self.flat.copy_(staging)
            inputs, labels = task.shard(self.data.batch(step), self.index, self.workers)
            loss = task.loss_fn(self.model(inputs), labels)
            for param in self.params:
                param.grad = None
            loss.backward()
            gradient = torch.cat([task.grad_of(param).reshape(-1) for param in self.params])
            dist.send(gradient.to(link.device), SERVER, link.group)
            timer.step_done()
            if step % args.log_every == 0 or step + 1 == args.steps:
                session.log(f"step {step} loss {loss.item():.6f}")
            if args.step_sleep:
                time.sleep(args.step_sleep)
        session.log(timer.summary())


def step_with(params: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer, gradient: torch.Tensor) -> None:
    """One optimizer step with this flat gradient."""
    offset = 0
    for param in params:
        param.grad = gradient[offset:offset + param.numel()].view_as(param).clone()
        offset += param.numel()
    optimizer.step()


def replay_async(config: task.Config, workers: int, arrivals: Sequence[int],
                 resumed_at: Sequence[int] = ()) -> dict[str, torch.Tensor]:
    """The model an asynchronous run must end with, worked out in one process from the order its
    pushes arrived in (`Server.arrivals`): each push is the gradient of that worker's shard of its next
    step at the parameters the server last sent it, applied scaled by 1/``workers``. Whatever the
    interleaving, a run equals its replay; that is what the tests check, not a loss that depends on it."""
    data = task.Data(config)
    server = task.build_model(config)
    params = list(server.parameters())
    optimizer = task.make_optimizer(params, config)
    computing = task.build_model(config)
    sent = {worker: parameters_to_vector(params).detach().clone() for worker in range(1, workers + 1)}
    steps = dict.fromkeys(sent, 0)
    for update, worker in enumerate(arrivals):
        if update in resumed_at:  # every worker starts again from the parameters as saved
            sent = dict.fromkeys(sent, parameters_to_vector(params).detach().clone())
        vector_to_parameters(sent[worker], computing.parameters())
        inputs, labels = task.shard(data.batch(steps[worker]), worker - 1, workers)
        computing.zero_grad(set_to_none=True)
        task.loss_fn(computing(inputs), labels).backward()
        gradient = torch.cat([task.grad_of(param).reshape(-1) for param in computing.parameters()])
        step_with(params, optimizer, gradient / workers)
        steps[worker] += 1
        sent[worker] = parameters_to_vector(params).detach().clone()
    return server.state_dict()
