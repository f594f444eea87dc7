"""People (issue 13): user tokens made by the admin, jobs that carry their owner, owner-only cancel and
logs, admin-only drain and user management, and a removed user's token and sessions ended. Real
coordinator, agent and CLI processes on loopback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.cluster import Cluster, wait_until


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Cluster]:
    """A coordinator and one agent with 2 simulated GPUs."""
    cluster = Cluster(tmp_path)
    cluster.start_coordinator()
    cluster.start_agent("node-a", 2)
    cluster.wait_nodes("up", 1)
    yield cluster
    cluster.stop()


def add_user(cluster: Cluster, *args: str) -> str:
    """`gpudeck user add ...` as the admin; the new token, which is the output's last line."""
    return cluster.cli("user", "add", *args).stdout.strip().splitlines()[-1]


def refusal(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    return result.stderr.strip()


def test_user_tokens_own_their_jobs(lab: Cluster) -> None:
    ada, bob = add_user(lab, "ada", "--max-gpus", "2"), add_user(lab, "bob")
    assert ada.startswith("gd1.") and ada != bob != lab.token
    users = {u["name"]: u for u in lab.json("user", "list")}
    assert users["ada"]["max_gpus"] == 2 and not users["ada"]["admin"] and set(users) == {"ada", "bob"}
    assert all("hash" not in key and "token" not in key for user in users.values() for key in user)
    stored = b"".join(p.read_bytes() for p in lab.coordinator_dir.glob("gpudeck.db*"))
    assert ada.rsplit(".", 1)[1].encode() not in stored  # only the hash is kept

    adas = lab.submit_json("--name", "adas", "--no-project", "--", "sleep", "600", token=ada)
    bobs = lab.submit_json("--name", "bobs", "--no-project", "--", "sleep", "600", token=bob)
    admins = lab.submit_json("--name", "admins", "--no-project", "--", "sleep", "600")
    assert (adas["owner"], bobs["owner"], admins["owner"]) == ("ada", "bob", "admin")

    said = refusal(lab.cli("cancel", str(adas["id"]), check=False, token=bob))
    assert said == f"gpudeck: job {adas['id']} is ada's: only its owner or an admin may cancel it"
    assert "ada's" in refusal(lab.cli("logs", str(adas["id"]), check=False, token=bob))
    assert lab.job(adas["id"])["state"] != "cancelled"

    mine = lab.cli("jobs", "--mine", token=ada).stdout
    assert "adas" in mine and "bobs" not in mine and "OWNER" in mine
    assert [j["name"] for j in lab.json("jobs", "--user", "bob")] == ["bobs"]
    assert "no jobs match" in lab.cli("jobs", "--user", "carol").stdout

    lab.cli("cancel", str(adas["id"]), token=ada)
    lab.cli("cancel", str(bobs["id"]))  # the admin may cancel anyone's
    assert lab.wait_job(bobs["id"], ("cancelled",))["owner"] == "bob"
    lab.cli("cancel", str(admins["id"]))


def test_only_admins_manage_users_and_nodes(lab: Cluster) -> None:
    bob = add_user(lab, "bob")
    assert "only an admin may add users; you are bob" in refusal(lab.cli("user", "add", "eve", check=False, token=bob))
    assert "only an admin may drain nodes" in refusal(lab.cli("drain", "node-a", check=False, token=bob))
    assert "only an admin may remove users" in refusal(lab.cli("user", "remove", "bob", check=False, token=bob))
    boss = add_user(lab, "boss", "--admin")
    lab.cli("drain", "node-a", token=boss)
    lab.cli("drain", "node-a", "--off", token=boss)
    assert "already a user bob" in refusal(lab.cli("user", "add", "bob", check=False))
    assert "not a usable user name" in refusal(lab.cli("user", "add", "Bob\x1b[2J", check=False))
    assert "join token's holder" in refusal(lab.cli("user", "add", "admin", check=False))


def test_a_user_token_joins_no_node(lab: Cluster) -> None:
    bob = add_user(lab, "bob")
    lab.spawn("intruder", "agent", "--coordinator", f"127.0.0.1:{lab.port}", "--token", bob, "--name", "node-x",
              "--simulate-gpus", "1", "--no-mdns", "--state-dir", str(lab.root / "node-x"), "--warm", "0")
    wait_until(lambda: "a node joins only with the cluster's join token" in lab.logs_of("intruder"), 30,
               "the agent to be told a user token joins no node")
    assert [n["name"] for n in lab.nodes()] == ["node-a"]


def test_removing_a_user_ends_their_token_and_sessions(lab: Cluster) -> None:
    ada = add_user(lab, "ada")
    job = lab.submit_json("--no-project", "--", "sh", "-c", "echo started; sleep 600", token=ada)["id"]
    lab.wait_job(job, ("running",))
    follow = subprocess.Popen([sys.executable, "-m", "gpudeck", "logs", str(job), "--follow", "--coordinator",
                               f"127.0.0.1:{lab.port}", "--token", ada], env=lab.env, cwd=lab.root,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert follow.stdout is not None
        follow.stdout.readline()  # the job's first line: the follower's session is up
        assert "removed" in lab.cli("user", "remove", "ada").stdout
        _, err = follow.communicate(timeout=30)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    assert follow.returncode == 1 and "Traceback" not in err
    assert "the user ada was removed by admin" in err
    assert "the token is wrong" in refusal(lab.cli("jobs", check=False, token=ada))
    lab.cli("cancel", str(job))


def test_users_survive_a_coordinator_restart(lab: Cluster) -> None:
    ada = add_user(lab, "ada")
    lab.kill("coordinator")
    lab.start_coordinator()
    assert lab.cli("jobs", "--mine", token=ada).returncode == 0
    assert [u["name"] for u in lab.json("user", "list")] == ["ada"]


def test_one_users_flood_does_not_delay_anothers_first_job(lab: Cluster) -> None:
    """ada queues ten jobs on a two-GPU cluster; bob's one job, submitted after them all, is the next
    to start when a GPU frees: ada's use of the cluster lowers her jobs' fair share."""
    ada, bob = add_user(lab, "ada"), add_user(lab, "bob")
    flood = [lab.submit_json("--name", f"ada-{i}", "--no-project", "--", "sleep", "600", token=ada)["id"]
             for i in range(10)]
    for job in flood[:2]:
        lab.wait_job(job, ("running",))

    def share(job: int) -> float | None:
        factors = {f["name"]: f["value"] for f in lab.job(job)["priority_factors"]}
        return factors.get("fair_share")

    wait_until(lambda: (share(flood[-1]) or 1.0) < 1.0, 60, "ada's use to lower her fair share")
    theirs = lab.submit_json("--name", "bobs-first", "--no-project", "--", "sleep", "600", token=bob)["id"]
    assert share(theirs) == 1.0, "bob has used nothing"
    lab.cli("cancel", str(flood[0]), token=ada)
    assert lab.wait_job(theirs, ("starting", "running"))["owner"] == "bob"
    assert all(lab.job(job)["state"] == "pending" for job in flood[2:])
    for job in (*flood, theirs):
        lab.cli("cancel", str(job), check=False)
