"""A real headless Chromium for tests, driven over the Chrome DevTools Protocol with aiohttp (which
`gpudeck web` brings anyway), so no browser driver or automation library is needed.

The dashboard draws into xterm.js's canvas, where the DOM has no text to read. So the page is given,
before its own scripts run, a wrapper around `WebSocket` that keeps what the terminal receives and
sends; `HeadlessPage.text()` replays that into pyte, a terminal emulator, which gives the screen's
text as the browser's terminal shows it. Screenshots are the browser's own.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import pyte

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
WINDOW = (1280, 800)

# Keeps the terminal's traffic for the test: the bytes the page received (the dashboard's screen)
# and the size messages it sent.
RECORD_TERMINAL = """
(() => {
  const Native = window.WebSocket;
  const deck = window.__deck = {received: [], sizes: []};
  window.WebSocket = class extends Native {
    constructor(url, protocols) {
      super(url, protocols);
      const query = new URL(url, location.href).searchParams;
      deck.sizes.push([Number(query.get("width")), Number(query.get("height"))]);
      this.addEventListener("message", (event) => {
        if (typeof event.data !== "string") deck.received.push(new Uint8Array(event.data));
      });
      this.addEventListener("close", () => { deck.closed = true; });
    }
    send(data) {
      try {
        const [kind, value] = JSON.parse(data);
        if (kind === "resize") deck.sizes.push([value.width, value.height]);
      } catch (error) {}
      super.send(data);
    }
  };
})();
"""

TAKE_RECORD = """
(() => {
  const deck = window.__deck || {received: [], sizes: []};
  let text = "";
  for (const chunk of deck.received.splice(0)) {
    for (let i = 0; i < chunk.length; i += 4096) text += String.fromCharCode.apply(null, chunk.subarray(i, i + 4096));
  }
  return {bytes: btoa(text), sizes: deck.sizes.splice(0), closed: !!deck.closed};
})()
"""

KEYS = {"Enter": (13, "\r"), "Escape": (27, ""), "Tab": (9, "\t")}


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def install_chromium() -> str | None:
    """Debian's chromium, installed when it is missing and this test may (root with apt-get);
    None where it cannot be, with the test then skipped."""
    found = find_chromium()
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        if subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          timeout=900).returncode != 0:
            return None
    return find_chromium()


class Chromium:
    """One headless Chromium process with a profile of its own; `stop()` ends it by its PID."""

    def __init__(self, executable: str, profile: Path) -> None:
        self.executable = executable
        self.profile = profile
        self.proc: subprocess.Popen[bytes] | None = None
        self.http: aiohttp.ClientSession | None = None
        self.devtools = ""

    async def start(self, timeout: float = 60) -> None:
        log = open(self.profile.parent / "chromium.log", "ab")
        self.proc = subprocess.Popen(
            [self.executable, "--headless", "--no-sandbox", "--disable-gpu-sandbox", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
             "--disable-dev-shm-usage", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
             f"--window-size={WINDOW[0]},{WINDOW[1]}", "--remote-debugging-address=127.0.0.1",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile}", "about:blank"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"Chromium did not start; see {self.profile.parent / 'chromium.log'}")
            await asyncio.sleep(0.1)
        self.devtools = f"http://127.0.0.1:{port_file.read_text().split()[0]}"
        self.http = aiohttp.ClientSession()

    async def new_page(self) -> HeadlessPage:
        assert self.http is not None, "not started"
        async with self.http.put(f"{self.devtools}/json/new?about:blank") as response:
            target = await response.json()
        page = HeadlessPage(await self.http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=64 * 1024 * 1024))
        await page.call("Page.enable")
        await page.call("Page.addScriptToEvaluateOnNewDocument", source=RECORD_TERMINAL)
        return page

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.close()
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the browser and its helpers
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)


class HeadlessPage:
    """One tab: navigate, type, press keys, read the terminal's text, take a screenshot."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse[bool]) -> None:
        self.socket = socket
        self._ids = itertools.count(1)
        self.screen = pyte.Screen(80, 24)
        self.stream = pyte.ByteStream(self.screen)
        self.received = bytearray()  # everything the terminal was sent, to check what never appeared
        self.closed = False

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command and its result (events that arrive meanwhile are not needed)."""
        ident = next(self._ids)
        await self.socket.send_str(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads((await self.socket.receive(timeout=60)).data)
            if message.get("id") == ident:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message.get("result", {})

    async def open(self, url: str) -> None:
        await self.call("Page.navigate", url=url)

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    async def text(self) -> str:
        """The terminal's screen now, as lines of text."""
        record = await self.evaluate(TAKE_RECORD) or {}
        for width, height in record.get("sizes", []):
            if width and height and (width, height) != (self.screen.columns, self.screen.lines):
                self.screen.resize(height, width)
        chunk = base64.b64decode(record.get("bytes", ""))
        self.received += chunk
        self.stream.feed(chunk)
        self.closed = bool(record.get("closed"))
        return "\n".join(line.rstrip() for line in self.screen.display)

    async def page_text(self) -> str:
        """The HTML page's own text (what it says around the terminal)."""
        return await self.evaluate("document.body ? document.body.innerText : ''") or ""

    async def wait_for(self, what: str, test: Callable[[str], bool], timeout: float = 60,
                       read: Callable[[], Awaitable[str]] | None = None) -> str:
        """Poll the terminal's text (or `read`) until `test` holds; the last text is in the failure."""
        deadline = time.monotonic() + timeout
        seen = ""
        while time.monotonic() < deadline:
            seen = await (read or self.text)()
            if test(seen):
                return seen
            await asyncio.sleep(0.2)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; the page showed:\n{seen}")

    async def focus_terminal(self) -> None:
        await self.evaluate("document.querySelector('.xterm-helper-textarea').focus()")

    async def type(self, text: str) -> None:
        await self.call("Input.insertText", text=text)

    async def press(self, key: str) -> None:
        """A key as a person presses it: a named key (Enter) or one character."""
        code, char = KEYS.get(key, (ord(key.upper()) if len(key) == 1 else 0, key if len(key) == 1 else ""))
        down = {"key": key, "windowsVirtualKeyCode": code, "nativeVirtualKeyCode": code}
        await self.call("Input.dispatchKeyEvent", type="keyDown", text=char, **down)
        await self.call("Input.dispatchKeyEvent", type="keyUp", **down)

    async def screenshot(self, path: Path) -> Path:
        shot = await self.call("Page.captureScreenshot", format="png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path
