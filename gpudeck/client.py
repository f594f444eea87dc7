"""Connecting a client (the CLI, later the TUI) to the coordinator: where it is, and the session.

The address comes from --coordinator, $GPUDECK_COORDINATOR, the local coordinator's endpoint file,
or mDNS, in that order; every failure says what was tried, so a newcomer knows what to do next.
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from typing import AsyncIterator

from gpudeck.config import DEFAULT_PORT, Endpoint, local_endpoint
from gpudeck.discovery import Discovery
from gpudeck.protocol import auth
from gpudeck.protocol.session import ClientSession, open_session, split_address

MDNS_WAIT = 3.0


class NoCoordinator(ConnectionError):
    """No coordinator could be found or reached; the text says what was tried."""


async def find_endpoint(flag: str | None, mdns_interfaces: list[str] | None = None) -> Endpoint:
    if flag or os.environ.get("GPUDECK_COORDINATOR"):
        text = flag or os.environ["GPUDECK_COORDINATOR"]
        host, port = split_address(text, DEFAULT_PORT)
        return Endpoint(host, port, "--coordinator" if flag else "$GPUDECK_COORDINATOR")
    local = local_endpoint()
    if local:
        return local
    discovery = Discovery(mdns_interfaces)
    await discovery.start()
    try:
        found = await discovery.wait_for("coordinator", MDNS_WAIT)
    finally:
        await discovery.close()
    if found:
        return Endpoint(found[0].host, found[0].port, f"mDNS ({found[0].node})")
    raise NoCoordinator(
        "no coordinator found: none given with --coordinator HOST:PORT or $GPUDECK_COORDINATOR, none "
        "running from this machine's data dir, and none answered over mDNS. Start one with `gpudeck up` "
        "(all on this machine) or `gpudeck coordinator`."
    )


@asynccontextmanager
async def connect(endpoint: Endpoint, token: auth.JoinToken, name: str = "cli") -> AsyncIterator[ClientSession]:
    try:
        conn, _ = await open_session(endpoint.host, endpoint.port, token, "client", name)
    except auth.PinMismatch:
        raise
    except OSError as exc:
        raise NoCoordinator(
            f"cannot reach the coordinator at {endpoint.host}:{endpoint.port} (from {endpoint.how}): "
            f"{exc.strerror or exc}"
        ) from None
    session = ClientSession(conn)
    try:
        yield session
    finally:
        await session.close()
