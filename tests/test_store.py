"""The store on a real SQLite file: durability settings, a job's life, and traffic counters."""

from __future__ import annotations

import sqlite3

from gpudeck.coordinator.store import Store
from gpudeck.coordinator.traffic import PERSIST_EVERY, TrafficBook
from gpudeck.model import JobSpec, JobState, NodeState


def _spec(**fields) -> JobSpec:
    return JobSpec(**{"name": "t", "script_name": "t.py", "script": b"print()\n", "gpus": 2, **fields})


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
    assert store.job(job_id).spec.script == b"", "rows never carry the script"
    store.start_attempt(job_id, 1, [("a", [0]), ("b", [1])], "10.0.0.1", 29500, 2.0)
    row = store.job(job_id)
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
    assert reopened.job(second) == store.job(second) and reopened.job(second).hosts == [("a", [0, 1])]


def test_nodes_keep_their_join_time(tmp_path):
    store = Store(tmp_path / "g.db")
    store.upsert_node("a", "host-a", "10.0.0.1", True, [{"index": 0}], 5.0)
    store.set_node_state("a", NodeState.DOWN)
    store.upsert_node("a", "host-a", "10.0.0.2", True, [{"index": 0}], 9.0)
    node = store.node("a")
    assert (node.joined_at, node.last_seen, node.address, node.state) == (5.0, 9.0, "10.0.0.2", NodeState.UP)
