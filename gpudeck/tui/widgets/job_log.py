"""A job's log lines on its detail screen."""

from __future__ import annotations

from rich.cells import cell_len
from textual.widgets import Log


class JobLog(Log):
    """Textual's Log measures new lines in a thread worker that calls `self.app`; once the job's
    screen is closed (Esc while lines stream) that raises NoActiveAppError in the thread, and the
    failed worker closes the whole dashboard. A chunk of a log is small: measure it here instead."""

    def _update_size(self, updates: int, lines: list[str]) -> None:  # type: ignore[override]
        if lines:
            self._update_maximum_width(updates, max(cell_len(self._process_line(line)) for line in lines))
