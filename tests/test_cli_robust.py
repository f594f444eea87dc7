"""The command line as scripts and careless hands meet it: one sentence and the documented exit code
(0 success, 1 refused, 2 usage), never a traceback, and nothing a peer wrote that could take over the
terminal. A real coordinator and agents on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from gpudeck.model import JobSpec, RunSpec
from gpudeck.output import jobs_table
from gpudeck.protocol.views import JobView
from tests.cluster import Cluster
from tests.conftest import SCRIPTS

ESC = "\x1b"


def _gpudeck(cluster: Cluster, *args: str) -> subprocess.Popen[str]:
    flags = ["--coordinator", f"127.0.0.1:{cluster.port}", "--token", cluster.token]
    return subprocess.Popen([sys.executable, "-m", "gpudeck", args[0], *flags, *args[1:]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cluster.env, cwd=cluster.root)


def _run(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    proc = _gpudeck(cluster, *args)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("args", [
    ("show", "1180591620717411303424"),
    ("cancel", "-3"),
    ("submit",),
    ("submit", "--time-limit", "abc", str(SCRIPTS / "ddp_linear.py")),
    ("submit", "--time-limit", "99999999999h", str(SCRIPTS / "ddp_linear.py")),
    ("submit", "--gpus", str(10**30), str(SCRIPTS / "ddp_linear.py")),
    ("submit", "--name", "evil\x1b]0;pwned\x07\rX", str(SCRIPTS / "ddp_linear.py")),
    ("logs", "1", "--rank", str(10**30)),
], ids=["huge-id", "negative-id", "nothing-to-run", "bad-time-limit", "huge-time-limit", "huge-gpus", "escape-name",
        "huge-rank"])
def test_usage_errors_exit_2_with_one_sentence(cluster: Cluster, args: tuple[str, ...]):
    _assert_usage_error(_run(cluster, *args))
    assert cluster.json("jobs") == [], "nothing was stored"


@pytest.mark.parametrize("args", [
    ("coordinator", "--port", "70000", "--no-mdns"),
    ("up", "--port", str(2**64), "--no-tui"),
    ("agent", "--simulate-gpus", str(10**20), "--no-mdns", "--coordinator", "127.0.0.1:1", "--token", "x"),
    ("jobs", "--coordinator", "127.0.0.1:99999999999"),
    ("--coordinator", "no-port:", "nodes"),
], ids=["coordinator-port", "up-port", "agent-gpus", "client-address", "dashboard-address"])
def test_ports_addresses_and_simulated_gpus_out_of_range_are_usage_errors(tmp_path, args: tuple[str, ...]):
    """Checked before anything starts: no service binds, no agent dials, nothing is looked up."""
    env = {**os.environ, "GPUDECK_HOME": str(tmp_path)}
    _assert_usage_error(subprocess.run([sys.executable, "-m", "gpudeck", *args], capture_output=True, text=True,
                                       env=env, cwd=tmp_path, timeout=60))


def _assert_usage_error(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and ESC not in result.stderr
    said = [line for line in result.stderr.splitlines() if not line.startswith((" ", "usage:"))]
    assert len(said) == 1 and ": error: " in said[0], result.stderr  # argparse's usage lines, then one sentence


def test_an_escape_in_a_node_name_is_shown_not_obeyed(cluster: Cluster):
    result = _run(cluster, "drain", "\x1b[2J")
    assert result.returncode == 1 and "there is no node \\x1b[2J" in result.stderr, result.stderr
    assert ESC not in result.stderr


def test_tables_show_control_characters_of_stored_names_as_escapes():
    spec = JobSpec(name="evil\x1b]0;pwned\x07\rX", gpus=1, run=RunSpec(command=["true"]))
    job = JobView.build(1, spec, state="failed", submitted_at=0.0, reason="why\x1b[2J", hosts=[("n", [0])],
                        attempt=1, exit_code=1).to_json()
    text = jobs_table([job])
    assert ESC not in text and "\x07" not in text and "\r" not in text
    assert "evil\\x1b]0;pwned\\x07\\rX" in text and "why\\x1b[2J" in text


@pytest.fixture
def noisy_job(cluster: Cluster) -> int:
    job_id = cluster.submit("--gpus", "1", str(SCRIPTS / "escapes.py"))
    assert cluster.wait_job(job_id, ("succeeded", "failed"))["state"] == "succeeded"
    return job_id


def test_logs_keep_colours_but_drop_what_takes_over_the_terminal_unless_raw(cluster: Cluster, noisy_job: int):
    shown = _run(cluster, "logs", str(noisy_job)).stdout
    assert f"{ESC}[31mred{ESC}[0m plain" in shown, "colours pass"
    assert "title  clipboard  clear  move  end" in shown
    for sequence in (f"{ESC}]0;", f"{ESC}]52;", f"{ESC}[2J", f"{ESC}[5;5H", "\x07"):
        assert sequence not in shown
    raw = _run(cluster, "logs", str(noisy_job), "--raw").stdout
    assert f"{ESC}]0;pwned\x07" in raw and f"{ESC}[2J" in raw


def _buffered(cluster: Cluster) -> dict[str, str]:
    """The environment without the tests' PYTHONUNBUFFERED: stdout block-buffered, as a user's pipe is,
    so output still buffered at exit is part of what the command must handle."""
    env = dict(cluster.env)
    env.pop("PYTHONUNBUFFERED")
    return env


@pytest.mark.parametrize("command", [("logs", "{job}"), ("jobs",), ("show", "{job}")])
def test_a_reader_gone_before_any_output_ends_the_command_quietly(cluster: Cluster, noisy_job: int,
                                                                  command: tuple[str, ...]):
    """`gpudeck jobs | true`: the reader is gone before a byte is written. 141, as for `ls | true`."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    flags = ["--coordinator", f"127.0.0.1:{cluster.port}", "--token", cluster.token]
    args = [part.format(job=noisy_job) for part in command]
    result = subprocess.run([sys.executable, "-m", "gpudeck", *args, *flags], stdout=write_end,
                            stderr=subprocess.PIPE, text=True, env=_buffered(cluster), cwd=cluster.root, timeout=60)
    os.close(write_end)
    assert result.stderr == "" and result.returncode == 141, (result.returncode, result.stderr)


def test_a_reader_that_stops_mid_log_ends_it_quietly(cluster: Cluster, noisy_job: int):
    """`gpudeck logs 1 | head -1` on more output than a pipe holds: the writer is blocked when the
    reader leaves, and its next write fails."""
    flags = ["--coordinator", f"127.0.0.1:{cluster.port}", "--token", cluster.token]
    proc = subprocess.Popen([sys.executable, "-m", "gpudeck", "logs", str(noisy_job), *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_buffered(cluster), cwd=cluster.root)
    assert proc.stdout is not None and proc.stderr is not None
    assert "red" in proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141 and err == "", err


def test_a_coordinator_gone_mid_follow_is_one_sentence_and_exit_1(cluster: Cluster):
    job_id = cluster.submit("--gpus", "1", str(SCRIPTS / "slow_ddp.py"), "--steps", "100000")
    follow = _gpudeck(cluster, "logs", str(job_id), "--follow")
    assert follow.stdout is not None and follow.stderr is not None
    assert follow.stdout.readline().startswith("[rank 0]"), "the follower is connected and reading"
    cluster.kill("coordinator", signal.SIGKILL)
    out, err = follow.communicate(timeout=60)
    assert follow.returncode == 1, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("gpudeck: the coordinator closed the connection"), err
