"""Connecting a client (the CLI, later the TUI) to the coordinator: where it is, and the session.

The address comes from --coordinator, $GPUDECK_COORDINATOR, the local coordinator's endpoint file,
or mDNS, in that order; every failure says what was tried, so a newcomer knows what to do next.

A session is an asyncio `ClientSession` (`connect`) or, for a command that sends a few requests and
exits, a `BlockingSession` (`connect_blocking`); each session module is imported by what uses it, so
a blocking command never imports asyncio.
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, AsyncIterator

from gpudeck.config import DEFAULT_PORT, Endpoint, local_endpoint, split_address
from gpudeck.protocol import auth

if TYPE_CHECKING:
    from gpudeck.protocol.blocking import BlockingSession
    from gpudeck.protocol.messages import Welcome
    from gpudeck.protocol.session import ClientSession, Connection

MDNS_WAIT = 3.0


class NoCoordinator(ConnectionError):
    """No coordinator could be found or reached; the text says what was tried."""


def told_endpoint(flag: str | None) -> Endpoint | None:
    """Where the coordinator is when something on this machine says so, without asking the network."""
    if flag or os.environ.get("GPUDECK_COORDINATOR"):
        text = flag or os.environ["GPUDECK_COORDINATOR"]
        host, port = split_address(text, DEFAULT_PORT)
        return Endpoint(host, port, "--coordinator" if flag else "$GPUDECK_COORDINATOR")
    return local_endpoint()


async def find_endpoints(flag: str | None, mdns_interfaces: list[str] | None = None) -> list[Endpoint]:
    """Where the coordinator may be: one place when told, else every coordinator mDNS knows of."""
    told = told_endpoint(flag)
    if told:
        return [told]
    from gpudeck.discovery import Discovery  # zeroconf: imported only when nothing closer says where to go

    discovery = Discovery(mdns_interfaces)
    await discovery.start()
    try:
        found = await discovery.wait_for("coordinator", MDNS_WAIT)
    finally:
        await discovery.close()
    if found:
        return [Endpoint(a.host, a.port, f"mDNS ({a.node})") for a in found]
    raise NoCoordinator(
        "no coordinator found: none given with --coordinator HOST:PORT or $GPUDECK_COORDINATOR, none "
        "running from this machine's data dir, and none answered over mDNS. Start one with `gpudeck up` "
        "(all on this machine) or `gpudeck coordinator`."
    )


async def _open_first(endpoints: list[Endpoint], token: auth.JoinToken, name: str) -> tuple[Connection, Welcome]:
    """The first endpoint that proves to hold the token's certificate (see `_failure`)."""
    import asyncio

    from gpudeck.protocol.session import open_session

    failures = []
    for endpoint in endpoints:
        try:
            return await open_session(endpoint.host, endpoint.port, token, "client", name)
        except (auth.PinMismatch, OSError, asyncio.TimeoutError) as exc:
            failures.append(_failure(endpoint, exc, endpoints))
    raise NoCoordinator("; ".join(failures))


def _failure(endpoint: Endpoint, exc: BaseException, endpoints: list[Endpoint]) -> str:
    """Why `endpoint` was passed over. A coordinator that was named explicitly and fails the pin is an
    error (raised again here); a stale or foreign mDNS advert is only skipped."""
    if isinstance(exc, auth.PinMismatch):
        if len(endpoints) == 1:
            raise exc
        return f"{endpoint.host}:{endpoint.port} is another cluster's coordinator"
    return f"cannot reach the coordinator at {endpoint.host}:{endpoint.port} (from {endpoint.how}): {_why(exc)}"


def _why(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "nothing is listening there; is the coordinator running?"
    if isinstance(exc, TimeoutError):
        return "no answer in time; is a firewall in the way?"
    return getattr(exc, "strerror", None) or str(exc)


@asynccontextmanager
async def connect(endpoints: list[Endpoint], token: auth.JoinToken, name: str = "cli") -> AsyncIterator[ClientSession]:
    from gpudeck.protocol.session import ClientSession

    session = ClientSession(*await _open_first(endpoints, token, name))
    try:
        yield session
    finally:
        await session.close()


def connect_blocking(flag: str | None, token: auth.JoinToken, name: str = "cli") -> BlockingSession:
    """A blocking session with the coordinator found as `find_endpoints` finds it; asyncio is started
    only when nothing on this machine says where the coordinator is and mDNS must be asked."""
    from gpudeck.protocol.blocking import BlockingSession

    told = told_endpoint(flag)
    if told:
        endpoints = [told]
    else:
        import asyncio

        endpoints = asyncio.run(find_endpoints(flag))
    failures = []
    for endpoint in endpoints:  # as `_open_first`
        try:
            return BlockingSession.open(endpoint.host, endpoint.port, token, name)
        except (auth.PinMismatch, OSError) as exc:
            failures.append(_failure(endpoint, exc, endpoints))
    raise NoCoordinator("; ".join(failures))
