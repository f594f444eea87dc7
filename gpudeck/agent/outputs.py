"""The outputs a node keeps after its jobs end: what each attempt wrote under $GPUDECK_OUTPUT_DIR,
moved out of the working copy (which is then removed) and kept for a time or a space, whichever ends
first; the oldest go first. Files are read back for downloads only by paths the keeper listed."""

from __future__ import annotations

import os
import shutil
import stat
import threading
import time
from pathlib import Path

from gpudeck.config import KEEP_OUTPUTS_FOR, OUTPUTS_SPACE
from gpudeck.project import CHUNK, path_problem
from gpudeck.protocol.payloads import OutputFile



class OutputKeeper:
    def __init__(self, root: Path, keep_for: float = KEEP_OUTPUTS_FOR, space: int = OUTPUTS_SPACE) -> None:
        self.root = root
        self.keep_for, self.space = keep_for, space
        self._lock = threading.Lock()
        root.mkdir(parents=True, exist_ok=True)

    def folder(self, job: int, attempt: int) -> Path:
        return self.root / f"{job}-{attempt}"

    def keep(self, job: int, attempt: int, written: Path) -> list[OutputFile]:
        """Move what the attempt wrote into the keeper; the files kept, by path under the folder. A
        folder the job replaced by a link is not followed: only files inside it are ever kept."""
        target = self.folder(job, attempt)
        if written.is_symlink() or not written.is_dir() or not any(written.iterdir()):
            return []
        with self._lock:
            shutil.rmtree(target, ignore_errors=True)
            shutil.move(str(written), target)
            os.utime(target)  # kept now: the last to go
        return self.listing(job, attempt)

    def listing(self, job: int, attempt: int) -> list[OutputFile]:
        """Regular files under the attempt's folder (links, to files or folders, are left out)."""
        folder = self.folder(job, attempt)
        files = []
        for top, _folders, names in os.walk(folder):  # does not follow links to folders
            for name in names:
                path = Path(top) / name
                try:
                    info = path.lstat()
                except OSError:
                    continue
                if stat.S_ISREG(info.st_mode):
                    files.append(OutputFile(path=path.relative_to(folder).as_posix(), size=info.st_size))
        return sorted(files, key=lambda f: f.path)

    def held(self) -> list[tuple[int, int]]:
        """The (job, attempt) of every attempt whose outputs are kept here."""
        found = []
        for folder in sorted(self.root.iterdir()):
            job, _, attempt = folder.name.partition("-")
            if job.isdigit() and attempt.isdigit() and folder.is_dir() and not folder.is_symlink():
                found.append((int(job), int(attempt)))
        return found

    def read(self, job: int, attempt: int, path: str, offset: int) -> tuple[bytes, int]:
        """A chunk of a kept file; LookupError with a sentence when there is no such file."""
        folder = self.folder(job, attempt)
        target = folder / path
        missing = LookupError(f"this node keeps no output {path!r} of job {job}")
        if path_problem(path) or not target.resolve().is_relative_to(folder.resolve()):
            raise missing
        try:
            fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            raise missing from None
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise missing
            handle.seek(max(0, offset))
            return handle.read(CHUNK), os.fstat(fd).st_size

    def prune(self, now: float | None = None) -> list[tuple[int, int]]:
        """Remove kept outputs past their time, then the oldest until the rest fit the space; the
        (job, attempt) of each removed."""
        now = time.time() if now is None else now
        with self._lock:  # two jobs ending at once prune in two threads
            kept = []
            for job, attempt in self.held():
                folder = self.folder(job, attempt)
                try:
                    kept.append((folder.stat().st_mtime, folder, job, attempt))
                except OSError:
                    continue
            kept.sort(key=lambda t: t[0])
            sizes = {folder: sum(f.size for f in self.listing(job, attempt)) for _, folder, job, attempt in kept}
            total = sum(sizes.values())
            removed = []
            for mtime, folder, job, attempt in kept:
                if now - mtime <= self.keep_for and total <= self.space:
                    continue
                shutil.rmtree(folder, ignore_errors=True)
                total -= sizes[folder]
                removed.append((job, attempt))
            return removed
