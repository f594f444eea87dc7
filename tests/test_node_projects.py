"""A node's side of projects without a cluster: its content cache, working copies, what an
environment is keyed by and whether it installs torch, and upload progress on a terminal."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pty
from pathlib import Path

import pytest

from gpudeck import upload
from gpudeck.agent.environments import Environments, environment_key, names_torch, uv_binary
from gpudeck.agent.outputs import OutputKeeper
from gpudeck.agent.projects import ContentFetcher, FetchFailed, NodeCache
from gpudeck.project import CHUNK, Manifest, ProjectFile
from gpudeck.protocol.messages import Message
from gpudeck.protocol.node_messages import ContentChunk, FetchContent
from gpudeck.protocol.payloads import OutputFile


class Contents:
    """Answers fetches the way the coordinator does (`Coordinator._content_chunk`), from a dict."""

    def __init__(self, held: dict[str, bytes]) -> None:
        self.held = held
        self.asked: list[tuple[str, int]] = []
        self.fetcher = ContentFetcher(self.send)

    async def send(self, message: Message) -> bool:
        assert isinstance(message, FetchContent)
        self.asked.append((message.digest, message.offset))
        data = self.held.get(message.digest)
        chunk = ContentChunk(digest=message.digest, offset=message.offset, size=len(data or b""),
                             data=(data or b"")[message.offset:message.offset + CHUNK],
                             error="" if data is not None else "the coordinator no longer holds it")
        asyncio.get_running_loop().call_soon(self.fetcher.arrived, chunk)
        return True


def _file(path: str, data: bytes, executable: bool = False) -> tuple[ProjectFile, str]:
    digest = hashlib.sha256(data).hexdigest()
    return ProjectFile(path, len(data), digest, executable), digest


async def test_a_working_copy_is_made_of_copies_so_a_job_cannot_change_the_cache(tmp_path: Path):
    big = os.urandom(CHUNK * 2 + 5)
    script, script_digest = _file("run.sh", b"#!/bin/sh\necho hi\n", executable=True)
    data, data_digest = _file("data/weights.bin", big)
    contents = Contents({script_digest: b"#!/bin/sh\necho hi\n", data_digest: big})
    cache = NodeCache(tmp_path / "cache", contents.fetcher)
    manifest = Manifest((script, data))
    await cache.working_copy(manifest, tmp_path / "work")
    assert (tmp_path / "work" / "data" / "weights.bin").read_bytes() == big
    assert os.access(tmp_path / "work" / "run.sh", os.X_OK)
    (tmp_path / "work" / "data" / "weights.bin").write_bytes(b"changed by the job")
    assert cache.path(data_digest).read_bytes() == big
    asked = len(contents.asked)
    await cache.working_copy(manifest, tmp_path / "work2")
    assert len(contents.asked) == asked, "a second working copy fetches nothing"


async def test_jobs_wanting_one_content_at_once_fetch_it_once(tmp_path: Path):
    body = os.urandom(CHUNK + 1)
    entry, digest = _file("x.bin", body)
    contents = Contents({digest: body})
    cache = NodeCache(tmp_path / "cache", contents.fetcher)
    paths = await asyncio.gather(cache.fetch(digest), cache.fetch(digest), cache.fetch(digest))
    assert len(set(paths)) == 1 and paths[0].read_bytes() == body
    assert sorted(contents.asked) == [(digest, 0), (digest, CHUNK)]


async def test_damaged_or_missing_content_fails_with_a_sentence_and_is_not_kept(tmp_path: Path):
    entry, digest = _file("x.py", b"the real content")
    contents = Contents({digest: b"something else!"})
    cache = NodeCache(tmp_path / "cache", contents.fetcher)
    with pytest.raises(FetchFailed, match="arrived damaged"):
        await cache.fetch(digest)
    assert not cache.path(digest).exists() and not list((tmp_path / "cache" / "partial").iterdir())
    with pytest.raises(FetchFailed, match="no longer holds"):
        await cache.fetch("b" * 64)


async def test_the_cache_lets_the_least_recently_used_go_to_fit_a_new_project(tmp_path: Path):
    old, old_digest = _file("old.bin", b"o" * 600)
    recent, recent_digest = _file("recent.bin", b"r" * 600)
    new, new_digest = _file("new.bin", b"n" * 600)
    contents = Contents({old_digest: b"o" * 600, recent_digest: b"r" * 600, new_digest: b"n" * 600})
    cache = NodeCache(tmp_path / "cache", contents.fetcher, limit=1300)
    await cache.working_copy(Manifest((old,)), tmp_path / "w1")
    await cache.working_copy(Manifest((recent,)), tmp_path / "w2")
    os.utime(cache.path(old_digest), (1000, 1000))
    await cache.working_copy(Manifest((new, recent)), tmp_path / "w3")
    assert not cache.path(old_digest).exists() and cache.path(recent_digest).exists()
    too_big, _ = _file("huge.bin", b"h" * 2000)
    with pytest.raises(FetchFailed, match="does not fit in this node's cache"):
        await cache.working_copy(Manifest((too_big,)), tmp_path / "w4")


@pytest.mark.parametrize("files, named", [
    ({"requirements.txt": b"transformers\nnumpy<2\n"}, False),
    ({"requirements.txt": b"torch==2.13.0\n"}, True),
    ({"requirements.txt": b"# torch is the agent's\ntorchvision\n"}, False),
    ({"requirements.txt": b"Torch >= 2.4 ; python_version > '3'\n"}, True),
    ({"pyproject.toml": b'[project]\nname = "x"\ndependencies = ["torch>=2", "humanize"]\n'}, True),
    ({"pyproject.toml": b'[project]\nname = "x"\ndependencies = ["torchmetrics"]\n'}, False),
])
def test_uv_installs_torch_only_where_the_requirements_name_it(files: dict[str, bytes], named: bool):
    assert names_torch(files) is named


def test_an_environment_is_keyed_by_the_content_of_its_files():
    first = environment_key({"requirements.txt": b"humanize\n"})
    assert first == environment_key({"requirements.txt": b"humanize\n"})
    assert first != environment_key({"requirements.txt": b"humanize==4.0\n"})
    assert first != environment_key({"pyproject.toml": b"humanize\n"})


def test_upload_progress_shows_on_a_terminal_once_a_second_has_passed(monkeypatch: pytest.MonkeyPatch):
    clock = iter([0.0, 0.5, 1.5, 2.0])
    monkeypatch.setattr(upload.time, "monotonic", lambda: next(clock))
    main, side = pty.openpty()
    with os.fdopen(side, "w") as terminal:
        progress = upload._Progress(10 * 1024 * 1024, terminal)
        progress.add(1024 * 1024)
        progress.add(4 * 1024 * 1024)
        progress.end()
    shown = os.read(main, 4096).decode()
    os.close(main)
    assert "uploading the project: 5.0 MiB of 10 MiB" in shown and "1.0 MiB of" not in shown, shown


def test_no_progress_goes_to_a_pipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(upload.time, "monotonic", iter([0.0, 5.0, 6.0]).__next__)
    with open(tmp_path / "stderr", "w") as piped:
        progress = upload._Progress(100, piped)
        progress.add(50)
        progress.end()
    assert (tmp_path / "stderr").read_text() == ""


async def test_a_node_keeps_its_most_recently_used_environments_and_every_one_in_use(tmp_path: Path):
    if uv_binary() is None:
        pytest.skip("uv is not installed (it comes with gpudeck[train])")
    environments = Environments(tmp_path / "envs", keep=2)
    log = open(tmp_path / "build.log", "wb")
    made = {}
    for name in "abcd":  # requirements with nothing to install: real uv, no index needed
        made[name] = await environments.get({"requirements.txt": f"# {name}\n".encode()}, log)
        os.utime(tmp_path / "envs" / f"{made[name].key}.ready", (1000 + ord(name), 1000 + ord(name)))
        if name != "b":
            environments.release(made[name].key)
    kept = {name for name, env in made.items() if Path(env.python).exists()}
    assert kept == {"b", "c", "d"}, "a went (least recent); b stays while in use though older than c"
    again = await environments.get({"requirements.txt": b"# c\n"}, log)
    assert not again.built_now


def test_kept_outputs_go_past_their_time_or_oldest_first_past_their_space(tmp_path: Path):
    keeper = OutputKeeper(tmp_path / "kept", keep_for=100.0, space=2500)
    for job in (1, 2, 3):
        written = tmp_path / f"work-{job}"
        (written / "sub").mkdir(parents=True)
        (written / "sub" / "weights.bin").write_bytes(b"w" * 1000)
        assert keeper.keep(job, 1, written) == [OutputFile("sub/weights.bin", 1000)]
        os.utime(keeper.folder(job, 1), (1000.0 + job, 1000.0 + job))
    assert keeper.keep(4, 1, tmp_path / "wrote-nothing") == []
    assert keeper.prune(now=1050.0) == [(1, 1)], "3,000 bytes over a space of 2,500: the oldest goes"
    assert keeper.held() == [(2, 1), (3, 1)]
    assert keeper.prune(now=1102.5) == [(2, 1)], "job 2 is past its 100 s"
    with pytest.raises(LookupError, match="keeps no output"):
        keeper.read(3, 1, "../../etc/passwd", 0)
    assert keeper.read(3, 1, "sub/weights.bin", 0) == (b"w" * 1000, 1000)


def test_links_a_job_leaves_in_its_outputs_are_never_followed(tmp_path: Path):
    keeper = OutputKeeper(tmp_path / "kept")
    secret = tmp_path / "secret.txt"
    secret.write_text("the node's own file")
    linked = tmp_path / "work-link"
    linked.symlink_to("/")
    assert keeper.keep(1, 1, linked) == [], "an output folder replaced by a link is not kept"
    written = tmp_path / "work"
    (written / "real").mkdir(parents=True)
    (written / "real" / "a.txt").write_text("mine")
    (written / "leak.txt").symlink_to(secret)
    (written / "root").symlink_to("/")
    assert keeper.keep(2, 1, written) == [OutputFile("real/a.txt", 4)]
    for path in ("leak.txt", "root/etc/hostname"):
        with pytest.raises(LookupError, match="keeps no output"):
            keeper.read(2, 1, path, 0)
