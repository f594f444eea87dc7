"""Projects without a cluster: what is shipped, what a manifest may say, and the coordinator's store."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from gpudeck.coordinator.projects import ProjectStore, ProjectStoreFull
from gpudeck.project import CHUNK, DigestCache, Manifest, ProjectFile, collect


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def _shipped(root: Path) -> set[str]:
    manifest, _ = collect(root, 1 << 30)
    return {f.path for f in manifest.files}


def test_ignore_files_nest_and_negate_as_git_reads_them_and_git_itself_never_ships(tmp_path: Path):
    _tree(tmp_path, {
        ".gitignore": "*.pt\nbuild/\n/data\n",
        ".gpudeckignore": "notes.txt\n",
        ".git/config": "x", "train.py": "x", "notes.txt": "x", "model.pt": "x", "data/big.bin": "x",
        "build/out.o": "x",
        "src/pkg/__init__.py": "x", "src/pkg/data/ok.json": "x", "src/pkg/keep.pt": "x",
        "src/.gitignore": "!keep.pt\n",
    })
    assert _shipped(tmp_path) == {".gitignore", ".gpudeckignore", "train.py", "src/.gitignore",
                                  "src/pkg/__init__.py", "src/pkg/data/ok.json", "src/pkg/keep.pt"}


def test_equal_projects_have_equal_digests_and_equal_files_one_content(tmp_path: Path):
    a = _tree(tmp_path / "a", {"x.py": "same", "y.py": "same", "z.py": "other"})
    b = _tree(tmp_path / "b", {"z.py": "other", "y.py": "same", "x.py": "same"})
    (a / "run.sh").write_text("#!/bin/sh\n")
    (a / "run.sh").chmod(0o755)
    (b / "run.sh").write_text("#!/bin/sh\n")
    (b / "run.sh").chmod(0o755)
    first, second = collect(a, 1 << 20)[0], collect(b, 1 << 20)[0]
    assert first.digest == second.digest
    assert len(first.contents()) == 3
    assert {f.path: f.executable for f in first.files}["run.sh"] is True


def test_the_digest_cache_reuses_digests_of_unchanged_files_and_reads_changed_ones(tmp_path: Path):
    root = _tree(tmp_path / "p", {"train.py": "print(1)\n", "data.csv": "a,b\n"})
    cache_dir = tmp_path / "cache"
    # racy=0: these files were written a moment ago, and the change time of a file cannot be set back
    first = collect(root, 1 << 20, DigestCache.of_project(root, cache_dir, racy=0))[0]
    assert first == collect(root, 1 << 20)[0], "the cache changes nothing about what is shipped"
    (cache_file,) = cache_dir.iterdir()
    kept = json.loads(cache_file.read_text())
    assert set(kept) == {"train.py", "data.csv"}
    # A digest the cache holds for a file whose device, inode, size and times are unchanged is used
    # as it is: the file is not read again.
    planted = "f" * 64
    kept["data.csv"][-1] = planted
    cache_file.write_text(json.dumps(kept))
    again = collect(root, 1 << 20, DigestCache.of_project(root, cache_dir, racy=0))[0]
    assert {f.path: f.digest for f in again.files}["data.csv"] == planted
    # Same size, mtime set back as before: the change time still moved, so the file is read.
    stamp = (root / "data.csv").stat()
    (root / "data.csv").write_text("c,d\n")
    os.utime(root / "data.csv", ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    changed = collect(root, 1 << 20, DigestCache.of_project(root, cache_dir, racy=0))[0]
    assert {f.path: f.digest for f in changed.files}["data.csv"] == hashlib.sha256(b"c,d\n").hexdigest()


def test_a_file_changed_just_now_is_not_cached_and_a_broken_cache_is_ignored(tmp_path: Path):
    root = _tree(tmp_path / "p", {"fresh.py": "x = 1\n", "old.py": "y = 2\n"})
    os.utime(root / "old.py", (time.time() - 7200, time.time() - 7200))
    cache_dir = tmp_path / "cache"
    # A window of an hour: both files changed within it (a change time cannot be set back), so
    # neither digest is trusted next time; with none, both are.
    collect(root, 1 << 20, DigestCache.of_project(root, cache_dir, racy=3600))
    assert not cache_dir.exists() or json.loads(next(cache_dir.iterdir()).read_text()) == {}
    collect(root, 1 << 20, DigestCache.of_project(root, cache_dir, racy=0))
    (cache_file,) = cache_dir.iterdir()
    assert set(json.loads(cache_file.read_text())) == {"fresh.py", "old.py"}
    for broken in ("{not json", "[1, 2]", json.dumps({"old.py": [1, 2]}), json.dumps({"old.py": "x"})):
        cache_file.write_text(broken)
        manifest = collect(root, 1 << 20, DigestCache.of_project(root, cache_dir))[0]
        assert manifest == collect(root, 1 << 20)[0], broken


def test_the_digest_cache_is_never_shipped_with_a_project_that_holds_it(tmp_path: Path):
    """A submit from $HOME, whose data dir holds the cache: the cache changes while the project is
    uploaded, so it must not be part of it (CI failed on this where the test cluster's home lay in
    the folder it submitted from)."""
    root = _tree(tmp_path / "p", {"train.py": "print(1)\n", "home/keymap.json": "{}"})
    for _ in range(2):
        manifest = collect(root, 1 << 20, DigestCache.of_project(root, root / "home" / "digests", racy=0))[0]
        assert {f.path for f in manifest.files} == {"train.py", "home/keymap.json"}
    assert list((root / "home" / "digests").iterdir()), "the cache was written, inside the project"


def test_a_project_over_the_cap_is_refused_naming_its_largest_files_before_any_is_read(tmp_path: Path):
    _tree(tmp_path, {"train.py": "x" * 10, "checkpoint.pt": "x" * 5000, "data.csv": "x" * 2000})
    with pytest.raises(ValueError) as refused:
        collect(tmp_path, 4096)
    text = str(refused.value)
    assert "over the coordinator's cap of 4.0 KiB" in text
    assert text.index("checkpoint.pt") < text.index("data.csv"), text
    assert ".gpudeckignore" in text


def _manifest(rows: list[list[object]]) -> bytes:
    return json.dumps({"version": 1, "files": rows}).encode()


DIGEST = "a" * 64


@pytest.mark.parametrize("rows, problem", [
    ([["../escape.py", 1, DIGEST, False]], "'..'"),
    ([["/etc/passwd", 1, DIGEST, False]], "not a relative path"),
    ([["a//b", 1, DIGEST, False]], "empty"),
    ([[".git/hooks/post-checkout", 1, DIGEST, True]], ".git"),
    ([["x.py", 1, DIGEST, False], ["x.py", 2, DIGEST, False]], "twice"),
    ([["pkg", 1, DIGEST, False], ["pkg/mod.py", 1, DIGEST, False]], "both a file and a folder"),
    ([["x.py", 1, "not-hex", False]], "malformed"),
    ([["x.py", -1, DIGEST, False]], "malformed"),
    ([["x.py", "1", DIGEST, False]], "malformed"),
    ([["x.py", 2000, DIGEST, False]], "over the coordinator's cap"),
])
def test_a_manifest_a_node_could_not_safely_write_is_refused(rows: list[list[object]], problem: str):
    with pytest.raises(ValueError, match=problem if problem != "'..'" else r"'\.\.'"):
        Manifest.decode(_manifest(rows), cap=1000)


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b'{"version": 2, "files": []}', b'{"version": 1}', b"\xff"])
def test_an_unreadable_manifest_is_one_sentence(data: bytes):
    with pytest.raises(ValueError, match="not readable"):
        Manifest.decode(data, cap=1000)


def _content(text: bytes) -> tuple[str, ProjectFile]:
    digest = hashlib.sha256(text).hexdigest()
    return digest, ProjectFile(f"{digest[:8]}.py", len(text), digest)


def test_the_store_asks_only_for_what_it_lacks_and_checks_each_upload(tmp_path: Path):
    store = ProjectStore(tmp_path / "projects", cap=4 << 20)
    body = b"x" * (CHUNK + 10)
    big, big_file = _content(body)
    small, small_file = _content(b"print()")
    manifest = Manifest((big_file, small_file))
    offer = store.offer(1, manifest.encode(), keep=set())
    project, missing = offer["project"], offer["missing"]
    assert isinstance(project, str) and isinstance(missing, list)
    assert sorted(missing) == sorted([big, small]) and offer["bytes"] == len(body) + 7
    with pytest.raises(ValueError, match="2 files of the project were not uploaded"):
        store.complete(project)
    with pytest.raises(ValueError, match="not asked for"):
        store.put(2, small, 0, b"print()")  # another connection made no offer
    with pytest.raises(ValueError, match="does not follow"):
        store.put(1, big, 5, body[:5])
    assert store.put(1, big, 0, body[:CHUNK]) == CHUNK
    assert store.put(1, big, CHUNK, body[CHUNK:]) == len(body)
    with pytest.raises(ValueError, match="changed while it was uploaded"):
        store.put(1, small, 0, b"print(1)"[:7])
    assert not store.has(small) and store.has(big)
    again = store.offer(1, manifest.encode(), keep=set())
    assert again["missing"] == [small] and again["project"] == offer["project"]
    store.put(1, small, 0, b"print()")
    assert store.complete(project).digest == project
    assert store.offer(3, manifest.encode(), keep=set())["missing"] == []
    assert not list((tmp_path / "projects" / "partial").iterdir())


def test_the_store_collects_the_least_recently_used_that_no_unfinished_job_needs(tmp_path: Path):
    store = ProjectStore(tmp_path / "projects", cap=3000, limit=3000)
    projects: list[tuple[str, str]] = []
    for index in range(3):
        digest, entry = _content(bytes([65 + index]) * 1000)
        manifest = Manifest((entry,))
        offer = store.offer(1, manifest.encode(), keep={p for p, _ in projects[:1]})
        store.put(1, digest, 0, bytes([65 + index]) * 1000)
        project = offer["project"]
        assert isinstance(project, str)
        projects.append((project, digest))
        os.utime(store.path(digest), (1000 + index, 1000 + index))
    first, second, third = projects
    assert store.has(first[1]), "the first project is in use by an unfinished job: kept"
    assert not store.has(second[1]), "the least recently used one nobody needs went"
    assert store.has(third[1])
    digest, entry = _content(b"Z" * 2900)
    with pytest.raises(ProjectStoreFull, match="full with the projects of unfinished jobs"):
        store.offer(1, Manifest((entry,)).encode(), keep={first[0], third[0]})


@pytest.mark.parametrize("digest", ["../../../etc/hostname", "/etc/hostname", "", "A" * 64, "a" * 63])
def test_the_store_reads_only_contents_named_by_a_digest(tmp_path: Path, digest: str):
    store = ProjectStore(tmp_path / "projects")
    with pytest.raises(LookupError, match="not a content digest"):
        store.read(digest, 0)
