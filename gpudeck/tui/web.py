"""`gpudeck web`: the dashboard in a browser, for a laptop without a terminal set up or a wall screen.

textual-serve does the terminal part: its page (textual.js, on xterm.js) talks over one websocket,
and for each websocket one dashboard process runs under Textual's web driver (textual-serve's
`AppService` relays keys and screen between the two). What this module adds is what a server on a
cluster machine needs:

- It holds no token. Each session runs the dashboard behind its token prompt (tui/login.py); the
  session's command line says only where the coordinator is, and its environment has no token.
- A visitor without a token costs a bounded amount: at most `max_sessions` processes at a time and
  `starts_per_minute` started a minute, a terminal of at most MAX_COLUMNS x MAX_ROWS, and the prompt
  ends its session after a few tries or minutes. A closed websocket ends its process, which is
  killed if it has not quit within QUIT_GRACE; a process that ends closes its websocket.
- It listens on loopback by default, reached through an SSH tunnel, and then answers only requests
  addressed to a loopback name, so that a web page elsewhere cannot reach it by DNS rebinding; a
  websocket opened by a page of another origin is refused (browsers send the page's origin).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import shlex
import sys
import time
from collections import deque
from importlib.resources import files
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web
from textual_serve.app_service import AppService
from textual_serve.download_manager import DownloadManager

log = logging.getLogger("gpudeck.web")

MAX_SESSIONS = 4
STARTS_PER_MINUTE = 20  # each start costs about a second of CPU (a Python process importing Textual)
QUIT_GRACE = 5.0  # seconds a session's process has to quit after its websocket closed
MAX_COLUMNS, MAX_ROWS = 500, 200  # a wall screen with a small font; beyond, a size only costs memory
MAX_MESSAGE = 64 * 1024  # keys and pastes from the browser
HEARTBEAT = 15.0  # seconds; a browser that went away without closing is noticed within about this
TOKEN_VARIABLES = ("GPUDECK_TOKEN", "GPUDECK_TOKEN_FILE")
PAGE = Path(__file__).with_name("web.html")
STATIC = Path(str(files("textual_serve") / "static"))
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",  # no other site may frame the dashboard and steer its keys
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def session_command(coordinator: str | None, mdns_interfaces: list[str] | None = None) -> list[str]:
    """What each browser session runs: the dashboard behind the token prompt, told where the
    coordinator is and nothing secret."""
    argv = [sys.executable, "-m", "gpudeck.tui.web_session"]
    if coordinator:
        argv += ["--coordinator", coordinator]
    for interface in mdns_interfaces or []:
        argv += ["--mdns-interface", interface]
    return argv


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) can only mean this machine."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def terminal_size(width: Any, height: Any) -> tuple[int, int]:
    """The browser's terminal size in cells, clamped, since a huge one costs the session's memory."""
    def clamp(value: Any, default: int, most: int) -> int:
        try:
            return max(1, min(int(value), most))
        except (TypeError, ValueError):
            return default

    return clamp(width, 80, MAX_COLUMNS), clamp(height, 24, MAX_ROWS)


class DashboardProcess(AppService):
    """The process of one browser session (textual-serve's `AppService`), started with an
    environment that holds no token, so that only a typed one can open the cluster."""

    def __init__(self, argv: list[str], websocket: web.WebSocketResponse, downloads: DownloadManager) -> None:
        async def close() -> None:  # AppService takes a close that returns None; the websocket's says if it closed
            await websocket.close()

        # `exec`: the process textual-serve starts through the shell is the dashboard itself, so
        # that killing it kills the dashboard.
        super().__init__("exec " + shlex.join(argv), write_bytes=websocket.send_bytes, write_str=websocket.send_str,
                         close=close, download_manager=downloads)

    def _build_environment(self, width: int = 80, height: int = 24) -> dict[str, str]:
        environment = super()._build_environment(width, height)
        for name in TOKEN_VARIABLES:
            environment.pop(name, None)
        return environment

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def wait(self) -> None:
        """Until the process has ended, for whatever reason."""
        if self._process is not None:
            await self._process.wait()

    async def end(self) -> None:
        """Ask the dashboard to quit, and kill it if it has not within QUIT_GRACE: a stuck process
        must not keep a session's slot (or its memory) for ever."""
        process = self._process
        if process is None:
            return
        try:
            await asyncio.wait_for(self._quit(), QUIT_GRACE)
        except asyncio.TimeoutError:
            log.warning("browser session %d did not quit within %.0f s: killed", process.pid, QUIT_GRACE)
            if process.returncode is None:
                process.kill()
            await process.wait()

    async def _quit(self) -> None:
        await self.stop()
        await self.wait()


class WebDeck:
    """The web server: the page, its static files, and one `DashboardProcess` per websocket."""

    def __init__(self, command: list[str], loopback_only: bool = True, max_sessions: int = MAX_SESSIONS,
                 starts_per_minute: int = STARTS_PER_MINUTE) -> None:
        """`loopback_only`: answer only requests addressed to a loopback name (it listens on loopback)."""
        self.command = command
        self.loopback_only = loopback_only
        self.max_sessions = max_sessions
        self.starts_per_minute = starts_per_minute
        self.sessions: dict[DashboardProcess, web.WebSocketResponse] = {}
        self.taken = 0  # slots in use, counting sessions still starting
        self._starts: deque[float] = deque()
        self._downloads = DownloadManager()
        self._runner: web.AppRunner | None = None

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._addressed_here])
        app.add_routes([
            web.get("/", self._page),
            web.get("/ws", self._websocket),
            web.get("/download/{key}", self._download),
            web.static("/static", STATIC),
        ])
        app.on_response_prepare.append(_add_security_headers)
        return app

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the port (the one the system chose for 0). Raises OSError when it cannot."""
        self._runner = web.AppRunner(self.application(), access_log=None, handle_signals=False)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, host, port).start()
        except BaseException:
            await self._runner.cleanup()
            raise
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """End every session's process, then stop listening."""
        await asyncio.gather(*(self._close(process, websocket) for process, websocket in list(self.sessions.items())))
        if self._runner is not None:
            await self._runner.cleanup()

    @staticmethod
    async def _close(process: DashboardProcess, websocket: web.WebSocketResponse) -> None:
        await process.end()
        await websocket.close()

    # --- requests -----------------------------------------------------------------------------------

    @web.middleware
    async def _addressed_here(self, request: web.Request,
                              handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """On loopback, a request for another name is a page elsewhere reaching in by DNS rebinding."""
        if self.loopback_only and not is_loopback(urlsplit(f"//{request.host}").hostname or ""):
            raise web.HTTPMisdirectedRequest(text="gpudeck web answers only at 127.0.0.1 or localhost\n")
        return await handler(request)

    async def _page(self, request: web.Request) -> web.StreamResponse:
        if self.taken >= self.max_sessions:
            return web.Response(status=503, text=self.full(), headers={"Retry-After": "30"})
        return web.FileResponse(PAGE, headers={"Cache-Control": "no-store"})

    def full(self) -> str:
        return (f"All {self.max_sessions} browser sessions this gpudeck web allows are open. Close one (closing its "
                "tab is enough) and reload this page; whoever runs gpudeck web can allow more with --max-sessions.\n")

    def _refusal(self, request: web.Request) -> web.HTTPException | None:
        """Why a websocket may not start a session, before anything runs for it."""
        origin = request.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != request.host:
            return web.HTTPForbidden(text="a page of another site may not open a dashboard session\n")
        if self.taken >= self.max_sessions:
            return web.HTTPServiceUnavailable(text=self.full(), headers={"Retry-After": "30"})
        now = time.monotonic()
        while self._starts and now - self._starts[0] > 60:
            self._starts.popleft()
        if len(self._starts) >= self.starts_per_minute:
            return web.HTTPServiceUnavailable(text=f"{self.starts_per_minute} sessions were started in the last "
                                              "minute, the most allowed; try again in a minute\n",
                                              headers={"Retry-After": "60"})
        return None

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        refusal = self._refusal(request)
        if refusal is not None:
            log.warning("refused a browser session from %s: %s", request.remote, (refusal.text or "").strip())
            raise refusal
        self.taken += 1
        self._starts.append(time.monotonic())
        try:
            return await self._session(request)
        finally:
            self.taken -= 1

    async def _session(self, request: web.Request) -> web.WebSocketResponse:
        websocket = web.WebSocketResponse(heartbeat=HEARTBEAT, max_msg_size=MAX_MESSAGE)
        await websocket.prepare(request)
        process = DashboardProcess(self.command, websocket, self._downloads)
        self.sessions[process] = websocket
        closer: asyncio.Task[None] | None = None
        try:
            await process.start(*terminal_size(request.query.get("width"), request.query.get("height")))
            log.info("browser session %s started for %s (%d of %d open)", process.pid, request.remote,
                     self.taken, self.max_sessions)
            closer = asyncio.ensure_future(self._close_when_ended(process, websocket))
            await relay(websocket, process)
        finally:
            if closer is not None:
                closer.cancel()
            await self._close(process, websocket)
            del self.sessions[process]
            log.info("browser session %s ended", process.pid)
        return websocket

    @staticmethod
    async def _close_when_ended(process: DashboardProcess, websocket: web.WebSocketResponse) -> None:
        """A dashboard that ended by itself (quit, or no token in time) closes its page's websocket."""
        await process.wait()
        await websocket.close()

    async def _download(self, request: web.Request) -> web.StreamResponse:
        """A file a session delivers to its browser (Textual's screenshot), as textual-serve serves it."""
        key = request.match_info["key"]
        try:
            meta = await self._downloads.get_download_metadata(key)
        except KeyError:
            raise web.HTTPNotFound(text="there is no such download (each can be fetched once)\n") from None
        name = re.sub(r"[^A-Za-z0-9._-]", "_", meta.file_name) or "download"
        disposition = "inline" if meta.open_method == "browser" else "attachment"
        response = web.StreamResponse(headers={
            "Content-Type": meta.mime_type + (f"; charset={meta.encoding}" if meta.encoding else ""),
            "Content-Disposition": f'{disposition}; filename="{name}"'})
        await response.prepare(request)
        async for chunk in self._downloads.download(key):
            await response.write(chunk)
        await response.write_eof()
        return response


async def _add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)


async def relay(websocket: web.WebSocketResponse, process: DashboardProcess) -> None:
    """What the page sends, to the session's process, until the websocket closes. The page sends
    JSON lists: ["stdin", text], ["resize", {"width": w, "height": h}], ["ping", x], ["focus"],
    ["blur"]; anything else is dropped."""
    async for message in websocket:
        if message.type != WSMsgType.TEXT:
            continue
        try:
            envelope = json.loads(message.data)
        except ValueError:
            continue
        if isinstance(envelope, list) and envelope and isinstance(envelope[0], str):
            await forward(envelope[0], envelope[1] if len(envelope) > 1 else None, websocket, process)


async def forward(kind: str, data: Any, websocket: web.WebSocketResponse, process: DashboardProcess) -> None:
    if kind == "stdin" and isinstance(data, str):
        await process.send_bytes(data.encode("utf-8", "replace"))
    elif kind == "resize" and isinstance(data, Mapping):
        await process.set_terminal_size(*terminal_size(data.get("width"), data.get("height")))
    elif kind == "ping" and isinstance(data, str):
        await websocket.send_json(["pong", data[:64]])
    elif kind == "focus":
        await process.focus()
    elif kind == "blur":
        await process.blur()


def banner(host: str, port: int, user: str, machine: str) -> list[str]:
    """What `gpudeck web` says when it listens: where to browse, and from a laptop, how."""
    shown = f"[{host}]" if ":" in host else host
    if is_loopback(host):
        return [f"gpudeck web: the dashboard is at http://{shown}:{port} on this machine; each browser tab asks "
                "for the cluster's join token first.",
                f"From a laptop: ssh -L {port}:{shown}:{port} {user}@{machine}, then open http://127.0.0.1:{port}"]
    if host in ("0.0.0.0", "::"):
        shown = machine
    return [f"gpudeck web: the dashboard is at http://{shown}:{port}; each browser tab asks for the cluster's join "
            "token first.",
            f"It listens on {host}, not only on loopback: anyone who can reach this port can open the page and try "
            f"tokens (over plain HTTP). The default, 127.0.0.1 with ssh -L {port}:127.0.0.1:{port} {user}@{machine}, "
            "is safer."]
