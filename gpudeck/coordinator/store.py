"""The only code that touches SQLite: nodes, jobs, attempts and traffic in one WAL file.

Durability: WAL with synchronous=FULL, so a job is on disk when its id is returned and a launch is on
disk before it is sent. Every write is one short transaction; the coordinator is the one writer.

Because it is the one writer, the store keeps every node and every unfinished job in memory as
well, refreshed by its own writes: the control loop reads the queue (thousands of pending jobs) every tick without a
query, and learns which jobs changed (`take_changed`) without comparing them all. Scripts are loaded
only where they are sent (`script`), never with a row.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import sqlite3
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import sqlite_utils

from gpudeck.model import JobSpec, JobState, NodeState, RunSpec, check_transition
from gpudeck.protocol.payloads import GpuReading, OutputFile
from gpudeck.protocol.values import ShapeError, plain, typed

Hosts = list[tuple[str, list[int]]]
_BATCH = 500  # ids per IN (...) query, well under SQLite's limit on parameters
CHECKPOINT_EVERY = 5.0
log = logging.getLogger(__name__)


class StoreFull(Exception):
    """The disk under the database is full: the write was rolled back, nothing of it is stored."""


@dataclass(frozen=True)
class JobRow:
    """A job as stored: its spec and what has happened to it so far."""

    id: int
    spec: JobSpec
    state: JobState
    reason: str
    submitted_at: float
    started_at: float | None
    ended_at: float | None
    attempt: int
    exit_code: int | None
    restarts: int
    requeued_because: str  # why the last attempt was lost, while the job waits to run again
    failed_at: float | None  # when the rank that failed the job ended (orders failures across nodes)
    hosts: Hosts  # the current attempt's placement, node rank order; [] before the first
    owner: str = ""  # the user who submitted it ("" for jobs stored before there were users)
    array_job: int | None = None  # of a task of an array: the array's id (its first task's)
    array_index: int | None = None  # and its index in the array
    # `spec.run.script` is always b"" here: the bytes are loaded only to be sent (`Store.script`).


@dataclass(frozen=True)
class JobFilter:
    """Which jobs a listing asks for: in `states` (empty: any), unfinished or ended at or after
    `since` (None: any time), with ids below `before` (None: any)."""

    states: tuple[JobState, ...] = ()
    since: float | None = None
    before: int | None = None
    owner: str | None = None

    def sql(self) -> tuple[str, list[Any]]:
        """A WHERE condition on `jobs j` and its parameters."""
        terms, params = ["1"], list[Any]()
        if self.states:
            terms.append(f"j.state IN ({','.join('?' * len(self.states))})")
            params += [state.value for state in self.states]
        if self.since is not None:
            unfinished = [state.value for state in JobState if not state.finished]
            terms.append(f"(j.state IN ({','.join('?' * len(unfinished))}) OR j.ended_at >= ?)")
            params += [*unfinished, self.since]
        if self.before is not None:
            terms.append("j.id < ?")
            params.append(self.before)
        if self.owner is not None:
            terms.append("j.owner = ?")
            params.append(self.owner)
        return " AND ".join(terms), params


@dataclass(frozen=True)
class AttemptNode:
    """One node's share of a job attempt."""

    job: int
    attempt: int
    node: str
    node_rank: int
    gpus: list[int]
    started: bool
    exit_code: int | None
    fenced_until: float | None  # lost with its node, which may still run it: its GPUs wait until then


@dataclass(frozen=True)
class HeldGpus:
    """The GPUs one attempt of a job held, from when to when (`ended_at` None: it holds them still)."""

    job: int
    attempt: int
    owner: str
    gpus: int
    started_at: float
    ended_at: float | None

    def gpu_seconds(self, now: float, since: float | None = None) -> float:
        """GPU-seconds held up to `now`, counted from `since` (None: from the start)."""
        start = self.started_at if since is None else max(self.started_at, since)
        end = now if self.ended_at is None else min(self.ended_at, now)
        return self.gpus * max(0.0, end - start)


@dataclass(frozen=True)
class CordonRow:
    """A GPU the scheduler must not offer (`cordoned`), for `faults`; or, uncordoned, the faults an
    admin has seen and cleared, which do not cordon it again (`acknowledged`)."""

    node: str
    gpu: int
    uuid: str
    faults: tuple[str, ...]
    since: float
    cordoned: bool = True
    acknowledged: tuple[str, ...] = ()

    @property
    def cause(self) -> str:
        return "; ".join(self.faults)


@dataclass(frozen=True)
class UserRow:
    """A person with a token of their own. Only the secret's hash is stored: a copied database or
    backup gives nobody a token."""

    name: str
    secret_hash: str
    admin: bool
    max_gpus: int | None  # the most GPUs their jobs may hold at once; None: no limit
    created_at: float


@dataclass(frozen=True)
class NodeRow:
    name: str
    hostname: str
    address: str
    simulated: bool
    gpus: list[GpuReading]  # the last readings it sent
    state: NodeState
    draining: bool
    joined_at: float
    last_seen: float


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer thread does it, off the event loop
        self.db = sqlite_utils.Database(conn)
        self._create()
        self._checkpointer = _Checkpointer(path)
        self._checkpointer.start()
        # In id order: loaded so, and new jobs have higher ids (a refreshed row keeps its place).
        self._unfinished: dict[int, JobRow] = {row.id: row for row in self._load("j.state in (?, ?, ?)", [
            JobState.PENDING.value, JobState.STARTING.value, JobState.RUNNING.value])}
        self._changed: set[int] = set()
        self._newly_pending: list[int] = list(self._unfinished)
        self._nodes: dict[str, NodeRow] = {row["name"]: _node_row(row) for row in self.db.table("nodes").rows}
        self._open_shares: list[AttemptNode] | None = None
        self._users: dict[str, UserRow] = {row["name"]: _user_row(row) for row in self.db.table("users").rows}
        self._cordons: dict[tuple[str, int], CordonRow] = {
            (row["node"], row["gpu"]): _cordon_row(row) for row in self.db.table("cordons").rows}
        # Told of every job that changes state, after the change is on disk (the metrics count them).
        self.on_move: Callable[[JobState, JobRow], None] = lambda before, row: None

    def _create(self) -> None:
        db = self.db
        with self._tx():
            db.table("nodes").create({"name": str, "hostname": str, "address": str, "simulated": int, "gpus": str,
                                      "state": str, "draining": int, "joined_at": float, "last_seen": float},
                                     pk="name", if_not_exists=True)
            db.table("jobs").create({"id": int, "name": str, "spec": str, "script": bytes, "state": str,
                                     "reason": str, "priority": int, "submitted_at": float, "started_at": float,
                                     "ended_at": float, "attempt": int, "exit_code": int, "restarts": int,
                                     "requeued_because": str, "failed_at": float},
                                    pk="id", if_not_exists=True, not_null={"name", "spec", "state", "submitted_at"})
            _add_missing_columns(db.table("jobs"),
                                 {"failed_at": float, "owner": str, "array_job": int, "array_index": int})
            db.table("attempts").create({"job": int, "attempt": int, "master_addr": str, "master_port": int,
                                         "started_at": float, "ended_at": float}, pk=("job", "attempt"),
                                        if_not_exists=True, foreign_keys=[("job", "jobs", "id")])
            _add_missing_columns(db.table("attempts"), {"ended_at": float})
            db.table("attempt_nodes").create({"job": int, "attempt": int, "node": str, "node_rank": int, "gpus": str,
                                              "started": int, "exit_code": int, "fenced_until": float},
                                             pk=("job", "attempt", "node"), if_not_exists=True)
            _add_missing_columns(db.table("attempt_nodes"), {"fenced_until": float})
            db.table("traffic").create({"job": int, "attempt": int, "rank": int, "kind": str, "bytes": int},
                                       pk=("job", "attempt", "rank", "kind"), if_not_exists=True)
            db.table("outputs").create({"job": int, "node": str, "attempt": int, "files": str}, pk=("job", "node"),
                                       if_not_exists=True)
            db.table("energy").create({"job": int, "attempt": int, "millijoules": int, "simulated": int},
                                      pk=("job", "attempt"), if_not_exists=True)
            db.table("jobs").create_index(["state"], if_not_exists=True)
            db.table("jobs").create_index(["array_job", "array_index"], if_not_exists=True)
            db.table("users").create({"name": str, "secret_hash": str, "admin": int, "max_gpus": int,
                                      "created_at": float}, pk="name", if_not_exists=True, not_null={"secret_hash"})
            db.table("cordons").create({"node": str, "gpu": int, "uuid": str, "faults": str, "since": float,
                                        "cordoned": int, "acknowledged": str}, pk=("node", "gpu"), if_not_exists=True)

    # --- users ------------------------------------------------------------------------------------

    def add_user(self, user: UserRow) -> None:
        """Store a new user; ValueError when the name is taken."""
        if user.name in self._users:
            raise ValueError(f"there is already a user {user.name}")
        with self._tx():
            self.db.table("users").insert({"name": user.name, "secret_hash": user.secret_hash, "admin": int(user.admin),
                                           "max_gpus": user.max_gpus, "created_at": user.created_at})
        self._users[user.name] = user

    def remove_user(self, name: str) -> None:
        if name not in self._users:
            raise LookupError(f"there is no user {name}")
        with self._tx():
            self.db.table("users").delete(name)
        del self._users[name]

    def user(self, name: str) -> UserRow | None:
        return self._users.get(name)

    def users(self) -> list[UserRow]:
        return sorted(self._users.values(), key=lambda user: user.name)

    def user_with_secret_hash(self, secret_hash: str) -> UserRow | None:
        return next((user for user in self._users.values() if user.secret_hash == secret_hash), None)

    # --- GPU cordons (coordinator.health) -------------------------------------------------------------

    def cordons(self) -> dict[tuple[str, int], CordonRow]:
        """Every GPU's cordon record by (node, index), cordoned or not; from memory."""
        return dict(self._cordons)

    def cordoned_by_node(self) -> dict[str, list[CordonRow]]:
        """The GPUs the scheduler must not offer, by node, in index order."""
        found: dict[str, list[CordonRow]] = {}
        for key in sorted(self._cordons):
            if self._cordons[key].cordoned:
                found.setdefault(key[0], []).append(self._cordons[key])
        return found

    def set_cordon(self, row: CordonRow) -> None:
        with self._tx():
            self.db.table("cordons").upsert({"node": row.node, "gpu": row.gpu, "uuid": row.uuid,
                                             "faults": json.dumps(row.faults), "since": row.since,
                                             "cordoned": int(row.cordoned),
                                             "acknowledged": json.dumps(row.acknowledged)}, pk=("node", "gpu"))
        self._cordons[(row.node, row.gpu)] = row

    def remove_cordon(self, node: str, gpu: int) -> None:
        with self._tx():
            self.db.conn.execute("DELETE FROM cordons WHERE node = ? AND gpu = ?", [node, gpu])
        self._cordons.pop((node, gpu), None)

    # --- outputs kept on nodes ----------------------------------------------------------------------

    def set_outputs(self, job_id: int, node: str, attempt: int, files: list[OutputFile]) -> None:
        """What a node keeps of a job's outputs (its latest attempt's); no files: nothing kept."""
        with self._tx():
            if files:
                self.db.table("outputs").upsert({"job": job_id, "node": node, "attempt": attempt,
                                                 "files": json.dumps(plain(files))}, pk=("job", "node"))
            else:
                self.db.conn.execute("DELETE FROM outputs WHERE job = ? AND node = ? AND attempt = ?",
                                     [job_id, node, attempt])
        self._changed.add(job_id)

    def forget_outputs(self, node: str) -> None:
        with self._tx():
            jobs = [row[0] for row in self.db.conn.execute("SELECT job FROM outputs WHERE node = ?", [node])]
            self.db.conn.execute("DELETE FROM outputs WHERE node = ?", [node])
        self._changed.update(jobs)

    def kept_outputs(self, job_id: int, node: str) -> tuple[int, list[OutputFile]]:
        """The attempt whose outputs `node` keeps for this job, and their files (0 and none if none)."""
        row = self.db.conn.execute("SELECT attempt, files FROM outputs WHERE job = ? AND node = ?",
                                   [job_id, node]).fetchone()
        return (row[0], typed(json.loads(row[1]), list[OutputFile], "outputs")) if row else (0, [])

    def outputs(self, job_ids: list[int]) -> dict[int, dict[str, list[OutputFile]]]:
        """Each job's outputs by node, for these jobs, in one query."""
        found: dict[int, dict[str, list[OutputFile]]] = {job_id: {} for job_id in job_ids}
        if not job_ids:
            return found
        rows = self.db.conn.execute("SELECT job, node, files FROM outputs "
                                    f"WHERE job IN ({','.join('?' * len(job_ids))})", job_ids).fetchall()
        for job_id, node, files in rows:
            found[job_id][node] = typed(json.loads(files), list[OutputFile], "outputs")
        return found

    def _tx(self, durable: bool = True) -> "_Transaction":
        return _Transaction(self.db.conn, durable, self.path)

    def close(self) -> None:
        self._checkpointer.stop()
        self.db.conn.close()

    # --- nodes ---------------------------------------------------------------------------------

    def upsert_node(self, name: str, hostname: str, address: str, simulated: bool,
                    gpus: list[GpuReading], now: float) -> None:
        existing = self.node(name)
        with self._tx():
            self.db.table("nodes").upsert({
                "name": name, "hostname": hostname, "address": address, "simulated": int(simulated),
                "gpus": json.dumps(plain(gpus)), "state": NodeState.UP.value,
                "joined_at": existing.joined_at if existing else now, "last_seen": now,
            }, pk="name")
        self._refresh_node(name)

    def set_node_state(self, name: str, state: NodeState, last_seen: float | None = None) -> None:
        updates: dict[str, Any] = {"state": state.value}
        if last_seen is not None:
            updates["last_seen"] = last_seen
        with self._tx():
            self.db.table("nodes").update(name, updates)
        self._refresh_node(name)

    def set_draining(self, name: str, on: bool) -> None:
        with self._tx():
            self.db.table("nodes").update(name, {"draining": int(on)})
        self._refresh_node(name)

    def node(self, name: str) -> NodeRow | None:
        return self._nodes.get(name)

    def nodes(self) -> list[NodeRow]:
        """Every node that ever joined, by name; from memory (every write refreshes it)."""
        return [self._nodes[name] for name in sorted(self._nodes)]

    def _refresh_node(self, name: str) -> None:
        rows = list(self.db.table("nodes").rows_where("name = ?", [name]))
        if rows:
            self._nodes[name] = _node_row(rows[0])

    # --- jobs ----------------------------------------------------------------------------------

    def add_job(self, spec: JobSpec, now: float, owner: str) -> int:
        with self._tx():
            job_id = _inserted_id(self.db.table("jobs").insert(_new_job(spec, now, owner)))
        self._refresh([job_id])
        return job_id

    def add_array(self, spec: JobSpec, now: float, owner: str, indices: Sequence[int]) -> int:
        """One job per index, in one transaction, and the array's id (its first task's). The script is
        stored once, with the first task (`script` gives it for every task)."""
        with self._tx():
            first = _inserted_id(self.db.table("jobs").insert({**_new_job(spec, now, owner),
                                                               "array_index": indices[0]}))
            self.db.table("jobs").update(first, {"array_job": first})
            task = {**_new_job(spec, now, owner), "script": None, "array_job": first}
            self.db.table("jobs").insert_all({**task, "array_index": index} for index in indices[1:])
            ids = [row[0] for row in self.db.conn.execute("SELECT id FROM jobs WHERE array_job = ? ORDER BY id",
                                                          [first])]
        self._refresh(ids)
        return first

    def job(self, job_id: int) -> JobRow | None:
        if job_id in self._unfinished:
            return self._unfinished[job_id]
        rows = self._load("j.id = ?", [job_id])
        return rows[0] if rows else None

    def jobs_by_id(self, job_ids: list[int]) -> dict[int, JobRow]:
        """These jobs (those that exist), in batched queries; unfinished ones from memory."""
        found = {job_id: self._unfinished[job_id] for job_id in job_ids if job_id in self._unfinished}
        rest = [job_id for job_id in job_ids if job_id not in found]
        for start in range(0, len(rest), _BATCH):
            batch = rest[start:start + _BATCH]
            found.update((row.id, row) for row in self._load(f"j.id IN ({','.join('?' * len(batch))})", batch))
        return found

    def jobs(self, states: tuple[JobState, ...] | None = None) -> list[JobRow]:
        """Jobs in id order; unfinished ones come from memory, without a query."""
        if states and not any(state.finished for state in states):
            return [row for row in self._unfinished.values() if row.state in states]
        if states:
            marks = ",".join("?" * len(states))
            return self._load(f"j.state in ({marks})", [s.value for s in states])
        return self._load("1", [])

    def jobs_page(self, after: int, limit: int, filters: JobFilter | None = None, newest: bool = False) -> list[JobRow]:
        """Up to `limit` jobs with ids above `after` that pass `filters`, in id order: the lowest
        such ids, or with `newest` the highest."""
        where, params = (filters or JobFilter()).sql()
        order = "DESC" if newest else ""
        sql = f"SELECT j.id FROM jobs j WHERE j.id > ? AND {where} ORDER BY j.id {order} LIMIT ?"
        ids = [row[0] for row in self.db.conn.execute(sql, [after, *params, limit])]
        if not ids:
            return []
        return self._load(f"j.id >= ? AND j.id <= ? AND {where}", [min(ids), max(ids), *params])

    def count_jobs(self, filters: JobFilter | None = None) -> int:
        """How many jobs pass `filters`."""
        where, params = (filters or JobFilter()).sql()
        return self.db.conn.execute(f"SELECT count(*) FROM jobs j WHERE {where}", params).fetchone()[0]

    def count_by_state(self) -> dict[JobState, int]:
        """How many jobs are in each state (one grouped count over the state index)."""
        sql = "SELECT state, count(*) FROM jobs GROUP BY state"
        return {JobState(state): count for state, count in self.db.conn.execute(sql)}

    def take_newly_pending(self) -> list[int]:
        """Jobs that became pending (submitted or requeued) since the last call, in that order."""
        ids, self._newly_pending = self._newly_pending, []
        return ids

    def take_changed_ids(self) -> list[int]:
        """Ids of the jobs written since the last call (of this or `take_changed`), in id order."""
        changed, self._changed = sorted(self._changed), set()
        return changed

    def touch(self, job_ids: list[int]) -> None:
        """Count these jobs as changed: what clients see of them changed outside their rows (a
        pending job's estimated start, kept by the scheduler's caller)."""
        self._changed.update(job_ids)

    def take_changed(self) -> list[JobRow]:
        """Jobs written since the last call (their current rows), in id order."""
        changed = self.take_changed_ids()
        rows = [self._unfinished[i] for i in changed if i in self._unfinished]
        finished = [i for i in changed if i not in self._unfinished]
        if finished:
            rows += self._load(f"j.id in ({','.join('?' * len(finished))})", finished)
        return sorted(rows, key=lambda row: row.id)

    def script(self, job_id: int) -> bytes:
        """A job's script; the tasks of an array share the one stored with its first task."""
        row = self.db.conn.execute("SELECT script FROM jobs WHERE id = (SELECT COALESCE(array_job, id) FROM jobs "
                                   "WHERE id = ?)", [job_id]).fetchone()
        return bytes(row[0] or b"") if row else b""

    def task(self, array_job: int, index: int) -> JobRow | None:
        """The task of that array with that index."""
        row = self.db.conn.execute("SELECT id FROM jobs WHERE array_job = ? AND array_index = ?",
                                   [array_job, index]).fetchone()
        return self.job(row[0]) if row else None

    def unfinished_tasks(self, array_job: int) -> list[JobRow]:
        """The tasks of an array that have not ended, in index order; from memory."""
        return [row for row in self._unfinished.values() if row.array_job == array_job]

    def states_of(self, job_ids: list[int]) -> dict[int, tuple[str, dict[str, int]]]:
        """What --after waits on: each of these jobs' state and, for an array's id (its first
        task's, which stands for the whole array), its tasks counted by state ({} for any other
        job); ids of no job are absent."""
        found: dict[int, tuple[str, dict[str, int]]] = {}
        for start in range(0, len(job_ids), _BATCH):
            batch = job_ids[start:start + _BATCH]
            marks = ",".join("?" * len(batch))
            for job_id, state in self.db.conn.execute(f"SELECT id, state FROM jobs WHERE id IN ({marks})", batch):
                found[job_id] = (state, {})
            sql = f"SELECT array_job, state, count(*) FROM jobs WHERE array_job IN ({marks}) GROUP BY array_job, state"
            for job_id, state, count in self.db.conn.execute(sql, batch):
                found[job_id][1][state] = count
        return found

    def transition(self, job_id: int, state: JobState, at: float | None = None, **fields: Any) -> None:
        """Move a job to `state` and set `fields` in one transaction; `IllegalTransition` (a bug)
        when `TRANSITIONS` does not allow the move from the state it is in. A job that leaves
        starting or running gives its GPUs back `at` then (or at `ended_at`): what accounting and
        fair share count."""
        self.transition_all([job_id], state, at, **fields)

    def transition_all(self, job_ids: list[int], state: JobState, at: float | None = None, **fields: Any) -> None:
        """`transition` of several jobs in one transaction, all or none: cancelling an array of
        thousands of tasks is one commit to disk, not thousands."""
        columns = {"state": state.value, **fields}  # the names are this code's own keywords, never a peer's
        update = f"UPDATE jobs SET {', '.join(f'{name} = ?' for name in columns)} WHERE id = ?"
        with self._tx():
            for job_id in job_ids:
                old = self._check_transition(job_id, state)
                self.db.conn.execute(update, [*columns.values(), job_id])
                if old.active and not state.active:
                    self.db.conn.execute("UPDATE attempts SET ended_at = ? WHERE job = ? AND ended_at IS NULL",
                                         [at if at is not None else fields.get("ended_at"), job_id])
        self._refresh(job_ids)

    def amend_job(self, job_id: int, **fields: Any) -> None:
        """Change a job's fields other than its state (which only `transition` changes)."""
        if "state" in fields:
            raise ValueError("a job's state changes only by transition()")
        with self._tx():
            self.db.table("jobs").update(job_id, fields)
        self._refresh([job_id])

    def _check_transition(self, job_id: int, state: JobState) -> JobState:
        """The job's current state, when it may move to `state`."""
        row = self.db.conn.execute("SELECT state FROM jobs WHERE id = ?", [job_id]).fetchone()
        if row is None:
            raise LookupError(f"there is no job {job_id}")
        check_transition(job_id, JobState(row[0]), state)
        return JobState(row[0])

    def set_reasons(self, reasons: dict[int, str]) -> None:
        """Store the scheduler's reasons for pending jobs, only where they changed."""
        changed = {job_id: reason for job_id, reason in reasons.items()
                   if job_id in self._unfinished and self._unfinished[job_id].reason != reason}
        if not changed:
            return
        with self._tx():
            self.db.conn.executemany("UPDATE jobs SET reason = ? WHERE id = ?",
                                     [(reason, job_id) for job_id, reason in changed.items()])
        for job_id, reason in changed.items():
            self._unfinished[job_id] = replace(self._unfinished[job_id], reason=reason)
        self._changed.update(changed)

    def _refresh(self, job_ids: list[int]) -> None:
        """Reload rows this store just wrote, keeping the in-memory queue equal to the file."""
        rows: dict[int, JobRow] = {}
        for start in range(0, len(job_ids), _BATCH):
            batch = job_ids[start:start + _BATCH]
            rows.update((row.id, row) for row in self._load(f"j.id in ({','.join('?' * len(batch))})", batch))
        for job_id in job_ids:
            row = rows.get(job_id)
            before = self._unfinished.get(job_id)
            if row is not None and before is not None and row.state is not before.state:
                self.on_move(before.state, row)
            if row is None or row.state.finished:
                self._unfinished.pop(job_id, None)
            else:
                self._unfinished[job_id] = row
                if row.state is JobState.PENDING and (before is None or before.state is not JobState.PENDING):
                    self._newly_pending.append(job_id)
        self._changed.update(job_ids)

    def _load(self, where: str, params: list[Any]) -> list[JobRow]:
        """Job rows (without their scripts) and their current placements, in two queries."""
        sql = f"SELECT {_JOB_COLUMNS} FROM jobs j WHERE {where} ORDER BY j.id"
        jobs = [dict(zip(_JOB_FIELDS, values)) for values in self.db.conn.execute(sql, params)]
        hosts: dict[int, Hosts] = {}
        if jobs:
            placed = ("SELECT n.job, n.node, n.gpus FROM attempt_nodes n JOIN jobs j ON j.id = n.job AND "
                      f"j.attempt = n.attempt WHERE {where} ORDER BY n.job, n.node_rank")
            for job_id, node, gpus in self.db.conn.execute(placed, params):
                hosts.setdefault(job_id, []).append((node, json.loads(gpus)))
        return [_job_row(row, hosts.get(row["id"], [])) for row in jobs]

    # --- attempts ------------------------------------------------------------------------------

    def start_attempt(self, job_id: int, attempt: int, hosts: Hosts, master_addr: str, master_port: int,
                      now: float) -> None:
        """Store a placement before any launch is sent, so a restart knows what may be running."""
        self._open_shares = None
        with self._tx():
            self._check_transition(job_id, JobState.STARTING)
            self.db.table("attempts").insert({"job": job_id, "attempt": attempt, "master_addr": master_addr,
                                              "master_port": master_port, "started_at": now})
            self.db.table("attempt_nodes").insert_all(
                {"job": job_id, "attempt": attempt, "node": node, "node_rank": rank, "gpus": json.dumps(gpus),
                 "started": 0, "exit_code": None}
                for rank, (node, gpus) in enumerate(hosts)
            )
            self.db.table("jobs").update(job_id, {"state": JobState.STARTING.value, "attempt": attempt, "reason": "",
                                                  "requeued_because": "", "started_at": now, "exit_code": None,
                                                  "failed_at": None})
        self._refresh([job_id])

    def held_gpus(self, since: float | None = None) -> list[HeldGpus]:
        """Every attempt that held GPUs at or after `since` (None: ever), oldest first."""
        sql = ("SELECT a.job, a.attempt, j.owner, a.started_at, COALESCE(a.ended_at, j.ended_at), j.attempt, j.state, "
               "(SELECT SUM(json_array_length(n.gpus)) FROM attempt_nodes n "
               "WHERE n.job = a.job AND n.attempt = a.attempt) "
               "FROM attempts a JOIN jobs j ON j.id = a.job "
               "WHERE ? IS NULL OR COALESCE(a.ended_at, j.ended_at) IS NULL "
               "OR COALESCE(a.ended_at, j.ended_at) >= ? ORDER BY a.started_at, a.job")
        held = []
        for job, attempt, owner, started, ended, current, state, gpus in self.db.conn.execute(sql, [since, since]):
            if ended is None and (attempt != current or not JobState(state).active):
                ended = started  # an attempt of an older version that left no end: nothing is counted for it
            held.append(HeldGpus(job, attempt, owner or "", gpus or 0, started, ended))
        return held

    def master(self, job_id: int, attempt: int) -> tuple[str, int]:
        row = self.db.table("attempts").get((job_id, attempt))
        return row["master_addr"], row["master_port"]

    def attempt_nodes(self, job_id: int, attempt: int) -> list[AttemptNode]:
        rows = self.db.table("attempt_nodes").rows_where("job = ? and attempt = ?", [job_id, attempt],
                                                         order_by="node_rank")
        return [_attempt_node(r) for r in rows]

    def open_attempt_nodes(self) -> list[AttemptNode]:
        """Shares of attempts whose ranks have not been reported ended: they hold their GPUs. Read
        several times a tick; kept until a write to the shares."""
        if self._open_shares is None:
            rows = self.db.table("attempt_nodes").rows_where("exit_code IS NULL", order_by="job, attempt, node_rank")
            self._open_shares = [_attempt_node(row) for row in rows]
        return list(self._open_shares)

    def open_master_ports(self, master_addr: str) -> set[int]:
        """Rendezvous ports in use on one address by attempts that still hold GPUs."""
        sql = ("SELECT DISTINCT a.master_port FROM attempts a JOIN attempt_nodes n "
               "ON n.job = a.job AND n.attempt = a.attempt WHERE n.exit_code IS NULL AND a.master_addr = ?")
        return {row["master_port"] for row in self.db.query(sql, [master_addr])}

    def mark_started(self, job_id: int, attempt: int, node: str) -> None:
        self._open_shares = None
        with self._tx():
            self.db.conn.execute("UPDATE attempt_nodes SET started = 1 WHERE job = ? AND attempt = ? AND node = ?",
                                 [job_id, attempt, node])

    def fence(self, job_id: int, attempt: int, node: str, until: float) -> bool:
        """Mark a lost node's share as given up but maybe still running; False if it already was,
        or its exit is recorded."""
        self._open_shares = None
        with self._tx():
            cur = self.db.conn.execute(
                "UPDATE attempt_nodes SET fenced_until = ? WHERE job = ? AND attempt = ? AND node = ? "
                "AND exit_code IS NULL AND fenced_until IS NULL", [until, job_id, attempt, node])
        return cur.rowcount == 1

    def record_exit(self, job_id: int, attempt: int, node: str, exit_code: int) -> bool:
        """Record one node's exit once; False when it was already recorded (a repeated report)."""
        self._open_shares = None
        with self._tx():
            cur = self.db.conn.execute(
                "UPDATE attempt_nodes SET exit_code = ? WHERE job = ? AND attempt = ? AND node = ? "
                "AND exit_code IS NULL",
                [exit_code, job_id, attempt, node])
        return cur.rowcount == 1

    # --- traffic -------------------------------------------------------------------------------

    def set_traffic(self, rows: list[tuple[int, int, int, str, int]]) -> None:
        """Store cumulative counters (job, attempt, rank, kind, bytes); a stored counter never goes down.

        Not synced to disk per commit: a power loss costing the last seconds of a counter is fine
        (jobs and nodes stay synchronous=FULL)."""
        with self._tx(durable=False):
            self.db.conn.executemany(
                "INSERT INTO traffic (job, attempt, rank, kind, bytes) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (job, attempt, rank, kind) DO UPDATE SET bytes = max(bytes, excluded.bytes)", rows)

    def traffic_counts(self, job_id: int) -> dict[tuple[int, int], dict[str, int]]:
        """One job's stored counters: (attempt, rank) -> kind -> bytes."""
        counts: dict[tuple[int, int], dict[str, int]] = {}
        for attempt, rank, kind, count in self.db.conn.execute(
                "SELECT attempt, rank, kind, bytes FROM traffic WHERE job = ?", [job_id]):
            counts.setdefault((attempt, rank), {})[kind] = count
        return counts

    def add_energy(self, rows: list[tuple[int, int, int, bool]]) -> None:
        """Add (job, attempt, millijoules, from simulated GPUs) to what each attempt's GPUs used.
        Not synced to disk per commit, like traffic."""
        with self._tx(durable=False):
            self.db.conn.executemany(
                "INSERT INTO energy (job, attempt, millijoules, simulated) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (job, attempt) DO UPDATE SET millijoules = millijoules + excluded.millijoules, "
                "simulated = max(simulated, excluded.simulated)", [(j, a, mj, int(sim)) for j, a, mj, sim in rows])

    def energy(self, job_ids: list[int]) -> dict[tuple[int, int], tuple[int, bool]]:
        """What the attempts of these jobs used: (job, attempt) -> (millijoules, any of it simulated);
        attempts whose GPUs report no energy are absent."""
        found: dict[tuple[int, int], tuple[int, bool]] = {}
        for start in range(0, len(job_ids), _BATCH):
            batch = job_ids[start:start + _BATCH]
            sql = f"SELECT job, attempt, millijoules, simulated FROM energy WHERE job IN ({','.join('?' * len(batch))})"
            for job_id, attempt, millijoules, simulated in self.db.conn.execute(sql, batch):
                found[(job_id, attempt)] = (millijoules, bool(simulated))
        return found

    def traffic_totals(self, job_ids: list[int]) -> dict[int, dict[int, dict[str, int]]]:
        """Payload bytes of jobs summed over their attempts: job -> rank -> kind -> bytes (jobs
        without traffic are absent)."""
        totals: dict[int, dict[int, dict[str, int]]] = {}
        for start in range(0, len(job_ids), _BATCH):
            batch = job_ids[start:start + _BATCH]
            sql = (f"SELECT job, rank, kind, sum(bytes) FROM traffic WHERE job IN ({','.join('?' * len(batch))}) "
                   "GROUP BY job, rank, kind")
            for job_id, rank, kind, count in self.db.conn.execute(sql, batch):
                totals.setdefault(job_id, {}).setdefault(rank, {})[kind] = count
        return totals


class _Checkpointer(threading.Thread):
    """Copies the WAL into the database file every CHECKPOINT_EVERY seconds, on its own connection.

    SQLite's automatic checkpoint runs inside the commit that crosses its threshold, on the thread
    that commits: the coordinator's event loop, which then stalled for up to a second with a large
    database (a submit answered in 960 ms instead of 7). A passive checkpoint never blocks the writer."""

    def __init__(self, path: Path) -> None:
        super().__init__(name="sqlite-checkpoint", daemon=True)
        self.path = path
        self._stopped = threading.Event()

    def run(self) -> None:
        conn = sqlite3.connect(self.path, check_same_thread=False)
        try:
            while not self._stopped.wait(CHECKPOINT_EVERY):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:  # a full disk: the WAL keeps the data; try again later
                    log.warning("could not checkpoint the coordinator's database: %s", exc)
        finally:
            conn.close()

    def stop(self) -> None:
        self._stopped.set()
        self.join(timeout=10)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, so each write is one transaction, durable unless told otherwise."""

    def __init__(self, conn: sqlite3.Connection, durable: bool, path: Path) -> None:
        self.conn = conn
        self.durable = durable
        self.path = path

    def __enter__(self) -> sqlite3.Connection:
        if not self.durable:
            self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: Any, exc: BaseException | None, _: Any) -> None:
        try:
            if exc_type:
                self._rollback()
            else:
                try:
                    self.conn.execute("COMMIT")
                except sqlite3.Error as failed:
                    self._rollback()
                    exc = failed
        finally:
            if not self.durable:
                self.conn.execute("PRAGMA synchronous=FULL")
        if _disk_full(exc):
            raise StoreFull(f"the coordinator's disk is full at {self.path.parent}; nothing was stored "
                            "(free some space there: it goes on by itself)") from exc
        if exc is not None and not exc_type:
            raise exc


    def _rollback(self) -> None:
        """Roll back, if SQLite has not already (it does by itself after some errors)."""
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")


# SQLite's result code for a full disk: sqlite3.SQLITE_FULL, but the module has it (and errors their
# `sqlite_errorcode`) only from Python 3.11; on 3.10 only the OSError below is recognised.
_SQLITE_FULL = 13


def _disk_full(exc: BaseException | None) -> bool:
    return (isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL) or (
        isinstance(exc, OSError) and exc.errno == errno.ENOSPC)


def _add_missing_columns(table: sqlite_utils.db.Table, columns: dict[str, type]) -> None:
    """Columns added since a state directory was created: an upgraded coordinator keeps its jobs."""
    have = table.columns_dict
    for name, kind in columns.items():
        if name not in have:
            table.add_column(name, kind)


def _inserted_id(table: sqlite_utils.db.Table) -> int:
    """The id of the row `table.insert` just wrote: sqlite-utils types `last_pk` as maybe None, which it
    is not after an insert of one row."""
    assert table.last_pk is not None
    return int(table.last_pk)


def _new_job(spec: JobSpec, now: float, owner: str) -> dict[str, Any]:
    """The row of a job just submitted."""
    return {"name": spec.name, "spec": _spec_json(spec), "script": spec.run.script, "state": JobState.PENDING.value,
            "reason": "waiting for the scheduler", "priority": spec.priority, "submitted_at": now, "attempt": 0,
            "restarts": 0, "owner": owner}


def _spec_json(spec: JobSpec) -> str:
    data = spec.to_wire()
    del data["run"]["script"]
    data["run"]["requirements"] = {name: base64.b64encode(text).decode()
                                   for name, text in spec.run.requirements.items()}
    return json.dumps(data)


def _spec_of(text: str) -> JobSpec:
    """A stored spec. One stored before issue 26 keeps its run's fields at the top, beside the
    scheduling ones: they are gathered into its run as they are read, so an upgraded coordinator
    keeps its jobs without rewriting every row of its history."""
    data = json.loads(text)
    run = data.pop("run") if "run" in data else {name: data.pop(name) for name in _RUN_FIELDS if name in data}
    run["requirements"] = {name: base64.b64decode(text) for name, text in run.get("requirements", {}).items()}
    return JobSpec(**data, run=RunSpec(**run))


_RUN_FIELDS = tuple(RunSpec.__dataclass_fields__)


_JOB_FIELDS = ("id", "spec", "state", "reason", "submitted_at", "started_at", "ended_at", "attempt", "exit_code",
               "restarts", "requeued_because", "failed_at", "owner", "array_job", "array_index")
_JOB_COLUMNS = ", ".join(f"j.{name}" for name in _JOB_FIELDS)


def _job_row(row: dict[str, Any], hosts: Hosts) -> JobRow:
    return JobRow(
        id=row["id"], spec=_spec_of(row["spec"]), state=JobState(row["state"]), reason=row["reason"] or "",
        submitted_at=row["submitted_at"], started_at=row["started_at"], ended_at=row["ended_at"],
        attempt=row["attempt"] or 0, exit_code=row["exit_code"], restarts=row["restarts"] or 0,
        requeued_because=row["requeued_because"] or "", failed_at=row["failed_at"], hosts=hosts,
        owner=row["owner"] or "", array_job=row["array_job"], array_index=row["array_index"],
    )


def _user_row(row: dict[str, Any]) -> UserRow:
    return UserRow(name=row["name"], secret_hash=row["secret_hash"], admin=bool(row["admin"]),
                   max_gpus=row["max_gpus"], created_at=row["created_at"])


def _cordon_row(row: dict[str, Any]) -> CordonRow:
    return CordonRow(node=row["node"], gpu=row["gpu"], uuid=row["uuid"] or "", faults=tuple(json.loads(row["faults"])),
                     since=row["since"], cordoned=bool(row["cordoned"]),
                     acknowledged=tuple(json.loads(row["acknowledged"])))


def _node_row(row: dict[str, Any]) -> NodeRow:
    return NodeRow(name=row["name"], hostname=row["hostname"], address=row["address"],
                   simulated=bool(row["simulated"]), gpus=_readings(row["gpus"]),
                   state=NodeState(row["state"]), draining=bool(row["draining"]), joined_at=row["joined_at"],
                   last_seen=row["last_seen"])


def _readings(text: str | None) -> list[GpuReading]:
    """A node's stored readings; ones this version cannot read are only not shown until it reports."""
    try:
        return typed(json.loads(text or "[]"), list[GpuReading], "gpus")
    except (ShapeError, ValueError):
        return []


def _attempt_node(row: dict[str, Any]) -> AttemptNode:
    return AttemptNode(job=row["job"], attempt=row["attempt"], node=row["node"], node_rank=row["node_rank"],
                       gpus=json.loads(row["gpus"]), started=bool(row["started"]), exit_code=row["exit_code"],
                       fenced_until=row["fenced_until"])

