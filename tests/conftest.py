from __future__ import annotations

import os
from pathlib import Path
from typing import Generator, Iterator

import pytest

from tests.cluster import Cluster

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "tests" / "scripts"

# The files that take longest, longest first (their sums of --durations=0 on this 2-core machine).
# pytest-xdist hands its two workers one file at a time in collection order, and the longest file,
# tests/workloads/, came last: one worker ran it for minutes after the other had run out of files.
# Handed out first, the long files overlap and the short ones fill the end. `--no-loadscope-reorder`
# (pyproject.toml) keeps xdist from reordering files by their number of tests instead.
LONGEST_FIRST = (
    "tests/workloads/test_workloads.py", "tests/test_launchers.py", "tests/test_packaging.py",
    "tests/test_cluster.py", "tests/test_trust.py", "tests/test_users.py", "tests/test_preemption.py",
    "tests/test_web.py", "tests/train/test_train_run.py", "tests/workloads/test_workload_cluster.py",
    "tests/test_slow_peers.py", "tests/tui/test_live.py", "tests/test_doctor_netns.py",
    "tests/test_project_jobs.py", "tests/test_stragglers.py", "tests/test_fair_scheduling.py",
    "tests/test_dependencies.py",
)

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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    missing = [path for path in LONGEST_FIRST if not (ROOT / path).is_file()]
    if missing:
        raise pytest.UsageError(f"tests/conftest.py's LONGEST_FIRST names files that are gone: {', '.join(missing)}")
    place = {path: index for index, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: place.get(item.nodeid.split("::")[0], len(place)))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
        item: pytest.Item, call: pytest.CallInfo,
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
