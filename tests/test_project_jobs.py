"""Real projects on a real cluster: the directory shipped and copied on every node, an environment
built with real uv from a requirements file, any command, and the refusals, each in one sentence."""

from __future__ import annotations

import asyncio
import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpudeck.agent.containers import find_runtime
from gpudeck.agent.environments import uv_binary
from tests.cluster import Cluster, wait_until
from tests.conftest import SCRIPTS

pytestmark = pytest.mark.slow
ENDED = ("succeeded", "failed", "cancelled")
GRAD_BYTES = 2080 * 4  # ddp_linear.py's Linear(64, 32): 2,080 float32 parameters
SMALL_PACKAGE = "humanize"  # pure Python, small, and not among gpudeck's dependencies

TRAIN = '''\
import os, sys
import humanize
import mypkg
from mypkg.config import load
cfg = load("config.ini")
print(f"rank {os.environ['RANK']} {mypkg.GREETING} lr={cfg['lr']} {humanize.naturalsize(2048)} in {os.getcwd()}")
if os.environ["RANK"] == "0":
    with open(os.path.join(os.environ["GPUDECK_OUTPUT_DIR"], "result.txt"), "w") as out:
        out.write(f"trained with lr={cfg['lr']}\\n")
'''


@functools.cache
def _index_unreachable() -> str:
    """Why uv cannot install a package from an index here, or "" when it can."""
    uv = uv_binary()
    if uv is None:
        return "uv is not installed (it comes with gpudeck[train])"
    probe = subprocess.run([uv, "pip", "compile", "-", "--no-cache", "--quiet"], input=SMALL_PACKAGE,
                           capture_output=True, text=True, timeout=120)
    return "" if probe.returncode == 0 else f"uv cannot reach a package index here: {probe.stderr.strip()[-200:]}"


def _needs_index() -> None:
    reason = _index_unreachable()
    if reason:
        pytest.skip(reason)


def _project(root: Path) -> Path:
    (root / "mypkg").mkdir(parents=True)
    (root / "mypkg" / "__init__.py").write_text('GREETING = "hello from mypkg"\n')
    (root / "mypkg" / "config.py").write_text(
        "def load(path):\n    return dict(line.strip().split('=', 1) for line in open(path) if '=' in line)\n")
    (root / "config.ini").write_text("lr=0.25\n")
    (root / "train.py").write_text(TRAIN)
    (root / "requirements.txt").write_text(f"{SMALL_PACKAGE}\n")
    (root / ".gitignore").write_text("checkpoints/\n")
    (root / "checkpoints").mkdir()
    (root / "checkpoints" / "huge.pt").write_bytes(b"\0" * 4096)
    return root


def _finished(cluster: Cluster, job_id: int) -> dict:
    return cluster.wait_job(job_id, ENDED, timeout=180)


def test_a_project_with_its_own_requirements_runs_on_two_nodes_after_its_source_is_gone(cluster: Cluster,
                                                                                       tmp_path: Path):
    _needs_index()
    agent_python = subprocess.run([sys.executable, "-c", f"import {SMALL_PACKAGE}"], capture_output=True)
    assert agent_python.returncode != 0, f"{SMALL_PACKAGE} must not be in the agent's environment for this test"
    source = _project(tmp_path / "project")
    first = cluster.submit_json("--nodes", "2", "--gpus-per-node", "1", "--requirements", "requirements.txt",
                                "train.py", cwd=source)
    shutil.move(source, tmp_path / "moved-away")
    assert first["project"]["files"] == 6, first["project"]  # the ignored checkpoint is not among them
    assert first["project"]["uploaded_bytes"] == first["project"]["bytes"] > 0
    assert cluster.job(first["id"])["project"] == first["project"], "show --json has what submit --json had"
    job = _finished(cluster, first["id"])
    assert job["state"] == "succeeded", (job, cluster.cli("logs", str(first["id"]), "--launcher").stdout)
    logs = cluster.cli("logs", str(first["id"])).stdout
    for rank in (0, 1):
        assert f"rank {rank} hello from mypkg lr=0.25 2.0 kB in " in logs, logs
    launcher = cluster.cli("logs", str(first["id"]), "--launcher").stdout
    assert launcher.count("building the environment for requirements.txt with uv") == 2, launcher
    assert list(job["outputs"]) in (["node-a"], ["node-b"]), job["outputs"]  # rank 0's node only
    assert list(job["outputs"].values())[0] == [{"path": "result.txt", "size": len("trained with lr=0.25\n")}]
    shown = cluster.cli("show", str(first["id"])).stdout
    assert "outputs   result.txt (21 B, node-" in shown and f"fetch with `gpudeck outputs {first['id']}`" in shown
    fetched = cluster.cli("outputs", str(first["id"]), "--to", str(tmp_path / "results"))
    assert (tmp_path / "results" / "result.txt").read_text() == "trained with lr=0.25\n"
    assert "1 file of job" in fetched.stderr
    again = cluster.cli("outputs", str(first["id"]), "--to", str(tmp_path / "results"), check=False)
    assert again.returncode == 1 and "result.txt already exists" in again.stderr, "nothing is overwritten"
    cluster.cli("outputs", str(first["id"]))  # run in the cluster's root: gpudeck-outputs/JOB there
    assert (cluster.root / "gpudeck-outputs" / str(first["id"]) / "result.txt").read_text() == "trained with lr=0.25\n"
    assert not list((cluster.root / "node-a" / "jobs").glob("*/work")), "working copies go when the job ends"

    shutil.move(tmp_path / "moved-away", source)
    second = cluster.submit_json("--nodes", "2", "--gpus-per-node", "1", "--requirements", "requirements.txt",
                                 "train.py", cwd=source)
    assert second["project"]["uploaded_bytes"] == 0 and second["project"]["bytes"] == first["project"]["bytes"]
    job = _finished(cluster, second["id"])
    assert job["state"] == "succeeded", job
    launcher = cluster.cli("logs", str(second["id"]), "--launcher").stdout
    assert "building the environment" not in launcher
    assert launcher.count("using the environment built earlier on this node") == 2, launcher


GATE_BACKEND = '''\
"""A build backend that waits for a file named open beside it: a build that lasts exactly as long as
the test wants."""
import os, time, zipfile

HERE = os.path.dirname(os.path.abspath(__file__))


def get_requires_for_build_wheel(config_settings=None):
    return []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    while not os.path.exists(os.path.join(HERE, "open")):
        time.sleep(0.05)
    name = "gatepkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as wheel:
        wheel.writestr("gatepkg/__init__.py", "OPENED = True\\n")
        wheel.writestr("gatepkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\\nName: gatepkg\\nVersion: 1.0\\n")
        wheel.writestr("gatepkg-1.0.dist-info/WHEEL",
                       "Wheel-Version: 1.0\\nGenerator: test\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n")
        wheel.writestr("gatepkg-1.0.dist-info/RECORD", "")
    return name
'''


def _gated_package(root: Path, requires: str = "") -> Path:
    """A local package (no index needed) whose build waits for `root / "open"`; its wheel requires
    `requires` when given."""
    root.mkdir(parents=True)
    (root / "pyproject.toml").write_text('[build-system]\nrequires = []\nbuild-backend = "gate_backend"\n'
                                         'backend-path = ["."]\n\n[project]\nname = "gatepkg"\nversion = "1.0"\n')
    metadata = f"\\nRequires-Dist: {requires}" if requires else ""
    (root / "gate_backend.py").write_text(GATE_BACKEND.replace("Version: 1.0\\n", f"Version: 1.0{metadata}\\n", 1))
    return root


def _gated_project(root: Path, script: str) -> tuple[Path, Path]:
    """A project whose requirements.txt names the gated package, and that package."""
    gate = _gated_package(root / "gatepkg")
    project = root / "project"
    project.mkdir()
    (project / "requirements.txt").write_text(f"gatepkg @ {gate.as_uri()}\n")
    (project / "train.py").write_text(script)
    return gate, project


def test_jobs_wanting_one_environment_at_once_build_it_once_and_say_so_while_it_builds(cluster: Cluster,
                                                                                     tmp_path: Path):
    gate, project = _gated_project(tmp_path, "import gatepkg\nprint('gate opened:', gatepkg.OPENED)\n")
    cluster.cli("drain", "node-b")  # both jobs on node-a, at the same time
    jobs = [cluster.submit_json("--gpus", "1", "--requirements", "requirements.txt", "train.py", cwd=project)["id"]
            for _ in range(2)]

    def building() -> bool:
        return all(cluster.job(j)["reason"].startswith("building the environment on node-a (uv, ") for j in jobs)

    wait_until(building, 60, "both jobs to say the environment is being built")
    assert [cluster.job(j)["state"] for j in jobs] == ["starting", "starting"]
    (gate / "open").touch()
    for job_id in jobs:
        assert _finished(cluster, job_id)["state"] == "succeeded"
    launchers = "".join(cluster.cli("logs", str(j), "--launcher").stdout for j in jobs)
    assert launchers.count("building the environment for requirements.txt with uv") == 1, launchers
    assert launchers.count("using the environment built earlier on this node") == 1, launchers
    assert "gate opened: True" in cluster.cli("logs", str(jobs[1])).stdout


def test_a_job_cancelled_while_its_environment_builds_stops_and_leaves_none_half_built(cluster: Cluster,
                                                                                   tmp_path: Path):
    gate, project = _gated_project(tmp_path, "import gatepkg\n")
    job = cluster.submit_json("--gpus", "1", "--requirements", "requirements.txt", "train.py", cwd=project)["id"]
    wait_until(lambda: cluster.job(job)["reason"].startswith("building the environment"), 60, "the build to start")
    node = cluster.job(job)["nodes"][0]
    wait_until(lambda: _uv_running_for(cluster.root / node), 30, f"uv to build on {node}")
    cluster.cli("cancel", str(job))
    assert _finished(cluster, job)["state"] == "cancelled"
    wait_until(lambda: not _uv_running_for(cluster.root / node), 30, f"uv on {node} to be stopped")
    cluster.cli("drain", "node-b" if node == "node-a" else "node-a")  # the next job goes where it was cancelled
    (gate / "open").touch()
    again = cluster.submit_json("--nodes", "1", "--gpus-per-node", "1", "--requirements", "requirements.txt",
                                "train.py", cwd=project)["id"]
    assert _finished(cluster, again)["state"] == "succeeded"
    assert "building the environment for requirements.txt" in cluster.cli("logs", str(again), "--launcher").stdout


def _uv_running_for(state_dir: Path) -> bool:
    """Whether a uv process still works on an environment under this agent's state directory."""
    for proc in Path("/proc").iterdir():
        try:
            line = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if line and line[0].endswith(b"uv") and any(str(state_dir).encode() in part for part in line):
            return True
    return False


def test_a_command_runs_once_per_node_with_the_rendezvous_in_its_environment_and_its_exit_code(cluster: Cluster,
                                                                                             tmp_path: Path):
    project = tmp_path / "cmd"
    project.mkdir()
    (project / "run.sh").write_text('#!/bin/sh\necho "node $NODE_RANK of $NNODES, $GPUS_PER_NODE GPU, '
                                    'master $MASTER_ADDR:$MASTER_PORT, job $GPUDECK_JOB_ID, $GREETING"\n'
                                    # Only the second node fails: a node that fails first has the others stopped.
                                    '[ "$NODE_RANK" = 1 ] && exit 7\nexit 0\n')
    (project / "run.sh").chmod(0o755)
    job = cluster.submit_json("--nodes", "2", "--gpus-per-node", "1", "--env", "GREETING=hi there", "--",
                              "./run.sh", cwd=project)
    ended = _finished(cluster, job["id"])
    assert ended["state"] == "failed" and ended["exit_code"] == 7, ended
    assert ended["command"] == ["--", "./run.sh"]
    logs = cluster.cli("logs", str(job["id"])).stdout
    for rank in (0, 1):
        assert f"[node {rank}] node {rank} of 2, 1 GPU, master 127.0.0.1:" in logs, logs
    assert f"job {job['id']}, hi there" in logs

    for reserved in ("CUDA_VISIBLE_DEVICES=3", "GPUDECK_RUN=x", "MASTER_PORT=1"):
        refused = cluster.cli("submit", "--coordinator", f"127.0.0.1:{cluster.port}", "--token", cluster.token,
                              "--env", reserved, "--", "true", check=False, client=False)
        assert refused.returncode == 2 and "is set by gpudeck for every job" in refused.stderr, refused.stderr
    exits = cluster.submit_json("--gpus", "1", "--", "sh", "-c", "exit 0", cwd=project)
    assert _finished(cluster, exits["id"])["state"] == "succeeded"


def test_a_command_that_starts_its_own_torchrun_on_two_nodes_runs(cluster: Cluster, tmp_path: Path):
    project = tmp_path / "own-torchrun"
    project.mkdir()
    shutil.copy(SCRIPTS / "ddp_linear.py", project / "ddp_linear.py")
    line = ("python -m torch.distributed.run --nnodes $NNODES --node-rank $NODE_RANK --nproc-per-node "
            "$GPUS_PER_NODE --master-addr $MASTER_ADDR --master-port $MASTER_PORT ddp_linear.py --steps 3")
    job = cluster.submit_json("--nodes", "2", "--gpus-per-node", "1", "--", "sh", "-c", line, cwd=project)
    ended = _finished(cluster, job["id"])
    assert ended["state"] == "succeeded", (ended, cluster.cli("logs", str(job["id"])).stdout)
    assert cluster.cli("logs", str(job["id"])).stdout.count("step 2 loss") == 2
    # Counted although gpudeck did not start the ranks: each rank all-reduces the gradients 3 times,
    # after DDP's first broadcast of the parameters (as when gpudeck starts the ranks).
    counted = {"all_reduce": 3 * GRAD_BYTES, "broadcast": GRAD_BYTES}
    assert ended["traffic"]["by_rank"] == {"0": counted, "1": counted}


def test_outputs_of_a_job_that_wrote_none_or_of_a_node_without_any_are_one_sentence(cluster: Cluster,
                                                                                  tmp_path: Path):
    project = tmp_path / "quiet"
    project.mkdir()
    job = cluster.submit_json("--gpus", "1", "--", "true", cwd=project)
    assert _finished(cluster, job["id"])["state"] == "succeeded"
    refused = cluster.cli("outputs", str(job["id"]), check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert f"job {job['id']} has no outputs kept" in refused.stderr


def test_an_interpreter_a_node_lacks_fails_the_job_naming_the_node(cluster: Cluster, tmp_path: Path):
    project = _project(tmp_path / "project")
    job = cluster.submit_json("--gpus", "1", "--python", "/opt/no-such-python/bin/python3", "train.py", cwd=project)
    ended = _finished(cluster, job["id"])
    assert ended["state"] == "failed"
    assert "--python /opt/no-such-python/bin/python3 does not exist on node-" in ended["reason"], ended


def test_requirements_uv_cannot_resolve_fail_the_job_with_uvs_error(cluster: Cluster, tmp_path: Path):
    _needs_index()
    project = _project(tmp_path / "project")
    (project / "requirements.txt").write_text("gpudeck-no-such-package-anywhere==1.0\n")
    job = cluster.submit_json("--gpus", "1", "--requirements", "requirements.txt", "train.py", cwd=project)
    ended = _finished(cluster, job["id"])
    assert ended["state"] == "failed"
    assert "the environment could not be built on node-" in ended["reason"], ended
    assert "gpudeck-no-such-package-anywhere" in ended["reason"] and "Traceback" not in ended["reason"], ended


def test_a_project_over_the_coordinators_cap_is_refused_in_one_line_naming_the_largest_file(tmp_path: Path):
    cluster = Cluster(tmp_path)
    try:
        cluster.start_coordinator("--project-cap", "64K")
        project = _project(tmp_path / "project")
        (project / "stray-dataset.bin").write_bytes(b"\1" * 100_000)
        refused = cluster.cli("submit", "--coordinator", f"127.0.0.1:{cluster.port}", "--token", cluster.token,
                              "--gpus", "1", str(project / "train.py"), check=False, client=False)
        assert refused.returncode == 1
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and "stray-dataset.bin (98 KiB)" in lines[0] and "64 KiB" in lines[0], lines
        assert cluster.json("jobs") == []
    finally:
        cluster.stop()


@functools.cache
def _runtime() -> tuple[str, str]:
    """The container runtime that works here ("" if none) and why none does."""
    runtime, why = asyncio.run(find_runtime())
    return (runtime.name if runtime else ""), why


def test_an_image_where_no_container_runtime_works_fails_the_job_saying_why(cluster: Cluster, tmp_path: Path):
    name, why = _runtime()
    if name:
        pytest.skip(f"{name} works on this machine, so the refusal cannot be seen here")
    job = cluster.submit_json("--gpus", "1", "--image", "docker.io/library/busybox:latest", "--", "true",
                              cwd=tmp_path)
    ended = _finished(cluster, job["id"])
    assert ended["state"] == "failed" and ended["exit_code"] == 127, ended
    assert f"cannot run containers, which --image needs: {why}" in ended["reason"], ended


def _shell_image(runtime: str, root: Path) -> str:
    """A local image of this machine's /bin/sh and cat with their libraries (no registry needed), or
    a skip saying why the runtime cannot run it here."""
    rootfs = root / "rootfs"
    for program in ("/bin/sh", "/bin/cat"):
        real = Path(program).resolve()
        libraries = re.findall(r"(/\S+\.so[.\d]*)", subprocess.run(["ldd", str(real)], capture_output=True,
                                                                   text=True).stdout)
        for source in [str(real), *libraries]:
            target = rootfs / source.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
        (rootfs / "bin").mkdir(exist_ok=True)
        shutil.copy(real, rootfs / "bin" / Path(program).name)
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(root / "rootfs.tar"), "."], check=True)
    image = "localhost/gpudeck-test-shell:1"
    made = subprocess.run([runtime, "import", str(root / "rootfs.tar"), image], capture_output=True, text=True)
    trial = subprocess.run([runtime, "run", "--rm", image, "sh", "-c", "true"], capture_output=True, text=True,
                           timeout=120) if made.returncode == 0 else made
    if trial.returncode != 0:
        pytest.skip(f"{runtime} is installed but cannot run a container here: {trial.stderr.strip()[-200:]}")
    return image


def test_a_command_runs_in_a_container_image_on_two_nodes_with_its_exit_code(cluster: Cluster, tmp_path: Path):
    name, why = _runtime()
    if not name:
        pytest.skip(f"no container runtime works on this machine ({why})")
    image = _shell_image(name, tmp_path / "image")
    project = tmp_path / "project"
    project.mkdir()
    (project / "hello.txt").write_text("shipped into the container\n")
    job = cluster.submit_json("--nodes", "2", "--gpus-per-node", "1", "--image", image,
                              "--", "sh", "-c", 'echo "node $NODE_RANK of $NNODES: $(cat hello.txt)"; exit 3',
                              cwd=project)
    ended = _finished(cluster, job["id"])
    assert ended["state"] == "failed" and ended["exit_code"] == 3, ended
    logs = cluster.cli("logs", str(job["id"])).stdout
    assert "node 0 of 2: shipped into the container" in logs and "node 1 of 2: shipped into the container" in logs


def test_an_environment_whose_package_needs_torch_uses_the_agents_torch(cluster: Cluster, tmp_path: Path):
    gate = _gated_package(tmp_path / "gatepkg", requires="torch>=2")
    (gate / "open").touch()
    project = tmp_path / "project"
    project.mkdir()
    (project / "requirements.txt").write_text(f"gatepkg @ {gate.as_uri()}\n")
    (project / "train.py").write_text("import gatepkg, torch\nprint('torch from', torch.__file__)\n")
    job = cluster.submit_json("--gpus", "1", "--requirements", "requirements.txt", "train.py", cwd=project)
    ended = _finished(cluster, job["id"])
    assert ended["state"] == "succeeded", (ended, cluster.cli("logs", str(job["id"]), "--launcher").stdout)
    import torch

    assert f"torch from {torch.__file__}" in cluster.cli("logs", str(job["id"])).stdout
    assert "+ torch" not in cluster.cli("logs", str(job["id"]), "--launcher").stdout, "uv installed no torch"


def test_a_venv_the_lab_made_runs_the_job_with_the_agents_torch_after_its_own_packages(cluster: Cluster,
                                                                                      tmp_path: Path):
    gate = _gated_package(tmp_path / "gatepkg")
    (gate / "open").touch()
    venv = tmp_path / "lab-venv"
    uv = uv_binary()
    assert uv is not None, "uv is not installed (it comes with gpudeck[train])"
    subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
    subprocess.run([uv, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), str(gate)],
                   check=True)
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("import sys, gatepkg\nprint('venv python', sys.prefix)\n")
    (project / "vars.env").write_text("# the lab's settings\nexport DATASET='/data/imagenet'\nSEED=7\n")
    job = cluster.submit_json("--gpus", "1", "--venv", str(venv), "--env-file", "vars.env", "--env", "SEED=8", "--",
                              "sh", "-c", 'python train.py && echo "dataset $DATASET seed $SEED"', cwd=project)
    ended = _finished(cluster, job["id"])
    assert ended["state"] == "succeeded", (ended, cluster.cli("logs", str(job["id"])).stdout)
    logs = cluster.cli("logs", str(job["id"])).stdout
    assert f"venv python {venv}" in logs and "dataset /data/imagenet seed 8" in logs, logs
    lacking = cluster.submit_json("--gpus", "1", "--venv", str(tmp_path / "nowhere"), "train.py", cwd=project)
    assert f"--venv {tmp_path / 'nowhere'} is not a virtual environment on node-" in _finished(
        cluster, lacking["id"])["reason"]


def test_kept_outputs_give_way_to_newer_ones_and_are_named_again_after_an_agent_restart(tmp_path: Path):
    cluster = Cluster(tmp_path)
    try:
        cluster.start_coordinator()
        cluster.start_agent("node-a", 2, "--outputs-space", "3K")
        cluster.wait_nodes("up", 1)
        project = tmp_path / "project"
        project.mkdir()
        write = 'head -c 2000 /dev/zero > "$GPUDECK_OUTPUT_DIR/$0.bin"'
        first = cluster.submit_json("--gpus", "1", "--", "sh", "-c", write, "first", cwd=project)["id"]
        assert _finished(cluster, first)["outputs"] == {"node-a": [{"path": "first.bin", "size": 2000}]}
        second = cluster.submit_json("--gpus", "1", "--", "sh", "-c", write, "second", cwd=project)["id"]
        _finished(cluster, second)
        wait_until(lambda: cluster.job(first)["outputs"] == {}, 30, "the older outputs to be let go")
        assert cluster.job(second)["outputs"] == {"node-a": [{"path": "second.bin", "size": 2000}]}
        cluster.kill("node-a")
        # The node stays "up" and its outputs named for a moment after its agent is gone: wait until
        # the coordinator has seen it go, or the waits below would be answered by the killed agent.
        wait_until(lambda: not cluster.nodes()[0]["connected"], 30, "the coordinator to see node-a gone")
        cluster.start_agent("node-a", 2, "--outputs-space", "3K")
        wait_until(lambda: (node := cluster.nodes()[0])["connected"] and node["state"] == "up", 30,
                   "the restarted node-a to be connected")
        wait_until(lambda: cluster.job(second)["outputs"] != {}, 30, "the restarted agent to name its outputs")
        cluster.cli("outputs", str(second), "--to", str(tmp_path / "got"))
        assert (tmp_path / "got" / "second.bin").read_bytes() == b"\0" * 2000
    finally:
        cluster.stop()


def test_a_uv_lock_with_its_pyproject_builds_the_locked_environment(cluster: Cluster, tmp_path: Path):
    gate = _gated_package(tmp_path / "gatepkg")
    (gate / "open").touch()
    project = tmp_path / "locked"
    project.mkdir()
    (project / "pyproject.toml").write_text(
        '[project]\nname = "locked"\nversion = "0.1"\nrequires-python = ">=3.10"\n'
        f'dependencies = ["gatepkg @ {gate.as_uri()}"]\n')
    uv = uv_binary()
    assert uv is not None, "uv is not installed (it comes with gpudeck[train])"
    locked = subprocess.run([uv, "lock", "--offline", "--project", str(project)], capture_output=True,
                            text=True)
    assert locked.returncode == 0, locked.stderr
    (project / "train.py").write_text("import gatepkg\nprint('locked gate opened:', gatepkg.OPENED)\n")
    job = cluster.submit_json("--gpus", "1", "--requirements", "uv.lock", "train.py", cwd=project)
    ended = _finished(cluster, job["id"])
    assert ended["state"] == "succeeded", (ended, cluster.cli("logs", str(job["id"]), "--launcher").stdout)
    assert "locked gate opened: True" in cluster.cli("logs", str(job["id"])).stdout
    assert "for pyproject.toml and uv.lock with uv" in cluster.cli("logs", str(job["id"]), "--launcher").stdout
