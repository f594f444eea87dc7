"""What each view shows and the keys."""

from __future__ import annotations

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Static

from gpudeck.tui.model import MATRIX_HELP


HELP = """\
[b]Views[/b]  1 nodes · 2 jobs · 3 traffic · 4 people (or click the tabs). Enter opens a row: a node shows or hides \
its GPUs, a job opens its detail (traffic, logs). Arrows or j/k move, PgUp/PgDn page.

[b]Nodes[/b]  One row per node: state (up, suspect, down, draining), GPU count, utilisation and memory bars, \
address, seconds since its last heartbeat, jobs. Under it, one row per GPU with a utilisation history. \
[b]SIM[/b] marks simulated GPUs. [b]! outside gpudeck[/b] marks a GPU used by a process gpudeck did not \
start (the scheduler leaves it alone). Agents seen over mDNS that have not joined are listed last, with why.

[b]Jobs[/b]  Running, then pending in the order they will be served (with the scheduler's reason), then \
history, newest first. / filters: every word must match the id, name, state, nodes, reason or command.

[b]Traffic[/b]  Parameter-sync traffic: bytes per second each job's ranks hand to torch.distributed, by \
kind, from the cumulative counts the ranks report once a second. RANKS OFF PACE names ranks that send \
nothing (silent) or less than half the median of the others (slow) while the job runs.

[b]People[/b]  One row per user: the GPUs their jobs hold now, their running and pending jobs, their share \
of the cluster's GPU time over the last 7 days, and their GPU-hours over the last day and week (as \
`gpudeck usage` counts them, asked for every 30 s). A job whose GPUs all read 0 % for the cluster's \
--idle-after is marked idle in the jobs view.

[b]Node matrix[/b]  {matrix}

[b]Keys[/b]
{keys}

Every action is also in the command palette (ctrl+p). Rebind keys in {keymap}: a JSON object from a \
binding id to keys, for example {{"gpudeck.submit": "n", "gpudeck.quit": "q,ctrl+q"}}. Change the theme \
from the palette ("Theme"), or set GPUDECK_THEME; NO_COLOR turns colour off.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close", id="help.close")]

    def __init__(self, keys: list[tuple[str, str, str]], keymap_path: str) -> None:
        super().__init__()
        self.keys = keys
        self.keymap_path = keymap_path

    def compose(self) -> ComposeResult:
        lines = "\n".join(f"  [b]{escape(key):<10}[/b] {escape(text)}"
                          + (f"  [dim]({binding_id})[/dim]" if binding_id else "")
                          for key, text, binding_id in self.keys)
        with VerticalScroll(id="help"):
            yield Static(HELP.format(matrix=MATRIX_HELP, keys=lines, keymap=self.keymap_path), markup=True)
        yield Footer()

    def action_dismiss(self) -> None:  # type: ignore[override]
        self.dismiss(None)
