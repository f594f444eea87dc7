"""The `/` filter bar of the nodes and jobs views."""

from __future__ import annotations

from textual.message import Message
from textual.widgets import Input


class FilterBar(Input):
    """The `/` filter: hidden until asked for; every word typed must match."""

    class Done(Message):
        """Enter (keep the filter) or escape (clear it) was pressed."""

        def __init__(self, bar: "FilterBar", keep: bool) -> None:
            super().__init__()
            self.bar = bar
            self.keep = keep

    BINDINGS = [("escape", "clear_filter", "Clear filter")]

    def __init__(self, what: str, id: str | None = None) -> None:
        super().__init__(placeholder=f"filter {what}: words to match (enter keeps it, esc clears)", id=id,
                         classes="filter-bar")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.post_message(self.Done(self, keep=True))

    def action_clear_filter(self) -> None:
        self.value = ""
        self.post_message(self.Done(self, keep=False))
