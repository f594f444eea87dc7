"""`gpudeck web`: the dashboard in a browser, behind a token prompt.

From the cheapest up: the prompt under Pilot (recorded data, a stand-in token check); the web server
in this process with real websockets (aiohttp's client) and real dashboard processes, for the bounds
a visitor without a token meets; the command line; and the whole thing in a real headless Chromium
against a real coordinator and agent, with screenshots kept as artifacts.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import aiohttp
import pytest
from textual.widgets import Input, Static

from gpudeck.protocol.auth import JoinToken, PinMismatch
from gpudeck.protocol.handshake import Refused
from gpudeck.tui import login
from gpudeck.tui.app import GpudeckApp
from gpudeck.tui.client import RecordedLink
from gpudeck.tui.login import WRONG_TOKEN, LoginScreen
from gpudeck.tui.web import MAX_COLUMNS, MAX_ROWS, WebDeck, banner, session_command, terminal_size
from tests.browser import Chromium, install_chromium
from tests.cluster import ROOT, Cluster, free_port, wait_until
from tests.tui import recorded
from tests.tui.helpers import wait_for

TOKEN = JoinToken("ab" * 32, "s" * 43)
ARTIFACTS = Path(os.environ.get("GPUDECK_TEST_ARTIFACTS") or ROOT / "tests" / "artifacts")
NOWHERE = "127.0.0.1:9"  # the discard port: nothing answers, and these tests never type a token


# --- the prompt, under Pilot -----------------------------------------------------------------------


class TokenChecks:
    """The coordinator's side of the prompt: each check answers with the next of `answers`
    (an exception to raise, or None to accept)."""

    def __init__(self, *answers: BaseException | None) -> None:
        self.answers = list(answers)
        self.tokens: list[JoinToken] = []

    async def __call__(self, token: JoinToken) -> None:
        self.tokens.append(token)
        answer = self.answers.pop(0)
        if answer is not None:
            raise answer


def prompted_app(tmp_path: Path, checks: TokenChecks) -> GpudeckApp:
    return GpudeckApp(RecordedLink(recorded.snapshot()), keymap_path=tmp_path / "keymap.json", tick=0,
                      workloads={}, token_check=checks)


def answer_of(app: GpudeckApp) -> str:
    return str(app.screen.query_one("#login-answer", Static).render())


async def submit_token(pilot: Any, app: GpudeckApp, text: str) -> None:
    app.screen.query_one(Input).value = text
    await pilot.press("enter")


async def test_the_prompt_comes_first_and_nothing_else_applies(tmp_path):
    checks = TokenChecks(Refused("the join token is wrong", "bad_token"), None)
    app = prompted_app(tmp_path, checks)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, "the prompt", lambda: isinstance(app.screen, LoginScreen))
        token_input = app.screen.query_one(Input)
        assert token_input.password and app.focused is token_input
        await pilot.press("2", "s")
        assert isinstance(app.screen, LoginScreen) and token_input.value == "2s", "keys are only typed"
        assert not app.check_action("view", ("jobs",)) and not app.check_action("submit", ())
        assert list(app.get_system_commands(app.screen)) == [], "the palette offers nothing before a token"
        assert not app.cluster.connected, "nothing of the cluster is fetched before a token"

        await submit_token(pilot, app, "not a token")
        await wait_for(pilot, "the sentence", lambda: "not a gpudeck join token" in answer_of(app))
        assert checks.tokens == [], "a malformed token is not sent anywhere"

        await submit_token(pilot, app, str(TOKEN))
        await wait_for(pilot, "the refusal", lambda: WRONG_TOKEN in answer_of(app), seen=lambda: answer_of(app))
        assert isinstance(app.screen, LoginScreen) and not app.cluster.connected
        await wait_for(pilot, "another try", lambda: not token_input.disabled and app.focused is token_input)

        await submit_token(pilot, app, str(TOKEN))
        await wait_for(pilot, "the cluster", lambda: app.cluster.connected and not isinstance(app.screen, LoginScreen))
        assert checks.tokens == [TOKEN, TOKEN]
        assert app.check_action("view", ("jobs",))


async def test_the_prompt_ends_the_session_after_its_last_try(tmp_path, monkeypatch):
    monkeypatch.setattr(login, "LAST_WORD_FOR", 0.1)
    app = prompted_app(tmp_path, TokenChecks(*[Refused("wrong", "bad_token")] * login.MAX_TRIES))
    async with app.run_test(size=(100, 30)) as pilot:
        for _ in range(login.MAX_TRIES):
            await wait_for(pilot, "the prompt", lambda: not app.screen.query_one(Input).disabled)
            await submit_token(pilot, app, str(TOKEN))
        await wait_for(pilot, "the last word", lambda: "reload the page" in answer_of(app))
        await wait_for(pilot, "the end of the session", lambda: not app.is_running)
    assert not app.cluster.connected


async def test_the_prompt_ends_a_session_that_proves_no_token_in_time(tmp_path, monkeypatch):
    monkeypatch.setattr(login, "LOGIN_TIME", 0.5)
    app = prompted_app(tmp_path, TokenChecks())
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, "the end of the session", lambda: not app.is_running)


def test_refusals_are_one_sentence_each():
    assert login.refusal(Refused("the join token is wrong", "bad_token")) == WRONG_TOKEN
    assert "another cluster's" in login.refusal(PinMismatch("pin"))
    assert login.refusal(ConnectionRefusedError("refused")).startswith("Could not reach the coordinator")


# --- the web server, with real websockets ---------------------------------------------------------


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def eventually(what: str, predicate: Callable[[], Any], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.1)


async def open_session(http: aiohttp.ClientSession, url: str) -> aiohttp.ClientWebSocketResponse[bool]:
    """A websocket as the page opens it, once its dashboard has drawn something."""
    websocket = await http.ws_connect(f"{url}/ws?width=80&height=24", origin=url)
    while (await websocket.receive(timeout=60)).type != aiohttp.WSMsgType.BINARY:
        pass
    return websocket


def read_proc(pid: int, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb") as file:
        return file.read()


async def test_sessions_are_bounded_and_each_ends_with_its_websocket(monkeypatch):
    monkeypatch.setenv("GPUDECK_TOKEN", str(TOKEN))  # as an admin may have it exported
    deck = WebDeck(session_command(NOWHERE), max_sessions=2)
    url = f"http://127.0.0.1:{await deck.start('127.0.0.1', 0)}"
    pids: list[int] = []
    try:
        async with aiohttp.ClientSession() as http:
            first = await open_session(http, url)
            await open_session(http, url)
            pids = [process.pid for process in deck.sessions if process.pid]
            assert len(pids) == 2
            for pid in pids:
                assert TOKEN.secret.encode() not in read_proc(pid, "environ") + read_proc(pid, "cmdline")
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(f"{url}/ws", origin=url)
            assert refused.value.status == 503 and len(deck.sessions) == 2, "a third is refused before it runs"
            async with http.get(url) as page:
                assert page.status == 503 and "All 2 browser sessions" in await page.text()

            await first.close()
            await eventually("the first session's process to end", lambda: not alive(pids[0]))
            # The slot is given back once the session's handler has closed everything after its process;
            # a busy machine can run the next line before that.
            await eventually("the first session's slot to be free", lambda: deck.taken < deck.max_sessions)
            await open_session(http, url)  # its slot is free again
            pids += [process.pid for process in deck.sessions if process.pid and process.pid not in pids]
    finally:
        await deck.stop()
    assert len(pids) == 3 and not any(alive(pid) for pid in pids), "stopping the server ends every session"


async def test_starts_per_minute_are_bounded():
    deck = WebDeck(session_command(NOWHERE), starts_per_minute=1)
    url = f"http://127.0.0.1:{await deck.start('127.0.0.1', 0)}"
    try:
        async with aiohttp.ClientSession() as http:
            await (await open_session(http, url)).close()
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(f"{url}/ws", origin=url)
            assert refused.value.status == 503
    finally:
        await deck.stop()


async def test_other_sites_get_no_session():
    """A page of another origin (cross-site websocket) or another name (DNS rebinding) starts nothing."""
    deck = WebDeck(session_command(NOWHERE))
    port = await deck.start("127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.WSServerHandshakeError) as foreign:
                await http.ws_connect(f"{url}/ws", origin="http://pages.example")
            assert foreign.value.status == 403
            async with http.get(f"{url}/ws", headers={"Host": f"rebound.example:{port}"}) as rebound:
                assert rebound.status == 421
            async with http.get(url) as page:
                assert page.status == 200 and page.headers["X-Frame-Options"] == "DENY"
                assert "textual.js" in await page.text()
        assert deck.taken == 0 and not deck.sessions
    finally:
        await deck.stop()


def test_terminal_sizes_are_clamped():
    assert terminal_size("120", "40") == (120, 40)
    assert terminal_size(10**9, -5) == (MAX_COLUMNS, 1)
    assert terminal_size("wide", None) == (80, 24)
    assert terminal_size(10**9, 10**9)[1] == MAX_ROWS


def test_banner_says_how_to_reach_it():
    local = "\n".join(banner("127.0.0.1", 7080, "ada", "lab-head"))
    assert "http://127.0.0.1:7080" in local and "ssh -L 7080:127.0.0.1:7080 ada@lab-head" in local
    open_to_all = "\n".join(banner("0.0.0.0", 7080, "ada", "lab-head"))
    assert "http://lab-head:7080" in open_to_all and "anyone who can reach" in open_to_all


# --- the command line ---------------------------------------------------------------------------------


def gpudeck(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUDECK_")}
    env["GPUDECK_HOME"] = str(tmp_path / "home")
    return subprocess.run([sys.executable, "-m", "gpudeck", *args], capture_output=True, text=True, env=env,
                          timeout=60)


def test_web_command_refuses_what_it_cannot_do(tmp_path):
    no_coordinator = gpudeck(tmp_path, "web", "--no-mdns")
    assert no_coordinator.returncode == 2 and "needs --coordinator HOST:PORT" in no_coordinator.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = gpudeck(tmp_path, "web", "--no-mdns", "--coordinator", NOWHERE, "--port", str(taken.getsockname()[1]))
    assert busy.returncode == 1 and "cannot listen on 127.0.0.1" in busy.stderr
    assert "Traceback" not in no_coordinator.stderr + busy.stderr
    with_token = gpudeck(tmp_path, "--token", str(TOKEN), "web")
    assert with_token.returncode == 2 and "--token does not apply" in with_token.stderr


# --- in a real browser ----------------------------------------------------------------------------


@pytest.fixture
def chromium() -> str:
    found = install_chromium()
    if found is None:
        pytest.skip("needs Chromium (Debian's chromium package), which is not installed and cannot be "
                    "installed here (that takes root and apt-get)")
    return found


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return found


def start_web(cluster: Cluster) -> tuple[subprocess.Popen[bytes], str, Path]:
    """`gpudeck web` on a free loopback port, with the join token in its environment as an admin may
    have it: the sessions must not get it from there."""
    log = cluster.root / "web.log"
    env = dict(cluster.env, GPUDECK_TOKEN=cluster.token)
    web = subprocess.Popen([sys.executable, "-m", "gpudeck", "web", "--port", str(free_port()), "--no-mdns",
                            "--coordinator", f"127.0.0.1:{cluster.port}"],
                           stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, cwd=cluster.root)
    def listening() -> str | None:
        assert web.poll() is None, f"gpudeck web exited: {log.read_text()}"
        return next((word for word in log.read_text().split() if word.startswith("http://")), None)

    return web, wait_until(listening, 30, "gpudeck web to listen"), log


def stop_web(web: subprocess.Popen[bytes]) -> None:
    if web.poll() is None:
        web.send_signal(signal.SIGTERM)
        try:
            web.wait(timeout=20)
        except subprocess.TimeoutExpired:
            web.kill()
            web.wait(timeout=10)


@pytest.mark.timeout(900)  # the set-up may install Chromium first
async def test_the_dashboard_in_headless_chromium(tmp_path, chromium):
    cluster = Cluster(tmp_path)
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    browser = Chromium(chromium, profile)
    web = None
    try:
        cluster.start_coordinator()
        cluster.start_agent("node-a", 2)
        cluster.wait_nodes("up", 1)
        web, url, log = start_web(cluster)
        await browser.start()
        page = await browser.new_page()
        await page.open(url)

        await page.wait_for("the token prompt", lambda text: "Paste the token" in text)
        await page.screenshot(ARTIFACTS / "web-token-prompt.png")
        sessions = children(web.pid)
        assert len(sessions) == 1
        for name in ("environ", "cmdline"):
            assert cluster.token.encode() not in read_proc(sessions[0], name), f"the token is in the session's {name}"

        await page.focus_terminal()
        await page.type(cluster.token[:-6] + "wrong0")
        await page.press("Enter")
        refused = await page.wait_for("the refusal", lambda text: "did not accept this token" in text)
        assert "node-a" not in refused and b"node-a" not in page.received, "nothing of the cluster before a token"

        await page.type(cluster.token)
        await page.press("Enter")
        await page.wait_for("the nodes view with the simulated GPUs",
                            lambda text: "node-a" in text and "0 SIM" in text and "1 SIM" in text)
        await page.screenshot(ARTIFACTS / "web-nodes.png")

        await page.press("2")
        await page.wait_for("the jobs view", lambda text: "RUNTIME" in text and "0 SIM" not in text)
        await page.screenshot(ARTIFACTS / "web-jobs.png")

        await page.open("about:blank")  # the tab leaves: its websocket closes
        wait_until(lambda: not alive(sessions[0]), 30, "the session's process to end with its page")
        assert cluster.token not in log.read_text(), "the typed token is never logged"
    finally:
        await browser.stop()
        if web is not None:
            stop_web(web)
        cluster.stop()
