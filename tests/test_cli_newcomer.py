"""The command line from a newcomer's chair (issue 12): help that explains each command with an example,
a bad flag answered by the command it was given to, logs that say what exists and how a job ended,
`jobs` that shows what matters now, and submit catching options in the wrong place before a job waits
for GPUs. Real coordinators and agents on loopback where a cluster is needed."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from gpudeck.cli import build_parser, named_command, parse_command_line
from gpudeck.cli.submit import spec_from_args
from gpudeck.coordinator.store import JobFilter, Store
from gpudeck.model import JobSpec, JobState, RunSpec
from gpudeck.output import job_detail, jobs_table, nodes_table
from gpudeck.protocol.views import GpuReading, JobView, NodeView
from gpudeck.text import human_bytes, rate
from tests.cluster import Cluster
from tests.conftest import SCRIPTS

SAYS_RANK = str(SCRIPTS / "says_rank.py")


def _gpudeck(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """gpudeck with no coordinator anywhere: what it says before it would connect."""
    env = {**os.environ, "GPUDECK_HOME": str(tmp_path)}
    env.pop("GPUDECK_COORDINATOR", None)
    return subprocess.run([sys.executable, "-m", "gpudeck", args[0], "--coordinator", "127.0.0.1:1", *args[1:]],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)


def _said(result: subprocess.CompletedProcess[str]) -> list[str]:
    """stderr's lines other than argparse's usage lines."""
    return [line for line in result.stderr.splitlines() if not line.startswith((" ", "usage:"))]


# --- help and usage errors -------------------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser | None = None) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in (parser or build_parser())._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_a_word_that_names_no_command_gets_the_whole_parser_and_its_list():
    assert named_command(["bogus", "--json"]) is None and named_command([]) is None
    assert named_command(["--token", "jobs"]) is None, "an option's value is not a command"
    result = subprocess.run([sys.executable, "-m", "gpudeck", "bogus"], capture_output=True, text=True)
    assert result.returncode == 2 and "invalid choice: 'bogus'" in result.stderr and "submit" in result.stderr


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_command_explains_itself_with_an_example(name: str):
    command = _subcommands()[name]
    assert command.description and len(command.description.split()) >= 12, f"{name}: a paragraph on what it does"
    assert command.epilog and "example" in command.epilog and f"gpudeck {name}" in command.epilog, name
    assert command.formatter_class is argparse.RawDescriptionHelpFormatter, f"{name}: examples keep their lines"
    for action in command._actions:
        if not action.option_strings:
            assert action.help, f"gpudeck {name} {action.metavar}: positionals say what they are"


@pytest.mark.parametrize("words", [
    ["submit", "--gpus", "2", "train.py", "--epochs", "3"], ["submit", "--array", "0-3", "--", "true"],
    ["--coordinator", "lab:7070", "--token", "jobs", "nodes", "--json"], ["-v", "logs", "12.3", "--follow"],
    ["agent", "--coordinator", "127.0.0.1:7070", "--warm", "0"], ["user", "add", "ana", "--admin"],
    ["gpu", "cordon", "node-a:1", "--reason", "xid 79"], ["doctor", "--nodes", "a,b"],
    ["usage", "--since", "2026-12-01"]])
def test_a_command_line_parses_alike_with_only_its_own_command_built(words: list[str]):
    """`gpudeck CMD` builds only CMD's parser (the others cost a submit a tenth of its start)."""
    command = named_command(words)
    assert command is not None and command in words
    narrow = build_parser(command)
    assert set(_subcommands(narrow)) == {command}
    assert vars(parse_command_line(narrow, words)) == vars(parse_command_line(build_parser(), words))


@pytest.mark.parametrize("args", [("jobs", "--bogus"), ("show", "3", "--bogus"), ("logs", "3", "--bogus", "x"),
                                  ("nodes", "extra")])
def test_a_bad_flag_is_answered_by_its_command_with_its_usage(tmp_path: Path, args: tuple[str, ...]):
    result = _gpudeck(tmp_path, *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"usage: gpudeck {args[0]} "), result.stderr
    extra = " ".join(a for a in args[1:] if not a.isdigit())
    assert _said(result) == [f"gpudeck {args[0]}: error: unrecognized arguments: {extra}"], result.stderr


def test_a_job_state_that_does_not_exist_is_a_usage_error_naming_the_states(tmp_path: Path):
    result = _gpudeck(tmp_path, "jobs", "--state", "running,finshed")
    assert result.returncode == 2
    assert _said(result) == ["gpudeck jobs: error: argument --state: 'finshed' is not a job state (the states are "
                             "pending, starting, running, succeeded, failed, cancelled)"], result.stderr
    since = _gpudeck(tmp_path, "jobs", "--since", "last tuesday")
    assert since.returncode == 2 and "--since" in _said(since)[0], since.stderr


# --- submit --------------------------------------------------------------------------------------


def _spec(*argv: str) -> JobSpec:
    return spec_from_args(parse_command_line(build_parser(), ["submit", *argv]))


def test_gpus_as_nodes_x_gpus_means_nodes_and_gpus_per_node_as_in_the_form():
    spec = _spec("--gpus", "2x1", "--workload", "data-parallel")
    assert (spec.gpus, spec.nodes, spec.gpus_per_node) == (None, 2, 1)
    assert (_spec("--gpus", "3", "--workload", "pipeline").gpus, _spec("--workload", "pipeline").gpus) == (3, 1)


def test_gpus_in_two_ways_at_once_or_not_a_shape_are_usage_errors(tmp_path: Path):
    both = _gpudeck(tmp_path, "submit", "--gpus", "2x1", "--nodes", "2", "--workload", "pipeline")
    assert both.returncode == 2 and "not both" in _said(both)[0], both.stderr
    bad = _gpudeck(tmp_path, "submit", "--gpus", "2by4", "--workload", "pipeline")
    assert bad.returncode == 2 and "'2by4' is not a number of GPUs" in bad.stderr, bad.stderr


def test_a_workload_option_it_does_not_take_is_refused_at_submit(tmp_path: Path):
    result = _gpudeck(tmp_path, "submit", "--workload", "data-parallel", "--steps", "5", "--bogus", "3")
    assert result.returncode == 2, result.stderr
    (said,) = _said(result)
    assert said.startswith("gpudeck submit: error: --workload data-parallel: unrecognized arguments: --bogus 3"), said
    assert "--steps, --batch-size" in said and "--bucket-mb" in said and "--micro-batches" not in said, said
    misplaced = _said(_gpudeck(tmp_path, "submit", "--workload", "pipeline", "--gpus", "2"))
    assert "--gpus is an option of submit: put it before --workload" in misplaced[0], misplaced
    values = _gpudeck(tmp_path, "submit", "--workload", "pipeline", "--layers", "1")
    assert values.returncode == 2 and "--layers must be at least 2" in values.stderr, values.stderr


def test_the_workload_check_at_submit_does_not_import_torch():
    code = ("import sys; from gpudeck.cli import build_parser, parse_command_line; "
            "from gpudeck.cli.submit import spec_from_args; "
            "spec_from_args(parse_command_line(build_parser(), ['submit', '--workload', 'pipeline', '--steps', '5'])); "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


def test_submit_warns_when_its_own_option_follows_the_script(cluster: Cluster):
    flags = ["--coordinator", f"127.0.0.1:{cluster.port}", "--token", cluster.token]
    result = subprocess.run([sys.executable, "-m", "gpudeck", "submit", *flags, SAYS_RANK, "--gpus", "2",
                             "--exit-code", "0"], capture_output=True, text=True, env=cluster.env, cwd=cluster.root,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    job_id = int(result.stdout)
    assert result.stderr.splitlines() == [
        f"gpudeck: warning: --gpus after {SAYS_RANK} goes to the script, not to submit; to give submit an option, "
        "put it before the script"], result.stderr
    assert cluster.job(job_id)["command"] == ["says_rank.py", "--gpus", "2", "--exit-code", "0"], "still submitted"
    quiet = subprocess.run([sys.executable, "-m", "gpudeck", "submit", *flags, SAYS_RANK, "--exit-code", "0"],
                           capture_output=True, text=True, env=cluster.env, cwd=cluster.root, timeout=60)
    assert quiet.returncode == 0 and "warning" not in quiet.stderr, quiet.stderr


# --- logs ----------------------------------------------------------------------------------------


def test_logs_of_a_rank_or_attempt_the_job_does_not_have_say_what_it_has(cluster: Cluster):
    job_id = cluster.submit("--gpus", "2", SAYS_RANK)
    assert cluster.wait_job(job_id, ("succeeded", "failed"))["state"] == "succeeded"
    rank = cluster.cli("logs", str(job_id), "--rank", "5", check=False)
    assert rank.returncode == 1 and rank.stdout == "", rank
    assert rank.stderr == (f"gpudeck: job {job_id} has no rank 5: its ranks are 0 and 1 (and -1 for its node's own "
                           "output)\n"), rank.stderr
    attempt = cluster.cli("logs", str(job_id), "--attempt", "3", check=False)
    assert attempt.returncode == 1
    assert attempt.stderr == f"gpudeck: job {job_id} has no attempt 3: it has had 1 attempt\n", attempt.stderr
    one = cluster.cli("logs", str(job_id), "--rank", "1", "--attempt", "1")
    assert one.stdout == "[rank 1] rank 1 is here\n", one.stdout


def test_a_rank_of_a_job_not_started_yet_is_no_error_and_one_beyond_it_is(cluster: Cluster):
    for node in ("node-a", "node-b"):
        cluster.cli("drain", node)
    job_id = cluster.submit("--gpus", "1", SAYS_RANK)
    waiting = cluster.cli("logs", str(job_id), "--rank", "0")
    assert waiting.stdout == "" and waiting.stderr == "", "no log yet, and nothing wrong"
    beyond = cluster.cli("logs", str(job_id), "--rank", "1", check=False)
    assert beyond.returncode == 1 and "its only rank is 0" in beyond.stderr, beyond.stderr
    never = cluster.cli("logs", str(job_id), "--attempt", "1", check=False)
    assert never.stderr == f"gpudeck: job {job_id} has no attempt 1: it has not started yet\n", never.stderr


def _follow(cluster: Cluster, job_id: int) -> subprocess.Popen[str]:
    flags = ["--coordinator", f"127.0.0.1:{cluster.port}", "--token", cluster.token]
    return subprocess.Popen([sys.executable, "-m", "gpudeck", "logs", str(job_id), "--follow", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster.env,
                            cwd=cluster.root)


def test_following_a_log_ends_by_saying_how_the_job_ended(cluster: Cluster):
    job_id = cluster.submit("--gpus", "1", SAYS_RANK, "--wait")
    follower = _follow(cluster, job_id)
    assert follower.stdout is not None
    assert follower.stdout.readline() == "[rank 0] rank 0 is here\n", "the follower is reading"
    cluster.cli("cancel", str(job_id))
    out, err = follower.communicate(timeout=60)
    assert follower.returncode == 0, err
    assert err == f"gpudeck: job {job_id} was cancelled (cancelled by a user)\n", err

    failed = cluster.submit("--gpus", "1", SAYS_RANK, "--exit-code", "3")
    reason = cluster.wait_job(failed, ("succeeded", "failed"))["reason"]
    follower = _follow(cluster, failed)
    out, err = follower.communicate(timeout=60)
    assert follower.returncode == 0 and reason and err == f"gpudeck: job {failed} failed: {reason}\n", err

    done = cluster.submit("--gpus", "1", SAYS_RANK)
    cluster.wait_job(done, ("succeeded",))
    follower = _follow(cluster, done)
    out, err = follower.communicate(timeout=60)
    assert out == "[rank 0] rank 0 is here\n" and err == f"gpudeck: job {done} succeeded\n", (out, err)


# --- jobs ----------------------------------------------------------------------------------------

HOUR = 3600.0


@pytest.fixture
def history(tmp_path: Path) -> Iterator[Cluster]:
    """A coordinator (no agents) whose store holds 25 cancelled jobs, job i ended 26 - i hours ago,
    and then 3 pending ones."""
    cluster = Cluster(tmp_path)
    store = Store(cluster.coordinator_dir / "gpudeck.db")
    now = time.time()
    for index in range(1, 29):
        spec = JobSpec(name=f"j{index}", gpus=1, run=RunSpec(workload="pipeline"))
        job_id = store.add_job(spec, now - 30 * HOUR, "admin")
        if index <= 25:
            store.transition(job_id, JobState.CANCELLED, reason="cancelled by a user",
                             ended_at=now - (26 - index) * HOUR)
    store.close()
    cluster.start_coordinator()
    yield cluster
    cluster.stop()


def _ids(jobs: list[dict[str, Any]]) -> list[int]:
    return [job["id"] for job in jobs]


def _table_ids(text: str) -> list[int]:
    return [int(line.split()[0]) for line in text.splitlines()[1:] if line.split()[0].isdigit()]


def test_jobs_shows_unfinished_jobs_and_the_latest_finished_by_default(history: Cluster):
    shown = history.cli("jobs").stdout
    assert _table_ids(shown) == list(range(6, 29)), shown
    assert shown.splitlines()[-1] == "... and 5 older finished jobs: gpudeck jobs --all", shown
    everything = history.cli("jobs", "--all").stdout
    assert _table_ids(everything) == list(range(1, 29)) and "older" not in everything


def test_jobs_json_alone_is_still_every_job(history: Cluster):
    assert _ids(history.json("jobs")) == list(range(1, 29))


def test_jobs_filters_apply_to_the_table_and_to_json(history: Cluster):
    assert _ids(history.json("jobs", "--state", "pending")) == [26, 27, 28]
    assert _ids(history.json("jobs", "--state", "cancelled", "--state", "pending", "--limit", "4")) == [25, 26, 27, 28]
    assert _ids(history.json("jobs", "--since", "3h30m")) == [23, 24, 25, 26, 27, 28]
    limited = history.cli("jobs", "--limit", "2").stdout
    assert _table_ids(limited) == [27, 28], limited
    assert limited.splitlines()[-1] == "... and 26 older jobs that match: raise --limit, or use --all", limited
    none = history.cli("jobs", "--state", "failed").stdout
    assert none.strip() == "no jobs match: `gpudeck jobs --all` lists every job", none


def test_the_store_filters_and_pages_newest_first(tmp_path: Path):
    store = Store(tmp_path / "g.db")
    for index in range(1, 8):
        job_id = store.add_job(JobSpec(name=f"j{index}", gpus=1, run=RunSpec(workload="pipeline")), 0.0, "admin")
        if index % 2:
            store.transition(job_id, JobState.CANCELLED, reason="x", ended_at=float(index))
    cancelled = JobFilter(states=(JobState.CANCELLED,))
    assert [row.id for row in store.jobs_page(0, 2, cancelled)] == [1, 3]
    assert [row.id for row in store.jobs_page(0, 2, cancelled, newest=True)] == [5, 7]
    assert [row.id for row in store.jobs_page(0, 2, JobFilter(states=(JobState.CANCELLED,), before=5),
                                              newest=True)] == [1, 3]
    assert [row.id for row in store.jobs_page(0, 10, JobFilter(since=5.0))] == [2, 4, 5, 6, 7]
    assert store.count_jobs(cancelled) == 4 and store.count_jobs() == 7
    store.close()


# --- wording -------------------------------------------------------------------------------------


def test_one_gpu_is_one_gpu_in_every_table():
    job = JobView.build(1, JobSpec(name="a", gpus=1, run=RunSpec(command=["a.py"])), state="running", submitted_at=0.0,
                        hosts=[("n", [0])], attempt=1).to_json()
    assert "1 GPU " in jobs_table([job]) + " " and "1 GPUs" not in jobs_table([job])
    node = NodeView(name="n", state="up", draining=False, simulated=True, hostname="n", address="10.0.0.1",
                    connected=True, last_heartbeat_age=1, jobs=[],
                    gpus=[GpuReading(index=0, name="G", uuid="G-0", memory_total=1 << 30, memory_used=0, utilization=1,
                                     temperature=40, power=50, power_limit=None)]).to_json()
    unjoined = [{"name": "m", "address": "10.0.0.2", "gpus": 1, "why": "it has not connected"}]
    listed = nodes_table({"nodes": [node], "unjoined": unjoined})
    assert "1 GPU " in listed and "(1 GPU)" in listed and "1 GPUs" not in listed, listed
    detail = job_detail(job)
    assert "n GPU 0" in detail and "GPUs 0" not in detail, detail


def test_rates_and_sizes_use_the_largest_unit_they_are_at_least_one_of():
    assert rate(1015 * 1024) == "1015 KiB/s"
    assert rate(1023.97 * 1024) == "1.0 MiB/s", "rounded up to 1024 KiB it is a MiB"
    assert human_bytes(1023) == "1023 B" and human_bytes(1536) == "1.5 KiB" and human_bytes(3 << 30) == "3.0 GiB"
    assert human_bytes(97.7 * 1024) == "98 KiB" and human_bytes(10 << 20) == "10 MiB"


def test_limits_are_said_with_the_option_they_belong_to():
    with pytest.raises(ValueError, match=r"^--max-restarts must be from 0 to 100, not 101$"):
        JobSpec(name="a", gpus=1, run=RunSpec(workload="pipeline"), max_restarts=101).check()
    with pytest.raises(ValueError, match=r"^--priority must be from -1000 to 1000, not 5000$"):
        JobSpec(name="a", gpus=1, run=RunSpec(workload="pipeline"), priority=5000).check()

