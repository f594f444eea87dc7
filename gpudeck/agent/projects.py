"""This node's cache of project contents, and the working copies jobs run in.

Contents come from the coordinator, a few chunks in flight, each checked against its digest before it
is kept; a job's working copy is made of copies out of the cache (not links: a job writing to a file
of its working copy must not change what the next job gets). The cache is bounded: before a job's
contents are fetched, the least recently used ones go until it fits (running jobs have their copies).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Awaitable, Callable

from gpudeck.config import NODE_CACHE_LIMIT
from gpudeck.project import CHUNK, Manifest
from gpudeck.protocol.messages import Message
from gpudeck.protocol.node_messages import ContentChunk, FetchContent
from gpudeck.text import human_bytes

IN_FLIGHT = 4  # chunks of one content asked for ahead
IN_FLIGHT_PER_NODE = 8  # chunks asked for at once by the whole node
FETCH_TIMEOUT = 60.0
ANY_SIZE = 1 << 50  # the coordinator already held the manifest to its cap

Post = Callable[[Message], Awaitable[bool]]


class FetchFailed(Exception):
    """A content could not be fetched; the text says why, for the job's reason. `transient`: the
    connection to the coordinator dropped, so the job is placed again rather than failed."""

    def __init__(self, why: str, transient: bool = False) -> None:
        super().__init__(why)
        self.transient = transient


class ContentFetcher:
    """Asks the coordinator for chunks and hands each `ContentChunk` to whoever waits for it. At
    most IN_FLIGHT_PER_NODE chunks are asked for at once, however many jobs prepare: the coordinator
    cuts off a peer whose unsent bytes pass its outbox limit (16 MiB)."""

    def __init__(self, send: Post) -> None:
        self.send = send
        self._waiting: dict[tuple[str, int], asyncio.Future[ContentChunk]] = {}
        self._slots = asyncio.Semaphore(IN_FLIGHT_PER_NODE)

    async def chunk(self, digest: str, offset: int) -> ContentChunk:
        key = (digest, offset)
        async with self._slots:
            future = self._waiting.get(key)
            if future is None:
                future = self._waiting[key] = asyncio.get_running_loop().create_future()
                if not await self.send(FetchContent(digest=digest, offset=offset)):
                    self._forget(key, future)
                    raise FetchFailed("the coordinator is not connected", transient=True)
            try:
                chunk = await asyncio.wait_for(asyncio.shield(future), FETCH_TIMEOUT)
            except asyncio.TimeoutError:
                self._forget(key, future)  # asked again next time, not waited on for ever
                raise FetchFailed("the coordinator did not send the project's files in time", transient=True) from None
        self._forget(key, future)
        if chunk.error:
            raise FetchFailed(chunk.error)
        return chunk

    def _forget(self, key: tuple[str, int], future: asyncio.Future[ContentChunk]) -> None:
        if self._waiting.get(key) is future:
            del self._waiting[key]

    def arrived(self, chunk: ContentChunk) -> None:
        future = self._waiting.pop((chunk.digest, chunk.offset), None)
        if future is not None and not future.done():
            future.set_result(chunk)

    def disconnected(self) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(FetchFailed("the connection to the coordinator was lost", transient=True))
        self._waiting.clear()


class NodeCache:
    def __init__(self, root: Path, fetcher: ContentFetcher, limit: int = NODE_CACHE_LIMIT) -> None:
        self.root = root
        self.fetcher = fetcher
        self.limit = limit
        (root / "partial").mkdir(parents=True, exist_ok=True)
        for stale in (root / "partial").iterdir():  # left by an agent that stopped while fetching
            stale.unlink(missing_ok=True)
        self._fetching: dict[str, asyncio.Task[Path]] = {}
        self._pinned: Counter[str] = Counter()  # contents preparing jobs are about to copy

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    async def manifest(self, digest: str) -> Manifest:
        path = await self.fetch(digest)
        try:
            return Manifest.decode(path.read_bytes(), ANY_SIZE)
        except ValueError as exc:
            raise FetchFailed(str(exc)) from None

    async def fetch(self, digest: str) -> Path:
        """The cached content, fetched once however many jobs want it at the same time."""
        path = self.path(digest)
        if path.is_file():
            now = time.time()
            os.utime(path, (now, now))
            return path
        task = self._fetching.get(digest)
        if task is None:
            task = self._fetching[digest] = asyncio.create_task(self._download(digest))
            task.add_done_callback(lambda _: self._fetching.pop(digest, None))
        return await asyncio.shield(task)

    async def _download(self, digest: str) -> Path:
        partial = self.root / "partial" / digest
        hasher = hashlib.sha256()
        first = await self.fetcher.chunk(digest, 0)
        offsets = list(range(CHUNK, first.size, CHUNK))
        window: list[asyncio.Task[ContentChunk]] = []
        try:
            with open(partial, "wb") as handle:
                chunk: ContentChunk | None = first
                while chunk is not None:
                    while offsets and len(window) < IN_FLIGHT:
                        window.append(asyncio.create_task(self.fetcher.chunk(digest, offsets.pop(0))))
                    handle.write(chunk.data)
                    hasher.update(chunk.data)
                    chunk = await window.pop(0) if window else None
        except BaseException as exc:
            partial.unlink(missing_ok=True)
            for task in window:
                task.cancel()
            await asyncio.gather(*window, return_exceptions=True)
            if isinstance(exc, OSError):
                raise FetchFailed(f"could not write the project's files into {self.root}: {exc.strerror}") from None
            raise
        if hasher.hexdigest() != digest:
            partial.unlink(missing_ok=True)
            raise FetchFailed(f"a file of the project arrived damaged (digest {digest[:12]} does not match)")
        self.path(digest).parent.mkdir(exist_ok=True)
        os.replace(partial, self.path(digest))
        return self.path(digest)

    async def working_copy(self, manifest: Manifest, destination: Path) -> None:
        """Fetch what the cache lacks, then copy every file into `destination` (a fresh folder). Its
        contents are pinned meanwhile: another job's collect must not take them between the two."""
        pinned = [manifest.digest, *manifest.contents()]
        self._pinned.update(pinned)
        try:
            await asyncio.to_thread(self.collect, manifest)
            for digest in manifest.contents():
                await self.fetch(digest)
            await asyncio.to_thread(self._copy, manifest, destination)
        finally:
            self._pinned.subtract(pinned)

    def _copy(self, manifest: Manifest, destination: Path) -> None:
        if destination.exists():
            shutil.rmtree(destination)  # left by an agent that stopped while making it
        destination.mkdir(parents=True)
        for entry in manifest.files:
            target = destination / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.path(entry.digest), target)
            os.chmod(target, 0o755 if entry.executable else 0o644)

    def collect(self, wanted: Manifest) -> None:
        """Remove the least recently used contents `wanted` does not name until its missing ones fit."""
        names = set(wanted.contents()) | {wanted.digest} | {d for d, count in list(self._pinned.items()) if count > 0}
        held = []
        for path in self.root.glob("??/*"):
            try:
                info = path.stat()
            except OSError:
                continue  # another job's collect took it meanwhile
            held.append((info.st_mtime, info.st_size, path))
        size = sum(entry[1] for entry in held)
        needed = sum(s for d, s in wanted.contents().items() if not self.path(d).is_file())
        for _, file_size, path in sorted(held, key=lambda entry: entry[0]):
            if size + needed <= self.limit:
                return
            if path.name not in names:
                size -= file_size
                path.unlink(missing_ok=True)
        if size + needed > self.limit:
            raise FetchFailed(f"the project ({human_bytes(wanted.bytes)}) does not fit in this node's cache "
                              f"of {human_bytes(self.limit)}")
