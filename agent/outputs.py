"""The outputs a node keeps after its jobs end: what each attempt wrote under $GPUDECK_OUTPUT_DIR,
moved out of the working copy (which is then removed) and kept for a time or a space, whichever ends
first; the oldest go first. Files are read back for downloads only by paths the keeper listed."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from gpudeck.project import CHUNK, path_problem
from gpudeck.protocol.payloads import OutputFile

DEFAULT_KEEP_FOR = 7 * 86400.0
DEFAULT_SPACE = 10 * 1024**3


class OutputKeeper:
    def __init__(self, root: Path, keep_for: float = DEFAULT_KEEP_FOR, space: int = DEFAULT_SPACE) -> None:
        self.root = root
        self.keep_for, self.space = keep_for, space
        root.mkdir(parents=True, exist_ok=True)

    def folder(self, job: int, attempt: int) -> Path:
        return self.root / f"{job}-{attempt}"

    def keep(self, job: int, attempt: int, written: Path) -> list[OutputFile]:
        """Move what the attempt wrote into the keeper; the files kept, by path under the folder."""
        target = self.folder(job, attempt)
        if not written.is_dir() or not any(written.iterdir()):
            return []
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(written), target)
        return self.listing(job, attempt)

    def listing(self, job: int, attempt: int) -> list[OutputFile]:
        folder = self.folder(job, attempt)
        files = []
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                files.append(OutputFile(path=path.relative_to(folder).as_posix(), size=path.stat().st_size))
        return files

    def held(self) -> list[tuple[int, int]]:
        """The (job, attempt) of every attempt whose outputs are kept here."""
        found = []
        for folder in sorted(self.root.iterdir()):
            job, _, attempt = folder.name.partition("-")
            if folder.is_dir() and job.isdigit() and attempt.isdigit():
                found.append((int(job), int(attempt)))
        return found

    def read(self, job: int, attempt: int, path: str, offset: int) -> tuple[bytes, int]:
        """A chunk of a kept file; LookupError with a sentence when there is no such file."""
        folder = self.folder(job, attempt)
        target = folder / path
        if path_problem(path) or not target.is_file() or target.is_symlink():
            raise LookupError(f"this node keeps no output {path!r} of job {job}")
        with open(target, "rb") as handle:
            handle.seek(max(0, offset))
            return handle.read(CHUNK), os.fstat(handle.fileno()).st_size

    def prune(self, now: float | None = None) -> list[tuple[int, int]]:
        """Remove kept outputs past their time, then the oldest until the rest fit the space; the
        (job, attempt) of each removed."""
        now = time.time() if now is None else now
        kept = sorted(((d.stat().st_mtime, d) for d in self.root.iterdir() if d.is_dir()), key=lambda t: t[0])
        sizes = {d: sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) for _, d in kept}
        total = sum(sizes.values())
        removed = []
        for mtime, folder in kept:
            if now - mtime <= self.keep_for and total <= self.space:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            total -= sizes[folder]
            job, _, attempt = folder.name.partition("-")
            if job.isdigit() and attempt.isdigit():
                removed.append((int(job), int(attempt)))
        return removed
