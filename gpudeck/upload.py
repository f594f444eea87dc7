"""Moving files between the submitting machine and the cluster: shipping a project (offer its
manifest, upload what the coordinator lacks, a few chunks in flight; on the blocking session `submit`
uses) and downloading a job's kept outputs, with progress on a terminal when it takes more than a
moment."""

from __future__ import annotations

import sys
import time
from collections import deque
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from gpudeck import config
from gpudeck.project import CHUNK, DigestCache, collect, path_problem
from gpudeck.protocol.messages import ContentPut, ProjectOffer, ReadOutput
from gpudeck.text import human_bytes

if TYPE_CHECKING:
    from gpudeck.protocol.blocking import BlockingSession
    from gpudeck.protocol.session import ClientSession

IN_FLIGHT = 4  # chunks sent before the first is answered
PROGRESS_AFTER = 1.0  # seconds of uploading before progress is shown


class _Progress:
    """`uploading the project: 12 MiB of 80 MiB` on one line of stderr, once a second has passed."""

    def __init__(self, total: int, stream: IO[str], doing: str = "uploading the project") -> None:
        self.doing = doing
        self.total, self.done, self.stream = total, 0, stream
        self.started = time.monotonic()
        self.shown = False

    def add(self, count: int) -> None:
        self.done += count
        if self.stream.isatty() and time.monotonic() - self.started > PROGRESS_AFTER:
            self.shown = True
            self.stream.write(f"\r{self.doing}: {human_bytes(self.done)} of {human_bytes(self.total)}\x1b[K")
            self.stream.flush()

    def end(self) -> None:
        if self.shown:
            self.stream.write("\n")


def ship(session: BlockingSession, root: Path, cap: int, needed: list[str], stream: IO[str] = sys.stderr) -> str:
    """Offer the project under `root` and upload its missing contents; its digest. ValueError when it
    is over the cap or leaves out a `needed` file."""
    known = DigestCache.of_project(root, config.data_dir() / "digests")
    manifest, sources = collect(root, cap, known)
    shipped = {f.path for f in manifest.files}
    for path in needed:
        if path not in shipped:
            raise ValueError(f"{path} is left out of the project by a .gitignore or .gpudeckignore file")
    offer = session.request(ProjectOffer, manifest=manifest.encode())
    missing = [(digest, sources[digest]) for digest in offer["missing"]]
    sizes = manifest.contents()
    progress = _Progress(sum(sizes[d] for d, _ in missing), stream)
    try:
        for digest, source in missing:
            _upload(session, digest, source, sizes[digest], progress)
    finally:
        progress.end()
    return offer["project"]


def _upload(session: BlockingSession, digest: str, path: Path, size: int, progress: _Progress) -> None:
    """One content, in order, IN_FLIGHT chunks ahead (an empty file is one empty chunk)."""
    window: deque[int] = deque()
    try:
        with open(path, "rb") as handle:
            for offset in range(0, size, CHUNK) if size else [0]:
                data = handle.read(CHUNK)
                if len(data) != min(CHUNK, size - offset):
                    raise ValueError(f"{path} changed while it was uploaded; submit again")
                window.append(session.send(ContentPut, digest=digest, offset=offset, data=data))
                progress.add(len(data))
                if len(window) >= IN_FLIGHT:
                    session.reply(window.popleft(), timeout=120.0)
        while window:
            session.reply(window.popleft(), timeout=120.0)
    except (ConnectionError, TimeoutError):
        raise  # the session's, not the file's
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None


async def download_outputs(session: ClientSession, job: int, kept: dict[str, list[dict[str, Any]]],
                           destination: Path, stream: IO[str] = sys.stderr) -> int:
    """Fetch every kept file into `destination` (in a folder per node when several nodes keep some);
    the number of files written. Paths come from the coordinator and are checked again here."""
    total = sum(int(f["size"]) for files in kept.values() for f in files)
    progress = _Progress(total, stream, "downloading the outputs")
    count = 0
    try:
        for node, files in sorted(kept.items()):
            folder = destination / node if len(kept) > 1 else destination
            for entry in files:
                path = str(entry["path"])
                if path_problem(path):
                    raise ValueError(f"the coordinator named an output {path!r} that cannot be written here")
                await _download(session, job, node, path, folder / path, progress)
                count += 1
    finally:
        progress.end()
    return count


async def _download(session: ClientSession, job: int, node: str, path: str, target: Path,
                    progress: _Progress) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "xb") as handle:
            offset, size = 0, None
            while size is None or offset < size:
                chunk = await session.request(ReadOutput, job=job, node=node, path=path, offset=offset, timeout=120.0)
                size = chunk["size"]
                if not chunk["data"] and offset < size:
                    raise ValueError(f"{path} on {node} became shorter while it was downloaded")
                handle.write(chunk["data"])
                offset += len(chunk["data"])
                progress.add(len(chunk["data"]))
    except FileExistsError:
        raise ValueError(f"{target} already exists: give another --to, or move it away") from None
    except OSError as exc:
        raise ValueError(f"cannot write {target}: {exc.strerror}") from None
