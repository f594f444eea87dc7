"""A full disk says what happened and loses nothing already stored: the coordinator's state directory
and an agent's job directory each on a small tmpfs of their own, filled up while the cluster runs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.cluster import Cluster
from tests.conftest import SCRIPTS

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def fill(directory: Path) -> Path:
    """Write until the file system says it is full."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * (1 << 16)):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def _submit(cluster: Cluster, script: Path, *how: str) -> subprocess.CompletedProcess[str]:
    """Submit, the client flags before the script so that they are not taken as its arguments."""
    return cluster.cli("submit", "--coordinator", f"127.0.0.1:{cluster.port}", "--token", cluster.token,
                       "--gpus", "1", *how, str(script), check=False, client=False)


def test_a_full_coordinator_disk_refuses_with_a_sentence_keeps_its_jobs_and_recovers(tmp_path: Path, small_disk):
    state = small_disk("coord-disk", "24m")
    cluster = Cluster(tmp_path, coordinator_state=state)
    try:
        cluster.start_coordinator()
        cluster.start_agent("node-a")
        cluster.wait_nodes("up", 1)
        cluster.cli("drain", "node-a")  # jobs stay queued: only the store is under test
        big = tmp_path / "big_script.py"
        big.write_text("# " + "x" * (900 * 1024) + "\n")
        kept = [int(_submit(cluster, big, "--no-project").stdout) for _ in range(2)]
        filler = fill(state)
        for _ in range(40):  # the WAL may still hold free pages for a few submits
            refused = _submit(cluster, big, "--no-project")
            if refused.returncode != 0:
                break
            kept.append(int(refused.stdout))
        assert refused.returncode == 1, "the submits never hit the full disk"
        assert f"the coordinator's disk is full at {state}; nothing was stored" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
        assert [job["id"] for job in cluster.json("jobs")] == kept, "every stored job is still there"
        project = tmp_path / "project"
        project.mkdir()
        (project / "train.py").write_text("# " + "y" * (900 * 1024) + "\n")
        shipped = _submit(cluster, project / "train.py")
        assert shipped.returncode == 1 and "Traceback" not in shipped.stderr
        assert f"the coordinator's disk is full at {state / 'projects'}; the project was not stored" in shipped.stderr
        filler.unlink()
        assert _submit(cluster, SCRIPTS / "ddp_linear.py").returncode == 0, "it goes on once there is space"
    finally:
        cluster.stop()


def test_an_agent_that_cannot_write_its_job_directory_fails_the_job_with_the_reason(tmp_path: Path, small_disk):
    agent_state = small_disk("agent-disk", "4m")
    cluster = Cluster(tmp_path)
    try:
        cluster.start_coordinator()
        cluster.spawn("node-a", "agent", "--coordinator", f"127.0.0.1:{cluster.port}", "--token", cluster.token,
                      "--name", "node-a", "--simulate-gpus", "2", "--no-mdns", "--state-dir", str(agent_state))
        cluster.wait_nodes("up", 1)
        fill(agent_state)
        job = cluster.wait_job(int(_submit(cluster, SCRIPTS / "ddp_linear.py", "--no-project").stdout),
                               ("succeeded", "failed"))
        assert job["state"] == "failed", job
        assert "could not write the job's directory" in job["reason"] and "No space left" in job["reason"], job
        shipped = cluster.wait_job(int(_submit(cluster, SCRIPTS / "ddp_linear.py").stdout), ("succeeded", "failed"))
        assert shipped["state"] == "failed", shipped
        assert "could not copy the project to node-a" in shipped["reason"], shipped
        assert "No space left" in shipped["reason"], shipped
        assert cluster.nodes()[0]["state"] == "up", "the agent stays connected"
    finally:
        cluster.stop()
