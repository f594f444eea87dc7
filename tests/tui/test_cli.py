"""The command line opens the dashboard: `gpudeck up` in a real terminal (a pty) runs the coordinator, the
agent and the dashboard in one process, and q stops all three; without a terminal nothing changes."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from tests.cluster import Terminal, free_port

pytestmark = pytest.mark.slow


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ, GPUDECK_HOME=str(home), TERM="xterm-256color", COLUMNS="100", LINES="30")
    for name in ("GPUDECK_COORDINATOR", "GPUDECK_TOKEN", "GPUDECK_TOKEN_FILE", "NO_COLOR"):
        env.pop(name, None)
    return env


def test_up_opens_the_dashboard_and_q_stops_everything(tmp_path: Path):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gpudeck", "up", "--simulate-gpus", "2", "--port", str(port)],
                            stdin=slave, stdout=slave, stderr=slave, env=_env(tmp_path / "home"), cwd=tmp_path,
                            start_new_session=True)
    os.close(slave)
    terminal = Terminal(master, 100, 30)
    try:
        assert terminal.read_until("1/1 nodes up", timeout=60), terminal.shows()
        assert (tmp_path / "home" / "coordinator" / "endpoint.json").exists()
        os.write(master, b"q")
        assert proc.wait(timeout=30) == 0
        terminal.read_until("gpudeck stopped", timeout=5)
        assert b"gpudeck stopped" in terminal.raw
        assert not (tmp_path / "home" / "coordinator" / "endpoint.json").exists(), "the coordinator stopped"
        assert "joined" in (tmp_path / "home" / "up.log").read_text(), "logs went to a file, not over the screen"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_without_a_terminal_gpudeck_prints_help_and_up_stays_headless(tmp_path: Path):
    result = subprocess.run([sys.executable, "-m", "gpudeck"], capture_output=True, text=True,
                            env=_env(tmp_path / "home"), stdin=subprocess.DEVNULL, timeout=60)
    assert result.returncode == 2 and "tui" in result.stdout and "the dashboard" in result.stdout
    result = subprocess.run([sys.executable, "-m", "gpudeck", "tui"], capture_output=True, text=True,
                            env=_env(tmp_path / "home"), stdin=subprocess.DEVNULL, timeout=60)
    assert result.returncode == 1 and "needs a terminal" in result.stderr
    proc = subprocess.Popen([sys.executable, "-m", "gpudeck", "up", "--simulate-gpus", "1", "--port", str(free_port())],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=_env(tmp_path / "home"), text=True)
    try:
        lines: list[str] = []
        while len(lines) < 30 and not any(line.startswith("gpudeck is up") for line in lines):
            lines.append(proc.stdout.readline())  # type: ignore[union-attr]
        assert lines[-1].startswith("gpudeck is up"), lines
    finally:
        proc.terminate()
        proc.wait(timeout=30)
