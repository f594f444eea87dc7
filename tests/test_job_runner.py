"""The agent's `JobRunner` without launching ranks: adopting what an earlier agent left, what it
reports, resuming logs where the coordinator's copy ends, a repeated launch. A recording `send`, a
real state directory and a real traffic sink; each test runs in milliseconds (the launch itself, with
torchrun, is proven by the real-process tests)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from gpudeck.agent.attempts import RunningJob
from gpudeck.agent.gpus import SimulatedBackend
from gpudeck.agent.runner import JobRunner
from gpudeck.agent.traffic_sink import TrafficSink
from gpudeck.protocol.messages import Message
from gpudeck.model import RunSpec
from gpudeck.protocol.node_messages import JobExited, JobStarted, Launch, LogChunk
from gpudeck.protocol.payloads import JobReport

CLUSTER = "c0ffee0000000000"


class Recorder:
    def __init__(self) -> None:
        self.sent: list[Message] = []

    async def __call__(self, message: Message) -> bool:
        self.sent.append(message)
        return True


def _runner(state: Path) -> tuple[JobRunner, Recorder, TrafficSink]:
    sent, sink = Recorder(), TrafficSink()
    runner = JobRunner(state, CLUSTER, "node-a", sink, SimulatedBackend(2, seed=1), sent)
    runner.shipper.logs_resumed.set()
    return runner, sent, sink


def _left_behind(state: Path, job: int, cluster: str, exit_code: int | None, logs: dict[int, bytes]) -> Path:
    """What an agent that was stopped leaves of one attempt: its record, its logs, maybe an exit code."""
    directory = state / "jobs" / f"{job}-1"
    (directory / "logs").mkdir(parents=True)
    RunningJob("node-a", job, 1, 0, [0], str(directory), pgid=0, cluster=cluster).save()
    for rank, data in logs.items():
        (directory / "logs" / f"rank-{rank}.log").write_bytes(data)
    if exit_code is not None:
        (directory / "exit_code").write_text(str(exit_code))
    return directory


async def _until(predicate) -> None:  # noqa: ANN001
    while not predicate():
        await asyncio.sleep(0.01)


def test_ranks_that_ended_while_no_agent_ran_are_reported_with_their_code(tmp_path: Path):
    _left_behind(tmp_path, 4, CLUSTER, exit_code=3, logs={})
    _left_behind(tmp_path, 5, "another-cluster", exit_code=0, logs={})

    async def scenario() -> None:
        runner, sent, sink = _runner(tmp_path)
        runner.adopt()
        assert list(runner.jobs) == [(4, 1)], "another cluster's attempt is not this agent's"
        await asyncio.wait_for(_until(lambda: any(isinstance(m, JobExited) for m in sent.sent)), 10)
        (exited,) = [m for m in sent.sent if isinstance(m, JobExited)]
        assert (exited.job, exited.attempt, exited.exit_code, exited.retry) == (4, 1, 3, False)
        assert runner.report() == [JobReport(job=4, attempt=1, exit_code=3, detail=exited.detail, retry=False,
                                             failed_at=exited.failed_at)]
        assert json.loads((tmp_path / "jobs" / "4-1" / "exit.json").read_text())["exit_code"] == 3
        runner.forget(4, 1)
        assert runner.report() == []
        await runner.shutdown(kill_jobs=False)
        sink.close()

    asyncio.run(scenario())


def test_logs_resume_where_the_coordinators_copy_ends(tmp_path: Path):
    _left_behind(tmp_path, 7, CLUSTER, exit_code=None, logs={0: b"0123456789", 1: b"abc"})

    async def scenario() -> None:
        runner, sent, sink = _runner(tmp_path)
        runner.jobs[(7, 1)] = job = RunningJob("node-a", 7, 1, 0, [0], str(tmp_path / "jobs" / "7-1"),
                                               cluster=CLUSTER)
        runner.reconnected()
        assert not runner.shipper.logs_resumed.is_set(), "logs wait until the coordinator says what it has"
        runner.resume_logs({"7:1": {0: 4}, "9:9": {0: 1}})
        await runner.shipper.ship_logs(job)
        chunks = {(m.rank, m.offset): m.data for m in sent.sent if isinstance(m, LogChunk)}
        assert chunks == {(0, 4): b"456789", (1, 0): b"abc"}
        await runner.shipper.ship_logs(job)
        assert len([m for m in sent.sent if isinstance(m, LogChunk)]) == 2, "nothing new, nothing sent"
        sink.close()

    asyncio.run(scenario())


def test_a_repeated_launch_of_a_running_attempt_only_says_it_started(tmp_path: Path):
    async def scenario() -> None:
        runner, sent, sink = _runner(tmp_path)
        runner.jobs[(3, 2)] = RunningJob("node-a", 3, 2, 0, [0], str(tmp_path / "x"), pgid=4242, cluster=CLUSTER)
        await runner.launch(Launch(job=3, attempt=2, node_rank=0, nnodes=1, gpus=[0], master_addr="127.0.0.1",
                                   master_port=29500, run=RunSpec(script_name="t.py", script=b"print()")))
        assert sent.sent == [JobStarted(job=3, attempt=2, pid=4242)]
        assert not (tmp_path / "jobs").exists(), "nothing was started again"
        sink.close()

    asyncio.run(scenario())
