"""The command line as scripts and careless hands meet it: one sentence and the documented exit code
(0 success, 1 refused, 2 usage), never a traceback, and nothing a peer wrote that could take over the
terminal. A real coordinator and agents on loopback."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from gpudeck.output import jobs_table
from tests.cluster import Cluster, wait_until
from tests.conftest import SCRIPTS

ESC = "\x1b"


def _gpudeck(cluster: Cluster, *args: str, stdout: int = subprocess.PIPE) -> subprocess.Popen[str]:
    flags = ["--coordinator", f"127.0.0.1:{cluster.port}", "--token", cluster.token]
    return subprocess.Popen([sys.executable, "-m", "gpudeck", args[0], *flags, *args[1:]], stdout=stdout,
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
    result = _run(cluster, *args)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and ESC not in result.stderr
    said = [line for line in result.stderr.splitlines() if not line.startswith((" ", "usage:"))]
    assert len(said) == 1 and ": error: " in said[0], result.stderr  # argparse's usage lines, then one sentence
    assert cluster.json("jobs") == [], "nothing was stored"


def test_an_escape_in_a_node_name_is_shown_not_obeyed(cluster: Cluster):
    result = _run(cluster, "drain", "\x1b[2J")
    assert result.returncode == 1 and "there is no node \\x1b[2J" in result.stderr, result.stderr
    assert ESC not in result.stderr


def test_tables_show_control_characters_of_stored_names_as_escapes():
    job = {"id": 1, "name": "evil\x1b]0;pwned\x07\rX", "state": "failed", "request": {"gpus": 1}, "nodes": ["n"],
           "started_at": None, "ended_at": None, "attempt": 1, "exit_code": 1, "reason": "why\x1b[2J"}
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


@pytest.mark.parametrize("command", [("logs", "{job}"), ("jobs",), ("show", "{job}")])
def test_a_reader_that_closes_early_ends_the_command_quietly(cluster: Cluster, noisy_job: int,
                                                             command: tuple[str, ...]):
    proc = _gpudeck(cluster, *(part.format(job=noisy_job) for part in command))
    assert proc.stdout is not None
    proc.stdout.readline()
    proc.stdout.close()  # like `| head -1`
    err = proc.stderr.read() if proc.stderr else ""
    code = proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert code in (0, 141), (code, err)


def test_a_coordinator_gone_mid_follow_is_one_sentence_and_exit_1(cluster: Cluster):
    job_id = cluster.submit("--gpus", "1", str(SCRIPTS / "slow_ddp.py"), "--steps", "100000")
    cluster.wait_job(job_id, ("running",))
    follow = _gpudeck(cluster, "logs", str(job_id), "--follow", stdout=subprocess.DEVNULL)
    wait_until(lambda: follow.poll() is None and time.sleep(0.5) is None, 10, "the follower to start")
    cluster.kill("coordinator", signal.SIGKILL)
    err = follow.stderr.read() if follow.stderr else ""
    assert follow.wait(timeout=60) == 1, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "coordinator" in err
