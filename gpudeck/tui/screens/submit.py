"""The submit form, checked against the cluster while it is filled."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.suggester import Suggester
from textual.widgets import Footer, Input, Label, Select, Static

from gpudeck.protocol.handshake import Refused
from gpudeck.protocol.views import JobView
from gpudeck.text import visible
from gpudeck.tui.client import NotConnected
from gpudeck.tui.deck import Deck
from gpudeck.tui.model import Changes
from gpudeck.tui.spec import SCRIPT, Form, check_form



class PathSuggester(Suggester):
    """Completes the script's path (the first word) from the files in its directory."""

    def __init__(self, cwd: str) -> None:
        super().__init__(use_cache=False, case_sensitive=True)
        self.cwd = cwd

    async def get_suggestion(self, value: str) -> str | None:
        if not value or " " in value:
            return None
        typed = Path(value).expanduser()
        folder, prefix = (typed, "") if value.endswith("/") else (typed.parent, typed.name)
        base = folder if folder.is_absolute() else Path(self.cwd) / folder
        try:
            names = sorted(os.listdir(base))
        except OSError:
            return None
        for name in names:
            if name.startswith(prefix) and name != prefix and not name.startswith("."):
                full = base / name
                return value + name[len(prefix):] + ("/" if full.is_dir() else "")
        return None

FIELDS = [
    ("name", "Name", "default: the script's name"),
    ("script", "Script + args", "train.py --epochs 3  (→ completes paths)"),
    ("gpus", "GPUs", "G, or NxG for N nodes x G GPUs each"),
    ("priority", "Priority", "higher runs first"),
    ("time_limit", "Time limit", "none; or 90s, 10m, 2h"),
    ("max_restarts", "Max restarts", "when a node is lost"),
]


class SubmitScreen(ModalScreen[JobView | None]):
    """A job submission form, filled and sent from the keyboard; checked as you type."""

    BINDINGS = [
        Binding("escape", "close", "Close", id="submit.close"),
        Binding("ctrl+s", "send", "Submit", id="submit.send", priority=True),
    ]

    def __init__(self, form: Form | None = None, cwd: str | None = None,
                 workloads: dict[str, str] | None = None) -> None:
        super().__init__()
        self.form = form or Form()
        self.workloads = workloads or {}
        self.cwd = cwd or os.getcwd()
        self.sending = False

    @property
    def deck(self) -> Deck:
        return self.app  # type: ignore[return-value]  # the app the screen was pushed on: GpudeckApp, a Deck

    def compose(self) -> ComposeResult:
        with Vertical(id="submit-form"):
            yield Static("Submit a job", classes="title")
            if self.workloads:
                options = [("a script (below)", SCRIPT)] + [(f"{name}: {text}", name)
                                                            for name, text in sorted(self.workloads.items())]
                with Horizontal(classes="field", id="row-workload"):
                    yield Label("Run", classes="field-label")
                    yield Select(options, value=self.form.workload if self.form.workload in self.workloads else SCRIPT,
                                 allow_blank=False, id="f-workload", compact=True)
            for key, label, hint in FIELDS:
                with Horizontal(classes="field", id=f"row-{key}"):
                    yield Label(label, classes="field-label")
                    yield Input(getattr(self.form, key), placeholder=hint, id=f"f-{key}", compact=True,
                                suggester=PathSuggester(self.cwd) if key == "script" else None)
            yield Static(id="submit-status")
            yield Static("enter submits · tab moves to the next field · → accepts a path completion"
                         + ("" if self.workloads else " · no built-in workloads in this version"), classes="hint")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#f-script", Input).focus()
        self.check()

    def read_form(self) -> Form:
        form = Form(**{key: self.query_one(f"#f-{key}", Input).value for key, _, _ in FIELDS})
        if self.workloads:
            value = self.query_one("#f-workload", Select).value
            form.workload = value if isinstance(value, str) else SCRIPT
        return form

    def model_changed(self, changes: Changes) -> None:
        if changes.nodes or changes.node_set or changes.reset:
            self.check()  # whether the request fits depends on the nodes there are now

    def check(self, read: bool = False) -> Any:
        form = self.read_form()
        checked = check_form(form, self.deck.cluster.nodes.values(), self.workloads, self.cwd, read=read)
        for key, _, _ in FIELDS:
            self.query_one(f"#row-{key}").set_class(key in checked.problems, "-problem")
        if self.workloads:
            self.query_one("#row-workload").set_class("workload" in checked.problems, "-problem")
        status = Text()
        if checked.problems:
            for key, problem in checked.problems.items():
                label = dict((k, lbl) for k, lbl, _ in FIELDS).get(key, key)
                status.append("! ", style="bold")
                status.append(f"{label}: ", style="bold")
                status.append(problem + "\n")
        else:
            status.append("ready: ", style="bold")
            status.append(f"{checked.spec.name}, {checked.summary}")  # type: ignore[union-attr]
        self.query_one("#submit-status", Static).update(status)
        self.query_one("#submit-status").set_class(bool(checked.problems), "-problem")
        return checked, form

    def on_input_changed(self, event: Input.Changed) -> None:
        self.check()

    def on_select_changed(self, event: Select.Changed) -> None:
        workload = isinstance(event.value, str) and event.value != SCRIPT
        self.query_one("#row-script Label", Label).update("Arguments" if workload else "Script + args")
        hints = dict((k, h) for k, _, h in FIELDS)
        self.query_one("#f-script", Input).placeholder = ("arguments for the workload (optional)" if workload
                                                          else hints["script"])
        self.query_one("#f-name", Input).placeholder = ("default: the workload's name" if workload else hints["name"])
        self.check()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_send()

    def action_close(self) -> None:
        self.deck.last_form = self.read_form()
        self.dismiss(None)

    def action_send(self) -> None:
        if self.sending:
            return
        checked, form = self.check(read=True)
        if checked.problems:
            first = next(iter(checked.problems))
            target = "#f-workload" if first == "workload" else f"#f-{first}"
            self.query_one(target).focus()
            return
        self.deck.last_form = form
        self.sending = True
        self.query_one("#submit-status", Static).update(Text("sending…", style="bold"))
        self._send(checked.spec)

    @work(exclusive=True, group="submit")
    async def _send(self, spec: Any) -> None:
        try:
            job = await self.deck.link.submit(spec)
        except (Refused, NotConnected, ConnectionError, asyncio.TimeoutError, OSError) as exc:
            self.sending = False
            why = f"the coordinator refused it: {exc}" if isinstance(exc, Refused) else f"not sent: {exc}"
            status = self.query_one("#submit-status", Static)
            status.update(Text("! " + visible(why), style="bold"))
            status.add_class("-problem")
            return
        self.dismiss(job)
