"""The store on a real SQLite file: durability settings, a job's life, and traffic counters."""

from __future__ import annotations

import base64
import json
import sqlite3

from gpudeck.coordinator.store import Store
from gpudeck.coordinator.traffic import PERSIST_EVERY, TrafficBook
from gpudeck.model import JobSpec, JobState, NodeState, RunSpec
from gpudeck.protocol.payloads import GpuReading


def _spec(script: bytes = b"print()\n", **fields) -> JobSpec:
    return JobSpec(**{"name": "t", "run": RunSpec(script_name="t.py", script=script), "gpus": 2, **fields})


def _gpu(index: int) -> GpuReading:
    return GpuReading(index=index, name="g", uuid=f"u{index}", memory_total=None, memory_used=None,
                      utilization=None, temperature=None, power=None, power_limit=None)


def test_wal_and_full_sync_are_set_and_survive_a_reopen(tmp_path):
    path = tmp_path / "g.db"
    store = Store(path)
    assert store.db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    job_id = store.add_job(_spec(), 1.0, "ada")
    store.set_traffic([(job_id, 1, 0, "all_reduce", 10)])
    assert store.db.conn.execute("PRAGMA synchronous").fetchone()[0] == 2, "traffic writes restore FULL"
    store.close()
    other = sqlite3.connect(path)  # another process' view: committed means on disk
    assert other.execute("SELECT name, state FROM jobs").fetchall() == [("t", "pending")]


def test_a_job_attempt_from_placement_to_exits(tmp_path):
    store = Store(tmp_path / "g.db")
    job_id = store.add_job(_spec(script=b"\x00\xff binary is kept"), 1.0, "ada")
    assert store.script(job_id) == b"\x00\xff binary is kept"
    row = store.job(job_id)
    assert row is not None and row.spec.run.script == b"", "rows never carry the script"
    store.start_attempt(job_id, 1, [("a", [0]), ("b", [1])], "10.0.0.1", 29500, 2.0)
    row = store.job(job_id)
    assert row is not None
    assert row.state is JobState.STARTING and row.hosts == [("a", [0]), ("b", [1])]
    assert store.open_master_ports("10.0.0.1") == {29500}
    assert [s.node for s in store.open_attempt_nodes()] == ["a", "b"]
    assert store.record_exit(job_id, 1, "a", 0) is True
    assert store.record_exit(job_id, 1, "a", 0) is False, "a repeated report is recorded once"
    store.record_exit(job_id, 1, "b", 0)
    assert store.open_attempt_nodes() == [] and store.open_master_ports("10.0.0.1") == set()


def test_traffic_counters_never_go_down_and_sum_over_attempts(tmp_path):
    store = Store(tmp_path / "g.db")
    job_id = store.add_job(_spec(), 1.0, "ada")
    book = TrafficBook(store)
    book.record(job_id, 1, {0: {"all_reduce": 100}, 1: {"all_reduce": 100}})
    book.record(job_id, 1, {0: {"all_reduce": 40}})  # a stale, reordered report
    book.record(job_id, 2, {0: {"all_reduce": 5, "send": 7}})
    totals = {0: {"all_reduce": 105, "send": 7}, 1: {"all_reduce": 100}}
    assert book.totals([job_id]) == {job_id: totals}
    assert store.traffic_totals([job_id]) == {}, "nothing written before the persist interval"
    book.persist(now=PERSIST_EVERY)
    assert store.traffic_totals([job_id]) == {job_id: totals}
    book.record(job_id, 2, {0: {"send": 9}})
    book.persist(now=PERSIST_EVERY + 1)
    assert store.traffic_totals([job_id])[job_id][0]["send"] == 7, "at most one write per interval"
    book.persist_job(job_id, finished=True)
    assert store.traffic_totals([job_id])[job_id][0]["send"] == 9, "an ended attempt is written at once"
    again = TrafficBook(store)
    assert again.totals([job_id, 999]) == {job_id: {0: {"all_reduce": 105, "send": 9}, 1: {"all_reduce": 100}}, 999: {}}
    again.record(job_id, 2, {0: {"send": 10}})
    assert again.totals([job_id])[job_id][0] == {"all_reduce": 105, "send": 10}, "history is loaded with a live job"


def test_the_queue_in_memory_follows_every_write_and_reports_what_changed(tmp_path):
    path = tmp_path / "g.db"
    store = Store(path)
    first, second = store.add_job(_spec(), 1.0, "ada"), store.add_job(_spec(), 1.0, "ada")
    assert [row.id for row in store.take_changed()] == [first, second]
    assert store.take_changed() == []
    store.set_reasons({first: "needs 2 GPUs", second: "waiting for the scheduler"})
    assert [row.reason for row in store.take_changed()] == ["needs 2 GPUs"], "an unchanged reason is no change"
    store.start_attempt(second, 1, [("a", [0, 1])], "10.0.0.1", 29500, 2.0)
    assert [row.id for row in store.jobs((JobState.PENDING,))] == [first]
    store.transition(second, JobState.CANCELLED, ended_at=3.0)
    assert [(row.id, row.state) for row in store.take_changed()] == [(second, JobState.CANCELLED)]
    assert [row.id for row in store.jobs((JobState.PENDING, JobState.STARTING))] == [first]
    reopened = Store(path)
    assert reopened.jobs((JobState.PENDING,)) == store.jobs((JobState.PENDING,))
    row = reopened.job(second)
    assert row == store.job(second) and row is not None and row.hosts == [("a", [0, 1])]


def test_nodes_keep_their_join_time(tmp_path):
    store = Store(tmp_path / "g.db")
    store.upsert_node("a", "host-a", "10.0.0.1", True, [_gpu(0)], 5.0)
    store.set_node_state("a", NodeState.DOWN)
    store.upsert_node("a", "host-a", "10.0.0.2", True, [_gpu(0)], 9.0)
    node = store.node("a")
    assert node is not None
    assert (node.joined_at, node.last_seen, node.address, node.state) == (5.0, 9.0, "10.0.0.2", NodeState.UP)


def test_an_array_is_one_row_per_task_stored_at_once_with_one_copy_of_the_script(tmp_path):
    store = Store(tmp_path / "g.db")
    single = store.add_job(_spec(), 1.0, "ada")
    array = store.add_array(_spec(array="0,3,5"), 1.0, "ada", [0, 3, 5])
    tasks = [row for row in store.jobs() if row.array_job == array]
    assert [(row.id, row.array_index) for row in tasks] == [(array, 0), (array + 1, 3), (array + 2, 5)]
    assert store.script(array + 2) == b"print()\n"
    assert store.db.conn.execute("SELECT count(*) FROM jobs WHERE script IS NOT NULL").fetchone()[0] == 2
    task = store.task(array, 3)
    assert task is not None and task.id == array + 1 and store.task(array, 1) is None
    store.transition_all([array, array + 1], JobState.CANCELLED, ended_at=2.0)
    assert store.states_of([single, array, array + 1, 99]) == {
        single: ("pending", {}), array: ("cancelled", {"cancelled": 2, "pending": 1}), array + 1: ("cancelled", {})}
    assert [row.id for row in store.unfinished_tasks(array)] == [array + 2]


def test_a_state_dir_from_before_arrays_keeps_its_jobs(tmp_path):
    path = tmp_path / "g.db"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, name TEXT NOT NULL, spec TEXT NOT NULL, script BLOB, "
                "state TEXT NOT NULL, reason TEXT, priority INTEGER, submitted_at FLOAT NOT NULL, started_at FLOAT, "
                "ended_at FLOAT, attempt INTEGER, exit_code INTEGER, restarts INTEGER, requeued_because TEXT)")
    old.execute("INSERT INTO jobs (name, spec, script, state, submitted_at, attempt, restarts) VALUES "
                "('t', '{\"name\": \"t\", \"gpus\": 1, \"workload\": \"pipeline\"}', NULL, 'pending', 1.0, 0, 0)")
    old.commit()
    old.close()
    row = Store(path).job(1)
    assert row is not None
    assert (row.state, row.array_job, row.array_index, row.spec.after, row.spec.array) == (
        JobState.PENDING, None, None, [], "")


def test_a_job_stored_before_its_run_was_nested_reads_back_with_the_same_values(tmp_path):
    """Before issue 26 a stored spec kept its run's fields at its top, beside the scheduling ones:
    an upgraded coordinator reads them into the spec's run, and the job keeps every value."""
    path = tmp_path / "g.db"
    store = Store(path)
    job_id = store.add_job(_spec(), 1.0, "ada")
    store.close()
    flat = {"name": "t", "gpus": None, "nodes": 2, "gpus_per_node": 1, "priority": 3, "time_limit": 60.0,
            "max_restarts": 1, "script_name": "t.py", "workload": "", "args": ["--steps", "5"], "workdir": "",
            "project": "a" * 64, "project_files": 2, "project_bytes": 10, "project_uploaded": 4, "subdir": "src",
            "command": [], "env": {"SEED": "1"}, "python": "", "venv": "",
            "requirements": {"requirements.txt": base64.b64encode(b"numpy\n").decode()}, "image": "",
            "launcher": "torchrun", "preemptible": True, "after": ["7"], "after_any": [], "array": "",
            "hang_timeout": 30.0, "on_nodes": []}
    old = sqlite3.connect(path)
    old.execute("UPDATE jobs SET spec = ? WHERE id = ?", [json.dumps(flat), job_id])
    old.commit()
    old.close()
    store = Store(path)
    row = store.job(job_id)
    assert row is not None and row.spec == JobSpec(
        name="t", nodes=2, gpus_per_node=1, priority=3, time_limit=60.0, max_restarts=1, project_files=2,
        project_bytes=10, project_uploaded=4, preemptible=True, after=["7"], hang_timeout=30.0,
        run=RunSpec(script_name="t.py", args=["--steps", "5"], project="a" * 64, subdir="src", env={"SEED": "1"},
                    requirements={"requirements.txt": b"numpy\n"}, launcher="torchrun"))
    assert store.script(job_id) == b"print()\n"
    fresh = store.job(store.add_job(row.spec, 2.0, "ada"))
    assert fresh is not None and fresh.spec == row.spec, "stored again, now nested, it reads back the same"
