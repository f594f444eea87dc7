"""A job's project: the files of the directory it is submitted from, each named by its content.

The CLI walks the directory (`collect`), leaving out what `.gitignore` and `.gpudeckignore` files
exclude, `.git` itself and the `gpudeck-outputs` folder that `gpudeck outputs` fills, hashes every
file, and offers the coordinator a `Manifest`; the coordinator asks only for the contents it does
not hold, and every node copies a job's working copy out of its own cache of contents. The manifest
is itself stored as content (its digest names the project), so a job carries one string, and the
coordinator, the agents and the CLI check it with the same rules here.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from gpudeck.text import human_bytes


DEFAULT_CAP = 512 * 1024 * 1024
MAX_FILES = 30_000  # a manifest of this many files is about 3 MiB: it fits in one frame
CHUNK = 1024 * 1024  # bytes of one upload or download frame
IGNORE_FILES = (".gitignore", ".gpudeckignore")
ALWAYS_LEFT_OUT = ".git"
OUTPUTS_HERE = "gpudeck-outputs"  # where `gpudeck outputs` puts what it fetches: never shipped back
DIGEST = re.compile(r"^[0-9a-f]{64}$")
_MAX_PATH = 1024


@dataclass(frozen=True)
class ProjectFile:
    path: str  # relative, with '/' between parts
    size: int
    digest: str  # sha256 of the content, hex
    executable: bool = False


@dataclass(frozen=True)
class Manifest:
    files: tuple[ProjectFile, ...]

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    def encode(self) -> builtins.bytes:  # `bytes` in this class is the property above
        """Canonical bytes (sorted paths, fixed keys), so equal projects have equal digests."""
        rows = [[f.path, f.size, f.digest, f.executable] for f in sorted(self.files, key=lambda f: f.path)]
        return json.dumps({"version": 1, "files": rows}, separators=(",", ":")).encode()

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.encode()).hexdigest()

    def contents(self) -> dict[str, int]:
        """Each distinct content's digest and size (equal files are stored and sent once)."""
        return {f.digest: f.size for f in self.files}

    def largest(self, count: int = 5) -> list[ProjectFile]:
        return sorted(self.files, key=lambda f: f.size, reverse=True)[:count]

    @classmethod
    def decode(cls, data: builtins.bytes, cap: int) -> "Manifest":
        """A manifest from a peer, checked: ValueError with a sentence on anything a node could not
        safely write (a path out of the working copy, a file inside a file) or over the cap."""
        try:
            body = json.loads(data)
            rows = body.get("files") if isinstance(body, dict) and body.get("version") == 1 else None
        except (ValueError, UnicodeDecodeError):
            rows = None
        if not isinstance(rows, list):
            raise ValueError("the project's manifest is not readable")
        if len(rows) > MAX_FILES:
            raise ValueError(f"the project has {len(rows)} files; at most {MAX_FILES} are shipped")
        manifest = cls(tuple(_file_of(row) for row in rows))
        _check_layout(manifest)
        if manifest.bytes > cap:
            raise ValueError(too_large(manifest, cap))
        return manifest


def _file_of(row: object) -> ProjectFile:
    if not (isinstance(row, list) and len(row) == 4 and isinstance(row[0], str)
            and isinstance(row[1], int) and not isinstance(row[1], bool) and isinstance(row[2], str)
            and isinstance(row[3], bool)):
        raise ValueError("the project's manifest has a malformed entry")
    path, size, digest, executable = row
    problem = path_problem(path)
    if problem:
        raise ValueError(f"the project's manifest names {path!r}: {problem}")
    if size < 0 or not DIGEST.match(digest):
        raise ValueError(f"the project's manifest has a malformed entry for {path!r}")
    return ProjectFile(path, size, digest, executable)


def path_problem(path: str) -> str | None:
    """Why a relative path from a peer could not be written inside a working copy, or None."""
    parts = path.split("/")
    if not path or len(path) > _MAX_PATH or "\0" in path or path.startswith("/"):
        return "not a relative path"
    if any(part in ("", ".", "..") for part in parts):
        return "a path must not contain empty, '.' or '..' parts"
    if parts[0] == ALWAYS_LEFT_OUT:
        return "the .git folder is never shipped"
    return None


def _check_layout(manifest: Manifest) -> None:
    paths = {f.path for f in manifest.files}
    if len(paths) != len(manifest.files):
        raise ValueError("the project's manifest names a file twice")
    for path in paths:
        parent = PurePosixPath(path).parent
        while str(parent) != ".":
            if str(parent) in paths:
                raise ValueError(f"the project's manifest has {str(parent)!r} as both a file and a folder")
            parent = parent.parent


def too_large(manifest: Manifest, cap: int, root: Path | None = None) -> str:
    largest = ", ".join(f"{f.path} ({human_bytes(f.size)})" for f in manifest.largest(3))
    what = f"the project {root}" if root else "the project"
    return (f"{what} is over the coordinator's cap of {human_bytes(cap)} for a job's files; its largest files "
            f"are {largest}. Leave them out with a .gpudeckignore file, or give --no-project")


# --- the submitting side -------------------------------------------------------------------------


def _gitignore(lines: list[str]) -> Any:
    import pathspec  # only for a project that has ignore files: every command imports this module

    return pathspec.GitIgnoreSpec.from_lines(lines)


class _Rules:
    """The ignore files in force for one folder: its own and those of every folder above it, the
    nearest deciding (as git reads nested .gitignore files)."""

    def __init__(self, parent: "_Rules | None", folder: Path, relative: str) -> None:
        self.parent, self.relative = parent, relative
        lines: list[str] = []
        for name in IGNORE_FILES:
            try:
                lines += (folder / name).read_text(errors="replace").splitlines()
            except OSError:
                continue
        self.spec = _gitignore(lines) if lines else None

    def ignored(self, relative: str, is_dir: bool) -> bool:
        rules: _Rules | None = self
        while rules is not None:
            if rules.spec is not None:
                inner = relative[len(rules.relative) + 1:] if rules.relative else relative
                result = rules.spec.check_file(inner + ("/" if is_dir else ""))
                if result.include is not None:
                    return bool(result.include)
            rules = rules.parent
        return False


def walk(root: Path, left_out: Path | None = None) -> Iterator[tuple[str, Path, os.stat_result]]:
    """Every file that would be shipped, as (relative path, path, stat), without reading any; the
    folder `left_out` (gpudeck's own, which a project in $HOME holds) is never entered."""
    stack: list[tuple[Path, str, _Rules | None]] = [(root, "", None)]
    while stack:
        folder, relative, parent_rules = stack.pop()
        rules = _Rules(parent_rules, folder, relative)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            path = f"{relative}/{entry.name}" if relative else entry.name
            if entry.name in (ALWAYS_LEFT_OUT, OUTPUTS_HERE) and not relative:
                continue
            if entry.is_dir(follow_symlinks=False):
                if not rules.ignored(path, True) and Path(entry.path) != left_out:
                    stack.append((Path(entry.path), path, rules))
                continue
            try:
                info = entry.stat()  # a link to a file ships the file's content
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode) and not rules.ignored(path, False) and path_problem(path) is None:
                yield path, Path(entry.path), info


def file_digest(path: Path) -> tuple[str, int]:
    """The content's digest and its size as read (a file being written may have grown since stat)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def collect(root: Path, cap: int, known: "DigestCache | None" = None) -> tuple[Manifest, dict[str, Path]]:
    """The project under `root` and where each content lies; ValueError with a sentence when it is
    over `cap` or has too many files (found before any file is read, by their sizes). Digests that
    `known` holds for unchanged files are taken from it instead of reading the files again."""
    found, total = [], 0
    cache = known or DigestCache(None)
    for item in walk(root, cache.folder):  # the walk stops at MAX_FILES: $HOME could take minutes
        found.append(item)
        total += item[2].st_size
        if len(found) > MAX_FILES:
            break
    if total > cap:
        sized = Manifest(tuple(ProjectFile(rel, info.st_size, "0" * 64) for rel, _, info in found))
        raise ValueError(too_large(sized, cap, root))
    if len(found) > MAX_FILES:
        raise ValueError(f"the project {root} has more than {MAX_FILES} files, the most that are shipped. "
                         "Leave some out with a .gpudeckignore file, or give --no-project")
    files, sources = [], {}
    for relative, path, info in found:
        try:
            digest, size = cache.digest(relative, path, info)
        except OSError as exc:
            raise ValueError(f"cannot read {relative} in the project {root}: {exc.strerror}; leave it out with a "
                             ".gpudeckignore file") from None
        files.append(ProjectFile(relative, size, digest, bool(info.st_mode & stat.S_IXUSR)))
        sources[digest] = path
    cache.save()
    return Manifest(tuple(files)), sources


class DigestCache:
    """The digests of a project's files from its last submit, each kept with the file's device, inode,
    size and change times (as git's index keeps them), so that a loop of submits reads only the files
    that changed. A file changed within `racy` seconds of being read is read again next time, since a
    second change inside one tick of the file system's clock would leave its times as they were.
    `path` None keeps nothing."""

    def __init__(self, path: Path | None, racy: float = 2.0) -> None:
        self.path = path.resolve() if path is not None else None
        # never shipped: it changes while a project that holds it (a submit from $HOME) is uploaded
        self.folder = self.path.parent if self.path is not None else None
        self.racy = racy
        self.entries: dict[str, list[Any]] = {}
        self.kept: dict[str, list[Any]] = {}
        if path is not None:
            try:
                loaded = json.loads(path.read_text())
                self.entries = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                pass

    @classmethod
    def of_project(cls, root: Path, folder: Path, racy: float = 2.0) -> "DigestCache":
        """The cache of the project at `root`, one file per project in `folder`."""
        return cls(folder / f"{hashlib.sha256(str(root).encode()).hexdigest()[:32]}.json", racy)

    def digest(self, relative: str, path: Path, info: os.stat_result) -> tuple[str, int]:
        stamp = [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]
        entry = self.entries.get(relative)
        if isinstance(entry, list) and entry[:-1] == stamp and isinstance(entry[-1], str) and DIGEST.match(entry[-1]):
            self.kept[relative] = entry
            return entry[-1], info.st_size
        digest, size = file_digest(path)
        settled = time.time_ns() - max(info.st_mtime_ns, info.st_ctime_ns) > self.racy * 1e9
        if size == info.st_size and settled:
            self.kept[relative] = [*stamp, digest]
        return digest, size

    def save(self) -> None:
        """Keep the digests of this walk's files (only those: the cache never outgrows the project)."""
        if self.path is None or self.kept == self.entries:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_suffix(f".{os.getpid()}.partial")
            partial.write_text(json.dumps(self.kept, separators=(",", ":")))
            os.replace(partial, self.path)
        except OSError:
            pass  # a cache that cannot be written costs only the reading of the files next time
