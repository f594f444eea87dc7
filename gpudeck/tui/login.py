"""The token prompt a browser session of the dashboard (`gpudeck web`) shows before anything else.

Why: `gpudeck web` serves a page that anyone who reaches it can open, and it holds no token itself:
it gives none to the process of a session, neither in its command line nor in its environment. So
the token a person types here is the only way to the cluster. It is checked by connecting with it,
the pin and then the secret, as every client does; a wrong one gets one sentence and another try. A
session that has not proven a token within `MAX_TRIES` tries and `LOGIN_TIME` seconds ends, so a
visitor without a token holds a session only for so long.

`gpudeck.tui.web_session` is the process of one browser session that shows it.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Input, Static

from gpudeck.client import NoCoordinator
from gpudeck.protocol.auth import JoinToken, PinMismatch, TokenError
from gpudeck.protocol.handshake import Refused
from gpudeck.text import visible

MAX_TRIES = 5  # checks with the coordinator one session may make
LOGIN_TIME = 300.0  # seconds a session may take to prove a token
LAST_WORD_FOR = 5.0  # seconds the last refusal stays on screen before the session ends
TOKEN_LENGTH = 256  # a join token is about 110 characters; more is not one

TokenCheck = Callable[[JoinToken], Awaitable[None]]

WRONG_TOKEN = ("The coordinator did not accept this token: it is not this cluster's join token "
               "(`gpudeck token` prints it on the coordinator's machine).")


class LoginScreen(Screen[JoinToken]):
    """Asks for the join token until the coordinator accepts one; dismissed with that token."""

    CSS_PATH = "login.tcss"

    def __init__(self, check: TokenCheck) -> None:
        """`check` connects with a token and raises what the connection raised when it fails."""
        super().__init__()
        self.check = check
        self.tries = 0

    def compose(self) -> ComposeResult:
        with Vertical(id="login"):
            yield Static("gpudeck", id="login-title")
            yield Static("This dashboard shows a GPU cluster to those who hold its join token. Paste the token "
                         "and press Enter; `gpudeck token` prints it on the coordinator's machine.", id="login-text")
            yield Input(password=True, placeholder="gd1.…", max_length=TOKEN_LENGTH, id="login-token")
            yield Static("", id="login-answer")
            yield Static("Enter: connect · ctrl+q: end this session", id="login-keys")

    def on_mount(self) -> None:
        self.set_timer(LOGIN_TIME, self._time_is_up)
        self.query_one(Input).focus()

    def answer(self, sentence: str) -> None:
        self.query_one("#login-answer", Static).update(Text(sentence))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        typed, event.input.value = event.value, ""
        try:
            token = JoinToken.parse(typed)
        except TokenError as exc:
            self.answer(f"{str(exc)[:1].upper()}{str(exc)[1:]}.")
            return
        event.input.disabled = True
        self.answer("Checking the token with the coordinator…")
        self.run_worker(self._prove(token), group="login", exclusive=True)

    async def _prove(self, token: JoinToken) -> None:
        self.tries += 1
        try:
            await self.check(token)
        except (Refused, PinMismatch, NoCoordinator, OSError, ConnectionError, asyncio.TimeoutError, EOFError) as exc:
            self._refused(refusal(exc))
            return
        self.dismiss(token)

    def _refused(self, sentence: str) -> None:
        if self.tries >= MAX_TRIES:
            self.answer(f"{sentence} That was the last of {MAX_TRIES} tries: reload the page to start again.")
            self.set_timer(LAST_WORD_FOR, self.app.exit)
            return
        self.answer(sentence)
        token_input = self.query_one(Input)
        token_input.disabled = False
        token_input.focus()

    def _time_is_up(self) -> None:
        if self.is_current:
            self.app.exit()


def refusal(exc: BaseException) -> str:
    """The sentence for a token that did not open a connection, for someone new to gpudeck."""
    if isinstance(exc, Refused) and exc.code == "bad_token":
        return WRONG_TOKEN
    if isinstance(exc, Refused):
        return f"The coordinator refused this dashboard: {visible(str(exc))}."
    if isinstance(exc, PinMismatch):
        return ("This token is another cluster's: the coordinator's certificate is not the one it names, so "
                "nothing was sent.")
    return (f"Could not reach the coordinator to check the token ({visible(str(exc)) or type(exc).__name__}); "
            "try again when it is up.")
