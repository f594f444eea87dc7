"""A client that holds the token but misbehaves with projects: every wrong upload is refused in a
sentence, nothing half-uploaded can be run, and the coordinator goes on serving everyone."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

import pytest

from gpudeck.client import connect
from gpudeck.config import Endpoint
from gpudeck.model import JobSpec, RunSpec
from gpudeck.project import Manifest, ProjectFile
from gpudeck.protocol.auth import JoinToken
from gpudeck.protocol.messages import ContentPut, ListJobs, ProjectOffer, Submit
from gpudeck.protocol.handshake import Refused
from tests.cluster import Cluster


@pytest.fixture
def one_node(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path)
    try:
        cluster.start_coordinator()
        cluster.start_agent("node-a")
        cluster.wait_nodes("up", 1)
        cluster.cli("drain", "node-a")  # jobs stay queued: only the coordinator is under test
        yield cluster
    finally:
        cluster.stop()


def _entry(path: str, data: bytes) -> ProjectFile:
    return ProjectFile(path, len(data), hashlib.sha256(data).hexdigest())


async def test_wrong_uploads_are_refused_and_only_a_whole_project_runs(one_node: Cluster):
    script = b"print('hello')\n"
    manifest = Manifest((_entry("train.py", script),))
    spec = JobSpec(name="shipped", gpus=1, run=RunSpec(script_name="train.py", project=manifest.digest))
    escaping = json.dumps({"version": 1, "files": [["../../etc/cron.d/x", 1, "a" * 64, False]]}).encode()
    async with connect([Endpoint("127.0.0.1", one_node.port, "test")], JoinToken.parse(one_node.token)) as session:
        with pytest.raises(Refused, match="not asked for: offer the project first"):
            await session.request(ContentPut, digest=manifest.files[0].digest, offset=0, data=script)
        with pytest.raises(Refused, match=r"names '\.\./\.\./etc/cron\.d/x'"):
            await session.request(ProjectOffer, manifest=escaping)
        with pytest.raises(Refused, match="not readable"):
            await session.request(ProjectOffer, manifest=b"\x00garbage")
        with pytest.raises(Refused, match="never offered"):
            await session.request(Submit, spec=spec.to_wire())
        offer = await session.request(ProjectOffer, manifest=manifest.encode())
        assert offer["missing"] == [manifest.files[0].digest] and offer["project"] == manifest.digest
        with pytest.raises(Refused, match="1 files of the project were not uploaded"):
            await session.request(Submit, spec=spec.to_wire())
        with pytest.raises(Refused, match="does not follow the bytes before it"):
            await session.request(ContentPut, digest=manifest.files[0].digest, offset=3, data=script[3:])
        with pytest.raises(Refused, match="changed while it was uploaded"):
            await session.request(ContentPut, digest=manifest.files[0].digest, offset=0, data=b"print('HELLO')\n")
        assert await session.request(ListJobs, after=0, limit=10) == []
        await session.request(ProjectOffer, manifest=manifest.encode())
        await session.request(ContentPut, digest=manifest.files[0].digest, offset=0, data=script)
        job = await session.request(Submit, spec=spec.to_wire())
        assert job["project"] == {"files": 1, "bytes": len(script), "uploaded_bytes": len(script)}
    assert [j["name"] for j in one_node.json("jobs")] == ["shipped"], "the coordinator goes on serving"
