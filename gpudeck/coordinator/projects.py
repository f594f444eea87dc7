"""The coordinator's store of project contents, by digest, from which agents copy what a job needs.

A client first offers a manifest (`offer`) and learns which contents are missing; it may then upload
only those, for that offer, in order, each checked against its digest before it is kept (`put`). So a
client costs at most one offer's worth of expected uploads in memory and one partial file per content
on disk. The store is bounded: once over its limit, the contents no unfinished job uses go, least
recently used first (`collect`).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from gpudeck.config import PROJECT_STORE_LIMIT
from gpudeck.project import CHUNK, DEFAULT_CAP, DIGEST, Manifest
from gpudeck.text import human_bytes

log = logging.getLogger(__name__)


class ProjectStoreFull(ValueError):
    """The coordinator's disk or its project store has no room for an upload; says so in a sentence."""


@dataclass
class _Upload:
    size: int
    received: int = 0
    digest: "hashlib._Hash" = field(default_factory=hashlib.sha256)


@dataclass
class _Offer:
    """What one connection may upload: the contents its latest offer lacked, by digest and size."""

    project: str
    expected: dict[str, int]
    uploads: dict[str, _Upload] = field(default_factory=dict)
    uploaded: int = 0  # bytes of contents completed for this offer


class ProjectStore:
    def __init__(self, root: Path, cap: int = DEFAULT_CAP, limit: int = PROJECT_STORE_LIMIT) -> None:
        self.root = root
        self.cap = cap
        self.limit = max(limit, cap)
        (root / "partial").mkdir(parents=True, exist_ok=True)
        for stale in (root / "partial").iterdir():
            stale.unlink(missing_ok=True)
        self._offers: dict[int, _Offer] = {}
        self.size = sum(p.stat().st_size for p in self._contents())

    def _contents(self) -> list[Path]:
        return [p for p in self.root.glob("??/*") if p.is_file()]

    def path(self, digest: str) -> Path:
        """Where a content lies; LookupError for anything but a digest (a peer's text never becomes a
        path of its own)."""
        if not DIGEST.match(digest):
            raise LookupError(f"{digest[:80]!r} is not a content digest")
        return self.root / digest[:2] / digest

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    # --- from clients ----------------------------------------------------------------------------

    def offer(self, client: int, data: bytes, keep: set[str]) -> dict[str, object]:
        """Check and keep a manifest; answer its digest and the contents still to upload."""
        manifest = Manifest.decode(data, self.cap)
        digest = manifest.digest
        if not self.has(digest):
            self._write(digest, data)
        now = time.time()
        missing = {}
        for content, size in manifest.contents().items():
            if self.has(content):
                os.utime(self.path(content), (now, now))  # recently used: the last to be collected
            else:
                missing[content] = size
        os.utime(self.path(digest), (now, now))
        self.forget_client(client)  # one offer at a time: what an earlier one left half uploaded goes
        in_flight = {offer.project for offer in self._offers.values()}  # other clients are uploading these
        self.collect(keep | in_flight | {digest}, room=sum(missing.values()))
        self._offers[client] = _Offer(digest, missing)
        return {"project": digest, "missing": sorted(missing), "files": len(manifest.files), "bytes": manifest.bytes}

    def put(self, client: int, digest: str, offset: int, data: bytes) -> int:
        """Append a chunk of an expected content; returns the bytes now held of it. The last chunk
        is checked against the digest, and only then is the content kept."""
        offer = self._offers.get(client)
        if offer is None or digest not in offer.expected:
            raise ValueError("that content was not asked for: offer the project first")
        upload = offer.uploads.setdefault(digest, _Upload(offer.expected[digest]))
        partial = self.root / "partial" / f"{client}-{digest}"
        if offset != upload.received or len(data) > CHUNK or upload.received + len(data) > upload.size:
            offer.uploads.pop(digest, None)
            partial.unlink(missing_ok=True)
            raise ValueError(f"an upload chunk of {digest[:12]} does not follow the bytes before it")
        try:
            with open(partial, "ab" if offset else "wb") as handle:
                handle.write(data)
        except OSError as exc:
            offer.uploads.pop(digest, None)
            partial.unlink(missing_ok=True)
            raise self._no_room(exc) from None
        upload.digest.update(data)
        upload.received += len(data)
        if upload.received == upload.size:
            del offer.uploads[digest], offer.expected[digest]
            if upload.digest.hexdigest() != digest:
                partial.unlink(missing_ok=True)
                raise ValueError("a file's content does not match what the project's manifest says: it changed "
                                 "while it was uploaded; submit again")
            self.path(digest).parent.mkdir(exist_ok=True)
            if not self.has(digest):  # another client may have completed the same content meanwhile
                self.size += upload.size
            os.replace(partial, self.path(digest))
            offer.uploaded += upload.size
        return upload.received

    def uploaded(self, client: int, project: str) -> int:
        """The bytes this client uploaded for its latest offer of `project` (0 for another)."""
        offer = self._offers.get(client)
        return offer.uploaded if offer is not None and offer.project == project else 0

    def complete(self, digest: str) -> Manifest:
        """The project `digest`, every content of it here; ValueError saying why it cannot run yet."""
        try:
            manifest = Manifest.decode(self.path(digest).read_bytes(), self.cap)
        except OSError:
            raise ValueError("the project was never offered to this coordinator") from None
        absent = [f.path for f in manifest.files if not self.has(f.digest)]
        if absent:
            raise ValueError(f"{len(absent)} files of the project were not uploaded (the first: {absent[0]})")
        return manifest

    def forget_client(self, client: int) -> None:
        offer = self._offers.pop(client, None)
        for digest in offer.uploads if offer else ():
            (self.root / "partial" / f"{client}-{digest}").unlink(missing_ok=True)

    # --- to agents -------------------------------------------------------------------------------

    def read(self, digest: str, offset: int) -> tuple[bytes, int]:
        """A chunk of a content at `offset`, and its whole size; LookupError when it is not here."""
        try:
            with open(self.path(digest), "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                handle.seek(max(0, offset))
                return handle.read(CHUNK), size
        except FileNotFoundError:
            raise LookupError(f"the coordinator no longer holds the content {digest[:12]}") from None
        except OSError as exc:
            raise LookupError(f"the coordinator could not read the content {digest[:12]}: {exc.strerror}") from None

    # --- bounds ----------------------------------------------------------------------------------

    def collect(self, keep: set[str], room: int = 0) -> None:
        """Remove the least recently used contents that no manifest in `keep` names until the store
        and `room` more fit in its limit."""
        if self.size + room <= self.limit:
            return
        needed: set[str] = set()
        for digest in keep:
            needed.add(digest)
            try:
                needed |= set(Manifest.decode(self.path(digest).read_bytes(), self.cap).contents())
            except (OSError, ValueError):
                continue
        for path in sorted(self._contents(), key=lambda p: p.stat().st_mtime):
            if self.size + room <= self.limit:
                break
            if path.name not in needed:
                self.size -= path.stat().st_size
                path.unlink(missing_ok=True)
        if self.size + room > self.limit:
            raise ProjectStoreFull(f"the coordinator's project store ({human_bytes(self.limit)}) is full with the "
                                   "projects of unfinished jobs; try again when some have ended")

    def _write(self, digest: str, data: bytes) -> None:
        partial = self.root / "partial" / f"manifest-{digest}"
        try:
            partial.write_bytes(data)
            self.path(digest).parent.mkdir(exist_ok=True)
            os.replace(partial, self.path(digest))
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise self._no_room(exc) from None
        self.size += len(data)

    def _no_room(self, exc: OSError) -> ProjectStoreFull:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return ProjectStoreFull(f"the coordinator's disk is full at {self.root}; the project was not stored")
        log.error("could not write to the project store %s: %s", self.root, exc)
        return ProjectStoreFull(f"the coordinator could not store the project ({exc.strerror or exc})")
