"""The traffic widgets: rates by kind of operation, the node-to-node matrix, and the cluster's total
rate over time."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from gpudeck.text import human_bytes, rate
from gpudeck.tui.model import sparkline


class KindRates(Widget):
    """Bytes per second by kind of operation while the job runs, each with its history; once it has
    ended, what it moved by kind, in total and per step where the step count is known. Its height
    follows its rows (a detail opened before the first report starts with one line)."""

    rows: reactive[tuple[tuple[str, float, tuple[float, ...]], ...]] = reactive((), layout=True)
    moved: reactive[tuple[tuple[str, int], ...]] = reactive((), layout=True)
    steps: reactive[int | None] = reactive(None)

    def render(self) -> Text:
        if self.moved:
            return self._moved()
        text = Text()
        if not self.rows:
            text.append("no traffic reported yet (ranks report once a second)", style="dim")
            return text
        width = max(8, self.size.width - 30)
        peak = max((max(s, default=0) for _, _, s in self.rows), default=0) or None
        for number, (kind, value, series) in enumerate(self.rows):
            if number:
                text.append("\n")
            text.append(f"{kind:<15}", style="bold" if kind == "total" else "")
            text.append(f"{rate(value):>12}  ")
            text.append(sparkline(series, width, peak))
        return text

    def _moved(self) -> Text:
        text = Text()
        for number, (kind, count) in enumerate(self.moved):
            if number:
                text.append("\n")
            text.append(f"{kind:<15}", style="bold" if kind == "total" else "")
            text.append(f"{human_bytes(count):>12}")
            if self.steps:
                text.append(f"  {human_bytes(count / self.steps)} per step", style="dim")
        return text


class NodeMatrix(Widget):
    """Node-to-node bytes per second: a row is what a node sends, a column what it receives."""

    data: reactive[tuple[tuple[str, ...], tuple[tuple[float, ...], ...]]] = reactive(((), ()), layout=True)

    def render(self) -> Text:
        names, matrix = self.data
        text = Text()
        if not names:
            text.append("no placement yet", style="dim")
            return text
        label = min(16, max(len("from \\ to"), *(len(n) for n in names)) + 1)
        cell = 11
        fits = max(1, (self.size.width - label) // cell)
        shown = list(names[:fits])
        text.append("from \\ to".ljust(label), style="bold")
        for name in shown:
            text.append(name[: cell - 1].rjust(cell), style="bold")
        if len(names) > fits:
            text.append(f"  +{len(names) - fits} more", style="dim")
        for row, name in enumerate(names):
            text.append("\n")
            text.append(name[: label - 1].ljust(label), style="bold")
            for col in range(len(shown)):
                value = matrix[row][col]
                text.append((rate(value) if value > 0 else "·").rjust(cell), style="" if value > 0 else "dim")
        return text


class TotalTraffic(Widget):
    """The cluster's sync traffic: total rate, its history, and the split by kind."""

    data: reactive[tuple[float, tuple[float, ...], tuple[tuple[str, float], ...]]] = reactive((0.0, (), ()))

    def render(self) -> Text:
        total, series, kinds = self.data
        width = max(10, self.size.width - 30)
        text = Text()
        text.append("cluster total ", style="bold")
        text.append(f"{rate(total):>11}  ")
        text.append(sparkline(series, width))
        text.append("\n")
        if kinds:
            text.append("  ·  ".join(f"{kind} {rate(value)}" for kind, value in kinds))
        else:
            text.append("no running job reports traffic", style="dim")
        return text
