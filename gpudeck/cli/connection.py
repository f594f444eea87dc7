"""How a client command reaches the coordinator its flags (`parsers.client_flags`) name."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Awaitable, Callable

from gpudeck import config

if TYPE_CHECKING:
    from gpudeck.protocol.session import ClientSession


async def with_session(args: argparse.Namespace, work: Callable[[ClientSession], Awaitable[int]]) -> int:
    from gpudeck.client import connect, find_endpoints

    token = config.find_token(args.token, args.token_file)
    endpoints = await find_endpoints(args.coordinator)
    async with connect(endpoints, token) as session:
        return await work(session)
