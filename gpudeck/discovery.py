"""mDNS (`_gpudeck._tcp.local.`): advertising agents and the coordinator, and finding them.

Adverts are hints, never identity: whoever connects still checks the certificate pin and proves the
join token. `interfaces` names the addresses to multicast on; tests and `gpudeck up` pass loopback
so nothing reaches the machine's real network unless a user asks for the LAN.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from dataclasses import dataclass

from zeroconf import IPVersion, ServiceStateChange, get_all_addresses
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from gpudeck.protocol.messages import PROTOCOL_VERSION

SERVICE_TYPE = "_gpudeck._tcp.local."
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Advert:
    """What one gpudeck process says about itself on the network."""

    instance: str
    role: str  # "coordinator" or "agent"
    node: str
    host: str
    port: int
    gpus: int
    version: int


def _label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", text)[:50] or "gpudeck"


def _txt(info: AsyncServiceInfo, key: str) -> str:
    value = (info.properties or {}).get(key.encode())
    return value.decode(errors="replace") if isinstance(value, bytes) else ""


def _advert(info: AsyncServiceInfo) -> Advert | None:
    addresses = info.parsed_addresses(IPVersion.V4Only)
    role = _txt(info, "role")
    if not addresses or not info.port or role not in ("coordinator", "agent"):
        return None
    gpus = _txt(info, "gpus")
    version = _txt(info, "proto")
    return Advert(instance=info.name, role=role, node=_txt(info, "node"), host=addresses[0], port=info.port,
                  gpus=int(gpus) if gpus.isdigit() else 0, version=int(version) if version.isdigit() else 0)


class Discovery:
    """One zeroconf instance per process: at most one advert of its own, and a browser of everyone's."""

    def __init__(self, interfaces: list[str] | None = None) -> None:
        self.interfaces = interfaces
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._seen: dict[str, Advert] = {}
        self._lookups: set[asyncio.Task[None]] = set()
        self.changed = asyncio.Event()

    async def start(self) -> None:
        if self.interfaces:
            self._zc = AsyncZeroconf(interfaces=self.interfaces, ip_version=IPVersion.V4Only)
        else:
            self._zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])

    def _addresses(self) -> list[str]:
        if self.interfaces:
            return list(self.interfaces)
        return [a for a in get_all_addresses() if not a.startswith("127.")] or ["127.0.0.1"]

    async def advertise(self, role: str, node: str, port: int, gpus: int = 0) -> None:
        assert self._zc is not None, "start() first"
        self._info = AsyncServiceInfo(
            SERVICE_TYPE, f"{_label(role)}-{_label(node)}.{SERVICE_TYPE}", port=port,
            properties={"role": role, "node": node, "gpus": str(gpus), "proto": str(PROTOCOL_VERSION)},
            addresses=[socket.inet_aton(a) for a in self._addresses()],
        )
        await (await self._zc.async_register_service(self._info, allow_name_change=True))

    def _on_change(self, zeroconf: object, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            if self._seen.pop(name, None):
                self.changed.set()
            return
        task = asyncio.get_running_loop().create_task(self._look_up(service_type, name))
        self._lookups.add(task)
        task.add_done_callback(self._lookups.discard)

    async def _look_up(self, service_type: str, name: str) -> None:
        assert self._zc is not None
        info = AsyncServiceInfo(service_type, name)
        if await info.async_request(self._zc.zeroconf, 3000):
            advert = _advert(info)
            if advert:
                self._seen[name] = advert
                self.changed.set()

    def adverts(self, role: str | None = None) -> list[Advert]:
        own = self._info.name if self._info else None
        return sorted((a for a in self._seen.values() if a.instance != own and (role is None or a.role == role)),
                      key=lambda a: a.instance)

    async def wait_for(self, role: str, timeout: float) -> list[Advert]:
        """Adverts of `role` seen within `timeout` seconds (as soon as there is one)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.adverts(role) and (left := deadline - loop.time()) > 0:
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except asyncio.TimeoutError:
                break
        return self.adverts(role)

    async def close(self) -> None:
        """Send the goodbye (awaited, or it is never sent) and stop."""
        if self._zc is None:
            return
        for task in list(self._lookups):
            task.cancel()
        if self._browser:
            await self._browser.async_cancel()
        if self._info:
            try:
                await (await self._zc.async_unregister_service(self._info))
            except Exception as exc:  # noqa: BLE001 - a failed goodbye must not block shutdown
                log.debug("mDNS goodbye failed: %s", exc)
        await self._zc.async_close()
        self._zc = None
