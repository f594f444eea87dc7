"""A table that renders only the rows on screen, straight from the model.

Textual's DataTable keeps its own copy of every cell, and updating a cell invalidates caches for the
whole table; with 1,000 nodes updating every second, key presses then wait for seconds. Here a row
is a key; the view gives a function that turns a key into cells when the row is drawn, and a
version that changes when the row's data does. An update repaints a row only when it is on screen,
so its cost follows the rows visible, not the rows in the cluster.

Columns have a priority: when the terminal is narrow, the least important are left out; spare
width goes to the flexible ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Hashable, Iterable

from rich.cells import cell_len, set_cell_size
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding, BindingType
from textual.geometry import Region, Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

GAP = 1
CACHE_LIMIT = 400


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    width: int
    priority: int = 0  # 0: always shown; higher numbers are left out first when narrow
    flex: int = 0  # share of the spare width
    align: str = "left"
    max_width: int | None = None


Cells = dict[str, "Text | str"]
SPAN = "*span"  # a cell that runs from the column named under SPAN_FROM to the end of the line
SPAN_FROM = "*span_from"


class Palette:
    """Rich styles from the table's component classes, so themes and NO_COLOR apply to cell text."""

    NAMES = ("dim", "good", "warn", "bad", "accent", "sim", "section")

    def __init__(self, table: "DeckTable") -> None:
        for name in self.NAMES:
            setattr(self, name, table.get_component_rich_style(f"deck-table--{name}", partial=True))

    dim: Style
    good: Style
    warn: Style
    bad: Style
    accent: Style
    sim: Style
    section: Style


class DeckTable(ScrollView, can_focus=True):
    """Rows are keys; `render_row(key, palette)` gives a row's cells when it is drawn."""

    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "deck-table--header", "deck-table--cursor", "deck-table--empty",
        *(f"deck-table--{name}" for name in Palette.NAMES),
    }
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up,k", "cursor_up", "Up", show=False, id="table.up"),
        Binding("down,j", "cursor_down", "Down", show=False, id="table.down"),
        Binding("pageup", "page_up", "Page up", show=False, id="table.page_up"),
        Binding("pagedown", "page_down", "Page down", show=False, id="table.page_down"),
        Binding("home,g", "first", "First", show=False, id="table.first"),
        Binding("end,G", "last", "Last", show=False, id="table.last"),
        Binding("enter", "select", "Open", id="table.select"),
    ]

    cursor: reactive[int] = reactive(0, always_update=True, repaint=False)

    class Highlighted(Message):
        def __init__(self, table: "DeckTable", key: Any) -> None:  # a row's key, of the view's kind; None: no row
            super().__init__()
            self.table = table
            self.key = key

        @property
        def control(self) -> "DeckTable":
            return self.table

    class Selected(Highlighted):
        pass

    def __init__(self, columns: list[Column], render_row: Callable[[Any, Palette], Cells],
                 version: Callable[[Any], Hashable] | None = None, empty: str = "nothing here",
                 selectable: bool = True, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.selectable = selectable
        self.columns = columns
        self._order = {column.key: number for number, column in enumerate(columns)}
        self.render_row = render_row
        self.version = version
        self.empty = empty
        self.keys: list[Any] = []
        self._index: dict[Any, int] = {}
        self._columns_cache: tuple[int, list[tuple[Column, int]]] | None = None
        self._cache: dict[tuple[Any, ...], Strip] = {}
        self._palette: Palette | None = None

    # --- data ---------------------------------------------------------------------------------------

    def set_keys(self, keys: list[Any]) -> None:
        """Replace the rows, keeping the cursor on the same key when it is still there."""
        current = self.cursor_key
        self.keys = list(keys)
        self._index = {key: i for i, key in enumerate(self.keys)}
        self._update_virtual_size()
        target = self._index.get(current, min(self.cursor, max(0, len(self.keys) - 1)))
        self.set_reactive(DeckTable.cursor, target)
        self._scroll_cursor_visible()
        self.refresh()
        self.post_message(self.Highlighted(self, self.cursor_key))

    def refresh_keys(self, keys: Iterable[Any] | None = None) -> None:
        """Repaint these rows (all when None) if they are on screen."""
        if keys is None:
            self.refresh()
            return
        top, bottom = self._visible_range()
        for key in keys:
            index = self._index.get(key)
            if index is not None and top <= index < bottom:
                self.refresh_line(index + 1)

    @property
    def cursor_key(self) -> Any:
        return self.keys[self.cursor] if 0 <= self.cursor < len(self.keys) else None

    def move_to(self, key: Any) -> bool:
        index = self._index.get(key)
        if index is None:
            return False
        self.cursor = index
        return True

    def index_of(self, key: Any) -> int | None:
        return self._index.get(key)

    # --- geometry -------------------------------------------------------------------------------

    @property
    def _viewport_rows(self) -> int:
        return max(1, self.scrollable_content_region.height - 1)

    def _visible_range(self) -> tuple[int, int]:
        top = int(self.scroll_offset.y)
        return top, top + self._viewport_rows

    def _update_virtual_size(self) -> None:
        self.virtual_size = Size(self.scrollable_content_region.width, len(self.keys) + 1)

    def on_resize(self, event: events.Resize) -> None:
        self._columns_cache = None
        self._cache.clear()
        self._update_virtual_size()
        self._scroll_cursor_visible()

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._palette = None
        self._cache.clear()

    def column_layout(self, width: int) -> list[tuple[Column, int]]:
        """The columns that fit in `width`, with their widths."""
        if self._columns_cache and self._columns_cache[0] == width:
            return self._columns_cache[1]
        columns = list(self.columns)

        def used(cols: list[Column]) -> int:
            return sum(c.width for c in cols) + GAP * (len(cols) - 1)

        while len(columns) > 1 and used(columns) > width:
            worst = max(columns, key=lambda c: c.priority)
            if worst.priority == 0:
                break
            columns.remove(worst)
        spare = max(0, width - used(columns))
        flex_total = sum(c.flex for c in columns)
        widths = []
        for column in columns:
            extra = spare * column.flex // flex_total if flex_total else 0
            if column.max_width is not None:
                extra = min(extra, max(0, column.max_width - column.width))
            widths.append((column, column.width + extra))
        self._columns_cache = (width, widths)
        return widths

    def column_width(self, key: str) -> int:
        """The width the column has now (0 when it is left out)."""
        for column, size in self.column_layout(self.scrollable_content_region.width):
            if column.key == key:
                return size
        return 0

    # --- cursor ---------------------------------------------------------------------------------

    def validate_cursor(self, value: int) -> int:
        return max(0, min(value, len(self.keys) - 1)) if self.keys else 0

    def watch_cursor(self, old: int, new: int) -> None:
        self.refresh_line(old + 1)
        self.refresh_line(new + 1)
        self._scroll_cursor_visible()
        self.post_message(self.Highlighted(self, self.cursor_key))

    def _scroll_cursor_visible(self) -> None:
        top, bottom = self._visible_range()
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False, immediate=True)
        elif self.cursor >= bottom:
            self.scroll_to(y=self.cursor - self._viewport_rows + 1, animate=False, immediate=True)

    def action_cursor_up(self) -> None:
        self.cursor -= 1

    def action_cursor_down(self) -> None:
        self.cursor += 1

    def action_page_up(self) -> None:
        self.cursor -= self._viewport_rows

    def action_page_down(self) -> None:
        self.cursor += self._viewport_rows

    def action_first(self) -> None:
        self.cursor = 0

    def action_last(self) -> None:
        self.cursor = len(self.keys) - 1

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "select":
            return self.selectable and bool(self.keys)
        return True

    def action_select(self) -> None:
        if self.cursor_key is not None:
            self.post_message(self.Selected(self, self.cursor_key))

    def on_click(self, event: events.Click) -> None:
        if event.y < 1:
            return
        index = int(self.scroll_offset.y) + event.y - 1
        if 0 <= index < len(self.keys):
            self.cursor = index
            if event.chain >= 2:
                self.action_select()

    # --- drawing --------------------------------------------------------------------------------

    @property
    def palette(self) -> Palette:
        if self._palette is None:
            self._palette = Palette(self)
        return self._palette

    def _line(self, cells: Cells, width: int, base: Style) -> list[Segment]:
        """One row as segments; a cell under SPAN fills the line from the column named by SPAN_FROM.

        Built from (text, style) pieces rather than Rich's Text layout: this runs for every row on
        screen whenever its data changes, and a big cluster changes every row every second."""
        segments: list[Segment] = []
        span_from = cells.get(SPAN_FROM)
        order = self._order
        span_at = order.get(span_from, len(order)) if isinstance(span_from, str) else len(order)  # a column's key
        gap = Segment(" " * GAP, base)
        used = 0
        for number, (column, size) in enumerate(self.column_layout(width)):
            if number:
                segments.append(gap)
                used += GAP
            if order[column.key] >= span_at:  # the named column, or the next shown when it is left out
                _fit(_pieces(cells.get(SPAN, "")), width - used, "left", base, segments)
                used = width
                break
            _fit(_pieces(cells.get(column.key, "")), size, column.align, base, segments)
            used += size
        if used < width:
            segments.append(Segment(" " * (width - used), base))
        return segments

    def row_text(self, key: Any, width: int = 200) -> str:
        """A row as plain text (tests and tools)."""
        return "".join(s.text for s in self._line(self.render_row(key, self.palette), width, Style())).rstrip()

    def render_lines(self, crop: Region) -> list[Strip]:
        self._base = self.rich_style  # once per repaint, not once per line
        return super().render_lines(crop)

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        base = getattr(self, "_base", None) or self.rich_style
        if y == 0:
            header = base + self.get_component_rich_style("deck-table--header")
            return Strip(self._line({c.key: c.label for c in self.columns}, width, header), width)
        index = int(self.scroll_offset.y) + y - 1
        if not self.keys:
            if y == 2:
                message = Text(self.empty, style=self.get_component_rich_style("deck-table--empty"))
                return Strip(self._line({SPAN_FROM: self.columns[0].key, SPAN: Text("  ") + message}, width, base),
                             width)
            return Strip.blank(width, base)
        if index >= len(self.keys):
            return Strip.blank(width, base)
        key = self.keys[index]
        is_cursor = index == self.cursor
        focused = self.has_focus
        cache_key = None
        if self.version is not None:
            cache_key = (key, self.version(key), width, is_cursor, is_cursor and focused, base)
            cached = self._cache.get(cache_key)
            if cached is not None:
                return cached
        segments = self._line(self.render_row(key, self.palette), width, base)
        if is_cursor:
            style = self.get_component_rich_style("deck-table--cursor")
            if not focused:
                style = Style(bgcolor=style.bgcolor, bold=style.bold) if style.bgcolor else style
            segments = list(Segment.apply_style(segments, post_style=style))
        strip = Strip(segments, width)
        if cache_key is not None:
            if len(self._cache) > CACHE_LIMIT:
                self._cache.clear()
            self._cache[cache_key] = strip
        return strip

    def on_focus(self) -> None:
        self.refresh_line(self.cursor + 1)

    def on_blur(self) -> None:
        self.refresh_line(self.cursor + 1)



_STYLES: dict[Any, Style | None] = {}


def _style(style: Any) -> Style | None:
    if style is None or isinstance(style, Style):
        return style
    parsed = _STYLES.get(style)
    if parsed is None:
        parsed = _STYLES[style] = Style.parse(style) if style else Style()
    return parsed


def _pieces(cell: Any) -> list[tuple[str, Style | None]]:
    """A cell as (text, style) pieces. Text spans must not overlap (cells are built with append)."""
    if not isinstance(cell, Text):
        return [(str(cell), None)]
    plain = cell.plain
    own = _style(cell.style) if cell.style else None
    pieces: list[tuple[str, Style | None]] = []
    at = 0
    for span in sorted(cell.spans, key=lambda sp: sp.start):
        if span.start > at:
            pieces.append((plain[at:span.start], own))
        if span.end > span.start:
            style = _style(span.style)
            pieces.append((plain[max(at, span.start):span.end], own + style if own and style else style or own))
        at = max(at, span.end)
    if at < len(plain):
        pieces.append((plain[at:], own))
    return pieces


def _fit(pieces: list[tuple[str, Style | None]], size: int, align: str, base: Style, out: list[Segment]) -> None:
    """Append the pieces to `out` in exactly `size` cells: cut with an ellipsis, or padded."""
    if size <= 0:
        return
    total = sum(cell_len(text) for text, _ in pieces)
    if total > size:
        room = size - 1
        cut: list[tuple[str, Style | None]] = []
        for text, style in pieces:
            if room <= 0:
                break
            width = cell_len(text)
            if width > room:
                text = set_cell_size(text, room)
                width = room
            cut.append((text, style))
            room -= width
        last_style = cut[-1][1] if cut else None
        pieces = cut + [("…", last_style)]
        total = size
    pad = Segment(" " * (size - total), base) if total < size else None
    if pad and align == "right":
        out.append(pad)
    for text, style in pieces:
        if text:
            out.append(Segment(text, base + style if style else base))
    if pad and align != "right":
        out.append(pad)
