"""Whose rights a job's processes have (`gpudeck agent --run-as-owner`).

An agent starts every process of a job as its own user. Run as root with --run-as-owner, it starts
them as the node's local account named like the job's owner instead (that account's uid, gid,
groups and home), so a person's code runs with their own rights and not with root's; a job whose
owner has no account on the node runs as the agent's user, and its launcher log says so.

The account is given what its job writes (the logs folder, the exit-code file, the working copy or
the outputs folder, the job's checkpoints), each closed to other accounts; the job's own folder and
the records the agent keeps in it (job.json, exit.json, launcher.log) stay the agent's, so a job
cannot change what a restarted agent adopts and signals. The agent reads what a job left without
following links it may have put there (see `gpudeck.protocol.rank_end.read_left`).
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

READ, RUN = 4, 1  # permission bits of one class (owner, group, others)
PRIVATE = 0o700  # what the account is given: closed to every other account but root


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # every group the account is in, its own gid included
    home: str

    def env(self) -> dict[str, str]:
        """The variables a login of this account would have, in place of the agent's."""
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name}

    def spawn(self) -> dict[str, Any]:
        """The arguments of `asyncio.create_subprocess_exec` that start a process as this account."""
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}

    def may(self, path: str, want: int) -> bool:
        """Whether this account may pass through every folder on the way to `path` (also the way the
        links to it take) and then read, write or run it as `want` asks, by the mode bits (the
        agent, as root, may do anything, so `os.access` cannot tell)."""
        if self.uid == 0:
            return True
        real = Path(os.path.realpath(path))
        folders = {*Path(os.path.abspath(path)).parents, *real.parents}
        try:
            return all(self._allows(os.stat(f), RUN) for f in folders) and self._allows(os.stat(real), want)
        except OSError:
            return False

    def _allows(self, info: os.stat_result, want: int) -> bool:
        shift = 6 if info.st_uid == self.uid else 3 if info.st_gid in self.groups else 0
        return (info.st_mode >> shift) & want == want

    def give(self, path: Path) -> None:
        """Make `path` (a folder with everything in it, or a file) this account's, closed to others."""
        chown_tree(path, self.uid, self.gid)
        os.chmod(path, PRIVATE if path.is_dir() else 0o600)


def account_of(owner: str) -> Account | None:
    """The local account named `owner`, None where there is none (or the job has no owner)."""
    if not owner:
        return None
    try:
        entry = pwd.getpwnam(owner)
    except (KeyError, ValueError):  # ValueError: a name no account can have (a NUL in it)
        return None
    groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir)


def agent_user() -> str:
    """The name of the account the agent runs as, for sentences."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def runs_as_agent(owner: str, node: str) -> str:
    """The launcher log's sentence for a job whose owner has no account on this node."""
    why = "this job has no owner" if not owner else f"{node} has no local account named {owner}"
    return f"{why}, so the job runs as {agent_user()}, the agent's own user."


def chown_tree(path: Path, uid: int, gid: int) -> None:
    """Give `path` and everything under it to uid:gid without following a link: os.fwalk holds each
    folder open as it goes, so a folder a job swaps for a link meanwhile is not entered either."""
    os.chown(path, uid, gid, follow_symlinks=False)
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        return
    for _, folders, files, fd in os.fwalk(path):
        for name in folders + files:
            os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)


def closed_to_others(path: Path) -> Path | None:
    """The first folder on the way to `path` (itself included) that other accounts may not pass
    through, None when every account may; a missing one counts as open (the agent makes it)."""
    for folder in [*reversed(path.resolve().parents), path.resolve()]:
        try:
            mode = os.stat(folder).st_mode
        except FileNotFoundError:
            return None
        if not mode & stat.S_IXOTH:
            return folder
    return None


def spawn_as(account: Account | None) -> dict[str, Any]:
    """`Account.spawn` of `account`; nothing (the agent's own user) for None."""
    return account.spawn() if account is not None else {}
