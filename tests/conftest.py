from __future__ import annotations

import os
from pathlib import Path
from typing import Generator, Iterator

import pytest

from tests.cluster import Cluster

SCRIPTS = Path(__file__).resolve().parent / "scripts"

# pytest-xdist's workers export COLUMNS=80 and LINES=24, which a user's shell does not; a dashboard a
# test starts on a terminal of its own would take them over that terminal's size (and word its header
# for 80 columns on a 160-column screen).
for _size in ("COLUMNS", "LINES"):
    os.environ.pop(_size, None)


def _start(tmp: Path, agents: tuple[str, ...]) -> Cluster:
    cluster = Cluster(tmp)
    cluster.start_coordinator()
    for name in agents:
        cluster.start_agent(name)
    cluster.wait_nodes("up", len(agents))
    return cluster


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """A fresh coordinator and two agents with 2 simulated GPUs each, as real processes."""
    running = _start(tmp_path, ("node-a", "node-b"))
    yield running
    running.stop()
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        for name in ("coordinator", "node-a", "node-b"):
            print(f"--- {name} log\n{running.logs_of(name)[-4000:]}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
        item: pytest.Item, call: pytest.CallInfo,
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
