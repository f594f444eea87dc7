"""The header with the coordinator's address and the cluster's counts, and the banner under it."""

from __future__ import annotations

from rich.text import Text
from textual import events
from textual.css.query import NoMatches
from textual.dom import NoScreen
from textual.widgets import Header, Static
from textual.widgets._header import HeaderTitle

from gpudeck.text import visible


class Banner(Static):
    """Connection trouble, shown above the views while it lasts."""

    def say(self, text: str) -> None:
        """Show `text` as written: it quotes errors, which quote what peers wrote, so a '[' in it is
        not markup and its control characters are made visible."""
        self.update(Text(visible(text)))


class DeckHeader(Header):
    """Textual's Header, without its crash on a short-lived screen: its title watchers run later, and
    when the screen was dismissed meanwhile (the not-found screen closes the moment a coordinator
    answers) the header has lost its children and Textual's `query_one` raises `NoMatches`."""

    def _on_mount(self, event: events.Mount) -> None:
        event.prevent_default()

        async def set_title() -> None:
            try:
                self.query_one(HeaderTitle).update(self.format_title())
            except (NoMatches, NoScreen):
                pass

        for owner in (self.app, self.screen):
            self.watch(owner, "title", set_title)
            self.watch(owner, "sub_title", set_title)
