"""`gpudeck agent --run-as-owner` (issue 13): a user's job runs as the node's account of that name (its
uid, gid, groups and home) and writes where a job writes; a job whose owner has no account runs as
the agent's user and its launcher log says so; an agent not run as root is refused the flag. Real
coordinator, agent, CLI and rank processes on loopback, with a throwaway local account."""

from __future__ import annotations

import importlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from gpudeck import cli
from gpudeck.agent.accounts import RUN, account_of
from tests.cluster import Cluster
from tests.conftest import SCRIPTS
from tests.test_launchers import wait_warm

NOBODY = 65534
REFUSAL = ("gpudeck: --run-as-owner starts each job as its owner's account, which only an agent running as root "
           "can do: run the agent as root or leave the flag out")


@dataclass(frozen=True)
class Person:
    """A throwaway local account and the group it is in besides its own."""

    name: str
    uid: int
    gid: int
    extra_gid: int
    home: str


def _cannot_make_accounts() -> str:
    if os.geteuid() != 0:
        return "making a local account needs root"
    missing = [tool for tool in ("useradd", "userdel", "groupadd", "groupdel") if shutil.which(tool) is None]
    return f"{', '.join(missing)} not found" if missing else ""


@pytest.fixture
def person() -> Iterator[Person]:
    """A local account gdtestNNNNNNN in a group of its own and one more, removed again whatever happens."""
    if reason := _cannot_make_accounts():
        pytest.skip(reason)
    name = f"gdtest{random.randrange(10**6, 10**7)}"
    extra = f"{name}x"
    home = Path(tempfile.mkdtemp(prefix="gpudeck-home-"))
    try:
        subprocess.run(["groupadd", extra], check=True, capture_output=True)
        subprocess.run(["useradd", "--no-create-home", "--home-dir", str(home), "--user-group", "--groups", extra,
                        name], check=True, capture_output=True)
        account = account_of(name)
        assert account is not None
        os.chown(home, account.uid, account.gid)
        yield Person(name, account.uid, account.gid, next(g for g in account.groups if g != account.gid), str(home))
    finally:
        subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(["groupdel", extra], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def open_root() -> Iterator[Path]:
    """The cluster's folder, which every account may pass through (pytest's tmp_path is mode 0700)."""
    root = Path(tempfile.mkdtemp(prefix="gpudeck-owner-"))
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def python_flags(name: str) -> list[str]:
    """`submit` flags for a Python the account may run: the agent's own, else the system's of the same
    version, which the agent's overlay gives its torch and gpudeck (here the agent's may lie under
    root's home)."""
    account = account_of(name)
    assert account is not None
    if account.may(sys.executable, RUN):
        return []
    system = f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}"
    if account.may(system, RUN):
        return ["--python", system]
    pytest.skip(f"no Python of version {sys.version_info[0]}.{sys.version_info[1]} that other accounts may run")


def facts(cluster: Cluster, job_id: int, token: str | None = None) -> dict[str, Any]:
    logs = cluster.cli("logs", str(job_id), token=token).stdout
    found = re.search(r"OWNER_FACTS (\{.*\})", logs)
    assert found, logs
    return json.loads(found.group(1))


def succeeds(cluster: Cluster, job_id: int) -> None:
    job = cluster.wait_job(job_id, ("succeeded", "failed", "cancelled"), timeout=180)
    assert job["state"] == "succeeded", (job, cluster.cli("logs", str(job_id), "--launcher").stdout)


def test_jobs_run_as_their_owners_account(person: Person, open_root: Path) -> None:
    cluster = Cluster(open_root)
    try:
        cluster.start_coordinator()
        flags = python_flags(person.name)
        cluster.start_agent("node-a", 1, "--run-as-owner", *(["--warm", "1"] if not flags else []))
        cluster.wait_nodes("up", 1)
        if not flags:  # the agent's interpreter would run the ranks: its warm one must not fork them
            wait_warm(cluster, "node-a")
        token = cluster.cli("user", "add", person.name).stdout.strip().splitlines()[-1]
        script = str(SCRIPTS / "owner_facts.py")

        theirs = cluster.submit_json(*flags, script, token=token)
        assert theirs["owner"] == person.name
        succeeds(cluster, theirs["id"])
        seen = facts(cluster, theirs["id"], token)
        assert (seen["uid"], seen["euid"], seen["gid"]) == (person.uid, person.uid, person.gid), seen
        assert set(seen["groups"]) == {person.gid, person.extra_gid}, seen
        assert (seen["home"], seen["user"], seen["logname"]) == (person.home, person.name, person.name), seen
        job_dir = open_root / "node-a" / "jobs" / f"{theirs['id']}-1"
        assert json.loads((job_dir / "job.json").read_text())["forked"] == 0
        logs = (job_dir / "logs").stat()
        assert (logs.st_uid, logs.st_mode & 0o777) == (person.uid, 0o700)
        assert (job_dir / "job.json").stat().st_uid == 0 and (job_dir / "launcher.log").stat().st_mode & 0o077 == 0
        fetched = open_root / "fetched"
        cluster.cli("outputs", str(theirs["id"]), "--to", str(fetched), token=token)
        assert json.loads(next(fetched.rglob("whoami.json")).read_text()) == seen

        admins = cluster.submit_json(*flags, script)  # the join token's holder, "admin"
        assert admins["owner"] == "admin"
        succeeds(cluster, admins["id"])
        admin = account_of("admin")
        assert facts(cluster, admins["id"])["uid"] == (admin.uid if admin else 0)
        if admin is None:
            launcher = cluster.cli("logs", str(admins["id"]), "--launcher").stdout
            assert "node-a has no local account named admin, so the job runs as root, the agent's own user." in launcher
    finally:
        cluster.stop()


def warm_up_imports() -> None:
    """What `gpudeck agent` imports lazily, imported while this process may still read it (the
    standard library too may lie where nobody may read)."""
    cli.build_parser()
    for module in ("gpudeck.agent.accounts", "gpudeck.agent.gpus", "gpudeck.agent.node"):
        importlib.import_module(module)


def test_run_as_owner_is_refused_to_an_agent_not_run_as_root(tmp_path: Path) -> None:
    """Run by a user other than root: this test's own where it is not root, else a forked child that
    gives root up for nobody's uid first (the agent's interpreter may lie where nobody may run it, so
    the child runs the command line in this interpreter instead of starting another)."""
    argv = ["agent", "--run-as-owner", "--simulate-gpus", "1", "--no-mdns", "--coordinator", "127.0.0.1:9",
            "--state-dir", str(tmp_path / "agent")]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 99  # whatever goes wrong in the child, it must not go on as a second pytest
        try:
            os.close(read)
            sys.stderr = os.fdopen(write, "w")  # pytest holds the one it captures
            if os.geteuid() == 0:
                warm_up_imports()
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            code = cli.main(argv)
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as said:
        stderr = said.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1, stderr
    assert stderr.strip() == REFUSAL


def test_run_as_owner_needs_a_state_dir_every_account_may_pass(open_root: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("an agent not run as root is refused --run-as-owner before its state dir is looked at")
    closed = open_root / "closed"
    closed.mkdir(mode=0o700)
    state_dir = closed / "agent"
    result = subprocess.run([sys.executable, "-m", "gpudeck", "agent", "--run-as-owner", "--simulate-gpus", "1",
                             "--no-mdns", "--coordinator", "127.0.0.1:9", "--state-dir", str(state_dir)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result
    assert result.stderr.strip() == (f"gpudeck: with --run-as-owner every job's account must pass through the state "
                                     f"dir {state_dir}, but {closed} is closed to other accounts: pass a --state-dir "
                                     "whose folders all have o+x")
