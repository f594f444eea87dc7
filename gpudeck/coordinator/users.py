"""People: who makes each request, what they may do, and their tokens.

The join token stays what nodes join with and what the cluster's admin holds: its holder is the user
`admin`. The admin makes a token for each person (`gpudeck user add`). A user's token has the join
token's form (`gd1.<certificate pin>.<secret>`), so clients check the coordinator's certificate with
it before they send the secret; the coordinator keeps only a hash of the secret.

A user may see the cluster and every job, and may cancel their own jobs and read their logs and
outputs; an admin may do anything, including drain nodes and manage users. Nodes join only with the
join token: a user's token runs nobody's code on a machine.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from gpudeck.coordinator.store import JobRow, Store, UserRow
from gpudeck.protocol import auth

ADMIN = "admin"  # the join token's holder
USER_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")  # a POSIX account name, so a node can map it to one
MAX_USERS = 10_000


@dataclass(frozen=True)
class Caller:
    """Who a connection proved to be."""

    name: str
    admin: bool


def secret_hash(secret: str) -> str:
    """The stored form of a secret. The secrets are 256 random bits, so a plain hash is enough: there
    is nothing to guess that a slow hash would protect."""
    return hashlib.sha256(secret.encode()).hexdigest()


def name_problem(name: str) -> str | None:
    if not USER_NAME.match(name):
        return (f"{name!r} is not a usable user name (lower-case letters, digits, '_' and '-', at most 32, "
                "starting with a letter or '_', like a login name)")
    if name == ADMIN:
        return f"{ADMIN!r} is the join token's holder; give the new user their own name"
    return None


class People:
    def __init__(self, store: Store, join_token: auth.JoinToken) -> None:
        self.store = store
        self.join_token = join_token

    def caller(self, secret: str) -> Caller | None:
        """Who holds this secret: the admin for the join token's, a user for theirs, else nobody."""
        if auth.secret_matches(secret, self.join_token):
            return Caller(ADMIN, admin=True)
        user = self.store.user_with_secret_hash(secret_hash(secret))
        return Caller(user.name, user.admin) if user else None

    def add(self, caller: Caller, name: str, admin: bool, max_gpus: int | None, now: float) -> auth.JoinToken:
        """A new user and their token (shown once: only its hash is kept)."""
        need_admin(caller, "add users")
        problem = name_problem(name)
        if problem:
            raise ValueError(problem)
        if max_gpus is not None and not 1 <= max_gpus <= 1_000_000:
            raise ValueError("--max-gpus must be at least 1")
        if len(self.store.users()) >= MAX_USERS:
            raise ValueError(f"this cluster already has {MAX_USERS} users, the most it keeps")
        token = auth.JoinToken(fingerprint=self.join_token.fingerprint, secret=secrets.token_urlsafe(32))
        self.store.add_user(UserRow(name, secret_hash(token.secret), admin, max_gpus, now))
        return token

    def remove(self, caller: Caller, name: str) -> None:
        need_admin(caller, "remove users")
        self.store.remove_user(name)


def need_admin(caller: Caller, to: str) -> None:
    if not caller.admin:
        raise PermissionError(f"only an admin may {to}; you are {caller.name}")


def may_touch(caller: Caller, row: JobRow, to: str) -> None:
    """PermissionError unless the caller owns the job or is an admin."""
    if not caller.admin and row.owner != caller.name:
        owner = row.owner or "nobody in particular (it was submitted before there were users)"
        raise PermissionError(f"job {row.id} is {owner}'s: only its owner or an admin may {to} it")


def user_view(user: UserRow) -> dict[str, object]:
    """A user as `gpudeck user list --json` shows them: never their secret's hash."""
    return {"name": user.name, "admin": user.admin, "max_gpus": user.max_gpus, "created_at": user.created_at}
