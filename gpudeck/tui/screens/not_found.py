"""What to do when no coordinator is found."""

from __future__ import annotations

from rich.markup import escape
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static

from gpudeck import config
from gpudeck.text import visible
from gpudeck.tui.widgets.header import DeckHeader


class NotFoundScreen(Screen):
    """No coordinator (or no token): what was tried and how to get one; it keeps looking."""

    BINDINGS = [
        Binding("r", "retry", "Look again", id="notfound.retry"),
        Binding("q", "app.quit", "Quit", id="notfound.quit"),
    ]

    def __init__(self, reason: str, retry_in: float | None = None, asked: str | None = None) -> None:
        """`asked`: the coordinator the user named (flag or environment), which the advice repeats."""
        super().__init__()
        self.reason = reason
        self.retry_in = retry_in
        self.asked = asked

    def compose(self) -> ComposeResult:
        yield DeckHeader(show_clock=False)
        with VerticalScroll(id="notfound"):
            yield Static("No coordinator to show", classes="title")
            yield Static(self._reason_text(), id="notfound-reason")
            yield Static(
                "[b]To try gpudeck on this machine[/b], run in another terminal:\n\n"
                "    gpudeck up --simulate-gpus 4\n\n"
                "(or quit and run it here: it opens this dashboard itself). This screen connects by itself "
                "as soon as a coordinator answers.\n\n"
                "[b]To watch a cluster elsewhere[/b]:\n\n"
                f"    gpudeck --coordinator {escape(self.asked or f'HOST:{config.DEFAULT_PORT}')} --token-file FILE\n\n"
                "or set GPUDECK_COORDINATOR and GPUDECK_TOKEN. `gpudeck token` on the coordinator's machine "
                "prints the token.", markup=True, classes="advice")
        yield Footer()

    def _reason_text(self) -> Text:
        text = Text(visible(self.reason) or "looking for the coordinator…")  # it may quote mDNS adverts
        if self.retry_in is not None:
            text.append(f"\n\nlooking again in {self.retry_in:.0f} s (r looks now)", style="dim")
        return text

    def show(self, reason: str, retry_in: float | None) -> None:
        """New news from the search; a screen already closing (its widgets gone) just drops it."""
        self.reason, self.retry_in = reason, retry_in
        for widget in self.query("#notfound-reason").results(Static):
            widget.update(self._reason_text())

    def action_retry(self) -> None:
        self.deck_retry()

    def deck_retry(self) -> None:
        self.app.restart_link()  # type: ignore[attr-defined]
