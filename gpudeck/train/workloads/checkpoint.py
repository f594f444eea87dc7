"""Checkpoints the built-in workloads save and resume from, one folder per job and node.

gpudeck points ``GPUDECK_CHECKPOINT_DIR`` at ``<agent state>/checkpoints/<job id>`` on every node, a
folder that outlives the job's attempts, so a job requeued after a lost node continues from its last
checkpoint instead of starting over. The folder is local to each node unless ``--checkpoint-dir``
names a shared file system, which is why resuming is agreed among the ranks instead of each rank
reading its own folder.

A workload's state is cut into *pieces*, each needed by some ranks: the data-parallel model (every
rank), the parameter server's state (rank 0), one piece per pipeline stage (that stage's rank).
A piece of step N is the file ``{workload}-{fingerprint}-{piece}-{N:08d}.pt``: written to a
temporary name, flushed to disk and renamed, so a killed rank leaves either the whole file or
none. The fingerprint hashes what makes checkpoints of one run unusable for another (model shape,
dtype, data seed, batch size, world size, mode), so a changed command starts afresh instead of
loading tensors of the wrong shape. The two newest steps of each piece are kept: the ranks of a
lock-step workload are at most one checkpoint apart when killed, so some step is complete.

Resuming (:meth:`Checkpoints.restore`), collective on every rank:

1. each rank lists the steps of each piece in its folder, as a fixed-size int64 tensor, and
   ``all_gather`` exchanges the lists: ``pieces * KEPT_REPORTED * 8`` bytes per rank, counted under
   ``all_gather``, the only traffic a fresh start adds;
2. every rank picks the same step: the newest one of which every piece is somewhere;
3. a rank that needs a piece reads it from its folder; where a needing rank lacks it (its node
   was replaced), the lowest rank that has it broadcasts it (counted under ``broadcast``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gpudeck.train.workloads.session import Session

KEEP = 2
KEPT_REPORTED = 4
_STEP = re.compile(r"^(\d{8})\.pt$")


def fingerprint(settings: Mapping[str, Any]) -> str:
    """A short hash of the settings a checkpoint depends on."""
    return hashlib.sha256(json.dumps(dict(settings), sort_keys=True).encode()).hexdigest()[:12]


class Checkpoints:
    """The checkpoint files of one workload run in one folder (``None``: checkpoints off)."""

    def __init__(self, directory: str | os.PathLike[str] | None, workload: str, settings: Mapping[str, Any]) -> None:
        self.directory = Path(directory) if directory else None
        self.workload = workload
        self.fingerprint = fingerprint({"workload": workload, **settings})

    def path(self, piece: str, step: int) -> Path:
        assert self.directory is not None
        return self.directory / f"{self.workload}-{self.fingerprint}-{piece}-{step:08d}.pt"

    def steps(self, piece: str) -> list[int]:
        """Steps of ``piece`` in the folder, newest first."""
        if self.directory is None or not self.directory.is_dir():
            return []
        prefix = f"{self.workload}-{self.fingerprint}-{piece}-"
        found = []
        for entry in os.listdir(self.directory):
            match = _STEP.match(entry[len(prefix):]) if entry.startswith(prefix) else None
            if match:
                found.append(int(match[1]))
        return sorted(found, reverse=True)

    def save(self, piece: str, step: int, state: dict[str, Any]) -> None:
        """Write ``piece`` of ``step`` atomically, then drop all but the newest KEEP steps of it."""
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.path(piece, step)
        temporary = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        with open(temporary, "wb") as file:
            torch.save({"workload": self.workload, "piece": piece, "step": step, "state": state}, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, final)
        _fsync_dir(self.directory)
        for old in self.steps(piece)[KEEP:]:
            try:
                self.path(piece, old).unlink()
            except FileNotFoundError:  # another rank sharing the folder removed it first
                pass

    def load(self, piece: str, step: int) -> dict[str, Any]:
        """The state of ``piece`` at ``step`` from this folder, on the CPU."""
        return torch.load(self.path(piece, step), map_location="cpu", weights_only=True)["state"]

    def restore(self, session: Session, needs: Mapping[str, set[int]]) -> tuple[int, dict[str, dict[str, Any]]]:
        """Agree on the newest complete step and return it with the states of the pieces this rank needs.

        ``needs`` maps every piece to the ranks that need it; every rank must pass the same. Step 0
        with no states means a fresh start.
        """
        pieces = sorted(needs)
        mine = torch.full((len(pieces), KEPT_REPORTED), -1, dtype=torch.int64)
        for row, piece in enumerate(pieces):
            held = self.steps(piece)[:KEPT_REPORTED]
            mine[row, :len(held)] = torch.tensor(held, dtype=torch.int64)
        gathered = [torch.empty_like(mine, device=session.device) for _ in range(session.world)]
        dist.all_gather(gathered, mine.to(session.device))
        held_by = [[set(g[row].tolist()) - {-1} for g in gathered] for row in range(len(pieces))]
        complete = set.intersection(*(set().union(*ranks) for ranks in held_by)) if pieces else set()
        if not complete:
            if session.rank == 0 and any(any(ranks) for ranks in held_by):
                session.log("checkpoints found, but no step of which every piece is on some node: starting over")
            return 0, {}
        step = max(complete)
        states: dict[str, dict[str, Any]] = {}
        for row, piece in enumerate(pieces):
            holders = [rank for rank, steps in enumerate(held_by[row]) if step in steps]
            if all(rank in holders for rank in needs[piece]):
                if session.rank in needs[piece]:
                    states[piece] = self.load(piece, step)
                continue
            source = holders[0]
            box: list[Any] = [self.load(piece, step) if session.rank == source else None]  # the broadcast fills it
            dist.broadcast_object_list(box, src=source, device=session.device)
            if session.rank in needs[piece]:
                states[piece] = box[0]
        return step, states


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
