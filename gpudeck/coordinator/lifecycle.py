"""What happens to jobs once placed: the agents' reports (preparing, started, exited, what a
reconnecting agent still runs), nodes lost, cancels and time limits.

Every change is stored before anything is sent, so a coordinator killed at any point restarts into
a state the agents' reports can be reconciled with: a launch the agent never received is sent again,
a launch it did receive is a no-op the second time, and ranks of an attempt the coordinator no
longer wants are killed.
"""

from __future__ import annotations

import logging
import re
from typing import Callable

from gpudeck.coordinator.launching import Launcher, Send
from gpudeck.coordinator.registry import Registry
from gpudeck.coordinator.store import AttemptNode, JobRow, Store
from gpudeck.model import JobState, NodeState, format_duration
from gpudeck.protocol.node_messages import Forget, Kill
from gpudeck.protocol.payloads import JobReport

log = logging.getLogger(__name__)
_RANK_DETAIL = re.compile(r"^rank (\d+) (.+)$")
FENCE_DEADLINE = 120.0  # longest a lost node's GPUs wait for it to confirm its ranks are gone
MAX_REASON = 300  # characters of a node's word on what it is doing


def _failure(node: str, exit_code: int, detail: str) -> str:
    """Why a job failed, for a person: which rank on which node failed first, and with what."""
    rank = _RANK_DETAIL.match(detail)
    if rank:
        return f"rank {rank.group(1)} on {node} failed first: it {rank.group(2)}"
    return f"ranks on {node} exited with code {exit_code}" + (f": {detail}" if detail else "")


class Lifecycle:
    def __init__(self, store: Store, registry: Registry, send: Send, clock: Callable[[], float], launcher: Launcher,
                 queue_changed: Callable[[], None]) -> None:
        """`queue_changed`: told when a cancel may let waiting jobs move without freeing a GPU (those
        waiting for the cancelled job), so that the next scheduling pass considers them all."""
        self.store = store
        self.registry = registry
        self.send = send
        self.clock = clock
        self.launcher = launcher
        self.queue_changed = queue_changed

    def _current(self, job_id: int, attempt: int) -> JobRow | None:
        """The job if `attempt` is its current, still active attempt."""
        row = self.store.job(job_id)
        if row is None or row.attempt != attempt or not row.state.active:
            return None
        return row

    def preparing(self, node: str, job_id: int, attempt: int, doing: str) -> None:
        """A node's word on what it does before the attempt can start, as the starting job's reason."""
        row = self._current(job_id, attempt)
        if row is not None and row.state is JobState.STARTING:
            self.store.set_reasons({job_id: doing[:MAX_REASON]})

    def started(self, node: str, job_id: int, attempt: int) -> None:
        row = self._current(job_id, attempt)
        if row is None:
            self.send(node, Kill(job=job_id, attempt=attempt, reason="this attempt is no longer wanted"))
            return
        self.store.mark_started(job_id, attempt, node)
        if row.state is JobState.STARTING and all(s.started for s in self.store.attempt_nodes(job_id, attempt)):
            self.store.transition(job_id, JobState.RUNNING, reason="")

    def exited(self, node: str, job_id: int, attempt: int, exit_code: int, detail: str,
               retry: bool = False, failed_at: float | None = None) -> None:
        newly = self.store.record_exit(job_id, attempt, node, exit_code)
        self.send(node, Forget(job=job_id, attempt=attempt))
        row = self._current(job_id, attempt) if newly else None
        if row is None:
            if newly and exit_code != 0 and failed_at is not None:
                self._earlier_failure(job_id, attempt, node, exit_code, detail, failed_at)
            return
        shares = self.store.attempt_nodes(job_id, attempt)
        if retry:
            self.launcher.kill_open(job_id, attempt, f"placing the job again: {detail}")
            self.store.transition(job_id, JobState.PENDING, at=self.clock(), reason=f"placing it again: {detail}")
            log.info("job %d attempt %d could not start on %s (%s); placing it again", job_id, attempt, node, detail)
        elif exit_code != 0 and (silent := self._silent_peer(shares, node)):
            self._lost(job_id, attempt, silent, f"node {silent} stopped answering", confirmed=False)
        elif exit_code != 0:
            self._end(row, JobState.FAILED, _failure(node, exit_code, detail), exit_code, failed_at)
        elif all(s.exit_code == 0 for s in shares):
            self._end(row, JobState.SUCCEEDED, "", 0)

    def _silent_peer(self, shares: list[AttemptNode], reporter: str) -> str | None:
        """A node of the attempt that stopped answering without saying its ranks ended. A dead
        machine's peers see their sockets close and fail within a second, well before the node is
        judged down: their failure is then that node's loss, which requeues the job."""
        for share in shares:
            if (share.node != reporter and share.exit_code is None
                    and (self.registry.link(share.node) is None
                         or self.registry.states.get(share.node) is not NodeState.UP)):
                return share.node
        return None

    def _earlier_failure(self, job_id: int, attempt: int, node: str, exit_code: int, detail: str,
                         failed_at: float) -> None:
        """A node whose report came second may have failed first (the others then only lost their
        peer): the job's code and reason are those of the failure that happened first."""
        row = self.store.job(job_id)
        if (row is None or row.attempt != attempt or row.state is not JobState.FAILED or row.failed_at is None
                or failed_at >= row.failed_at):
            return
        self.store.amend_job(job_id, exit_code=exit_code, reason=_failure(node, exit_code, detail), failed_at=failed_at)

    def _end(self, row: JobRow, state: JobState, reason: str, exit_code: int | None,
             failed_at: float | None = None) -> None:
        self.store.transition(row.id, state, reason=reason, exit_code=exit_code, ended_at=self.clock(),
                              failed_at=failed_at)
        log.info("job %d %s%s", row.id, state.value, f": {reason}" if reason else "")
        self.launcher.kill_open(row.id, row.attempt, reason or state.value)

    def reconcile(self, node: str, reported: list[JobReport]) -> None:
        """Adopt what a (re)connecting agent still runs; resend lost launches; count lost ranks."""
        held = set()
        for job in reported:
            held.add((job.job, job.attempt))
            if job.exit_code is not None:
                self.exited(node, job.job, job.attempt, job.exit_code, job.detail, job.retry, job.failed_at)
            else:
                self.started(node, job.job, job.attempt)
        for share in self.store.open_attempt_nodes():
            if share.node != node or (share.job, share.attempt) in held:
                continue
            if not share.started and self._current(share.job, share.attempt):
                self.launcher.send_launch(share.job, share.attempt, node)
            else:
                self._lost(share.job, share.attempt, node, f"{node} no longer runs its ranks (its agent restarted)",
                           confirmed=True)

    def node_down(self, node: str) -> None:
        for share in self.store.open_attempt_nodes():
            if share.node == node:
                self._lost(share.job, share.attempt, node, f"node {node} stopped answering", confirmed=False)

    def _lost(self, job_id: int, attempt: int, node: str, why: str, confirmed: bool) -> None:
        """A node's share of an attempt is gone: stop the other ranks, then requeue or fail the job.
        A node that only stopped answering may still run its ranks: its GPUs are fenced (kept from
        other jobs) until it says they ended or FENCE_DEADLINE passes."""
        if confirmed:
            self.store.record_exit(job_id, attempt, node, -1)
        else:
            self.store.fence(job_id, attempt, node, self.clock() + FENCE_DEADLINE)
        row = self._current(job_id, attempt)
        if row is None:
            return
        self.launcher.kill_open(job_id, attempt, why)
        if row.restarts < row.spec.max_restarts:
            restarts = row.restarts + 1
            note = f"{why} (restart {restarts} of {row.spec.max_restarts})"
            self.store.transition(job_id, JobState.PENDING, at=self.clock(), restarts=restarts, requeued_because=note,
                                  reason=f"requeued: {note}")
            log.info("job %d requeued: %s", job_id, why)
        else:
            extra = " and it has no restarts left (--max-restarts)" if row.spec.max_restarts else ""
            self.store.transition(job_id, JobState.FAILED, reason=f"{why}{extra}", ended_at=self.clock())
            log.info("job %d failed: %s", job_id, why)

    def cancel(self, job_id: int, reason: str = "cancelled by a user") -> JobRow:
        row = self.store.job(job_id)
        if row is None:
            raise LookupError(f"there is no job {job_id}")
        if row.state.finished:
            raise ValueError(f"job {job_id} already {row.state.value}; nothing to cancel")
        self.store.transition(job_id, JobState.CANCELLED, reason=reason, ended_at=self.clock())
        self.launcher.kill_open(job_id, row.attempt, reason)
        self.queue_changed()
        return self.store.job(job_id)  # type: ignore[return-value]

    def cancel_array(self, array_job: int, reason: str = "cancelled by a user") -> JobRow:
        """Cancel every task of an array that has not ended, in one transaction; the array's first task."""
        tasks = self.store.unfinished_tasks(array_job)
        if not tasks:
            raise ValueError(f"every task of array {array_job} has already ended; nothing to cancel")
        self.store.transition_all([task.id for task in tasks], JobState.CANCELLED, reason=reason, ended_at=self.clock())
        for task in tasks:
            if task.attempt:
                self.launcher.kill_open(task.id, task.attempt, reason)
        self.queue_changed()
        log.info("array %d: %d tasks cancelled", array_job, len(tasks))
        return self.store.job(array_job)  # type: ignore[return-value]

    def enforce_time_limits(self) -> None:
        now = self.clock()
        for row in self.store.jobs((JobState.STARTING, JobState.RUNNING)):
            limit = row.spec.time_limit
            if limit and row.started_at and now - row.started_at > limit:
                self._end(row, JobState.FAILED, f"ran past its time limit of {format_duration(limit)}", None)
