"""Dashboard tests: fixed time zone for every screen; helpers to wait on the app and read its tables."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.cluster import Cluster

os.environ["TZ"] = "UTC"
time.tzset()


@pytest.fixture
def one_node(tmp_path: Path) -> Iterator[Cluster]:
    """A real coordinator and one agent with 1 simulated GPU, for a live dashboard."""
    cluster = Cluster(tmp_path)
    cluster.start_coordinator()
    cluster.start_agent("node-a", 1)
    try:
        cluster.wait_nodes("up", 1)
        yield cluster
    finally:
        cluster.stop()
