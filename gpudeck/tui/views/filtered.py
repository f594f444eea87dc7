"""What the nodes and jobs views share: a table with a `/` filter over it. Views render the model
they are given and repaint only the rows a change touched; none does I/O."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.containers import Vertical
from textual.reactive import reactive
from textual.widgets import Input, Static

from gpudeck.tui.model import Cluster
from gpudeck.tui.table import DeckTable
from gpudeck.tui.widgets.filter_bar import FilterBar


class FilteredView(Vertical):
    """A table with a filter bar under it."""

    filter_text: reactive[str] = reactive("")
    kind = ""
    table: DeckTable

    def __init__(self, cluster: Cluster, id: str | None = None) -> None:
        super().__init__(id=id)
        self.cluster = cluster
        self.preview = Static(classes="preview")

    def show_filter(self) -> None:
        bar = self.query_one(FilterBar)
        bar.add_class("-shown")
        bar.focus()

    def clear_filter(self) -> None:
        bar = self.query_one(FilterBar)
        bar.value = ""
        bar.remove_class("-shown")
        self.filter_text = ""

    def on_input_changed(self, event: Input.Changed) -> None:
        if isinstance(event.input, FilterBar):
            self.filter_text = event.value
            event.stop()

    def on_filter_bar_done(self, event: FilterBar.Done) -> None:
        if not event.keep or not self.filter_text:
            event.bar.remove_class("-shown")
        self.table.focus()

    def watch_filter_text(self) -> None:
        self.rebuild()

    def on_deck_table_highlighted(self, event: DeckTable.Highlighted) -> None:
        self.update_preview()

    def update_preview(self) -> None:
        """The highlighted row in full, under the table: what a narrow column had to cut."""
        key = self.table.cursor_key
        self.preview.update(self.describe(key) if key is not None else "", layout=False)  # its height is fixed
        self.preview.display = key is not None

    def describe(self, key: Any) -> Text:  # pragma: no cover - every view defines it
        raise NotImplementedError

    def rebuild(self) -> None:  # pragma: no cover - every view defines it
        raise NotImplementedError
