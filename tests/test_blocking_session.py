"""The blocking session `gpudeck submit` uses, against a real coordinator and against a peer that never
answers: answers reach the request they belong to, refusals and a lost coordinator are sentences, and
the coordinator goes on serving."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Iterator

import pytest

from gpudeck.model import JobSpec, RunSpec
from gpudeck.protocol.auth import JoinToken
from gpudeck.protocol.blocking import BlockingSession
from gpudeck.protocol.handshake import Refused
from gpudeck.protocol.messages import ContentPut, ListJobs, Submit
from tests.cluster import Cluster


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path)
    try:
        cluster.start_coordinator()
        yield cluster
    finally:
        cluster.stop()


def _open(cluster: Cluster, token: str | None = None) -> BlockingSession:
    return BlockingSession.open("127.0.0.1", cluster.port, JoinToken.parse(token or cluster.token), "test")


def test_answers_reach_their_requests_in_any_order(coordinator: Cluster):
    spec = JobSpec(name="queued", gpus=1, run=RunSpec(workload="data-parallel"))
    with _open(coordinator) as session:
        assert session.welcome is not None and session.welcome.admin
        listed = session.send(ListJobs, after=0, limit=10)
        refused = session.send(ContentPut, digest="0" * 64, offset=0, data=b"x")
        submitted = session.send(Submit, spec=spec.to_wire())
        job = session.reply(submitted)
        with pytest.raises(Refused, match="not asked for: offer the project first"):
            session.reply(refused)
        assert session.reply(listed) == []
        assert job["name"] == "queued"
        assert session.request(ListJobs, after=0, limit=10)[0]["id"] == job["id"]


def test_a_wrong_secret_is_refused_and_the_coordinator_serves_on(coordinator: Cluster):
    other = "A" if coordinator.token[-1] != "A" else "B"
    with pytest.raises(Refused, match="the token is wrong"):
        _open(coordinator, coordinator.token[:-1] + other)
    assert coordinator.json("jobs") == []


def test_a_peer_that_never_answers_is_a_timeout_not_a_hang():
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) but never speaks TLS
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        token = JoinToken(fingerprint="0" * 64, secret="s" * 43)
        with pytest.raises(TimeoutError):
            BlockingSession.open("127.0.0.1", silent.getsockname()[1], token, "test", timeout=0.5)
