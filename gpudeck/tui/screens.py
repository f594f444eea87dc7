"""Screens over the main views: a job in detail (ranks, traffic, logs), the submit form, confirmations,
help, and what to do when no coordinator is found."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.cells import cell_len
from rich.markup import escape
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.reactive import reactive
from textual.screen import ModalScreen, Screen
from textual.suggester import Suggester
from textual.widget import Widget
from textual.widgets import Button, Footer, Input, Label, Log, Select, Static, TabbedContent, TabPane

from gpudeck import config
from gpudeck.model import format_duration
from gpudeck.output import outputs_text, starts_text, wait_heatmap
from gpudeck.text import human_bytes, rate, safe_output, visible
from gpudeck.protocol.handshake import Refused
from gpudeck.tui.client import NotConnected
from gpudeck.tui.model import (
    ACTIVE_STATES, FINISHED_STATES, MATRIX_HELP, Changes, asked_text, known_steps, node_matrix, rank_health,
    rank_places, sparkline,
)
from gpudeck.tui.spec import SCRIPT, Form, check_form
from gpudeck.tui.table import Column, DeckTable, Palette
from gpudeck.tui.views import Banner, DeckHeader

if TYPE_CHECKING:
    from gpudeck.tui.app import GpudeckApp

LOG_LINES = 20000
LOG_POLL = 0.5


def launcher_label(rank: int) -> str:
    """A node's own output (rank -1 is node 0's): environment builds, gpudeck's notes, torchrun's."""
    return f"node {-rank - 1}"


# --- job detail ------------------------------------------------------------------------------------


def queue_text(job: dict[str, Any], now: float) -> str:
    """A pending job's planned start and its priority score with each factor's part, in one line."""
    start = starts_text(job.get("estimated_start"), now)
    text = f"starts {start} (planned)" if start != "-" else "start not planned yet (only the next job in line has one)"
    factors = job.get("priority_factors") or []
    if factors:
        parts = " + ".join(f"{f['name'].replace('_', ' ')} {f['contribution']:,.0f}" for f in factors)
        text += f"  ·  priority score {job['priority_score']:,.0f} = {parts}"
    return text


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


class JobLog(Log):
    """Textual's Log measures new lines in a thread worker that calls `self.app`; once the job's
    screen is closed (Esc while lines stream) that raises NoActiveAppError in the thread, and the
    failed worker closes the whole dashboard. A chunk of a log is small: measure it here instead."""

    def _update_size(self, updates: int, lines: list[str]) -> None:  # type: ignore[override]
        if lines:
            self._update_maximum_width(updates, max(cell_len(self._process_line(line)) for line in lines))


RANK_COLUMNS = [
    Column("rank", "RANK", 4, align="right"),
    Column("node", "NODE", 10, flex=1, max_width=30),
    Column("node_rank", "NODE#", 5, align="right", priority=3),
    Column("gpu", "GPU", 6),
    Column("rate", "RATE", 11, align="right"),
    Column("sent", "TOTAL", 10, align="right", priority=1),
    Column("kinds", "BY KIND", 14, flex=2, priority=2),
    Column("health", "PACE", 7),
]


class JobScreen(Screen):
    """One job: what it asked for, where its ranks run, its traffic and its logs."""

    BINDINGS = [
        Binding("t", "tab('traffic')", "Traffic", id="job.traffic", tooltip="the traffic tab"),
        Binding("l", "tab('logs')", "Logs", id="job.logs", tooltip="the logs tab"),
        Binding("f", "follow", "Follow", id="job.follow", tooltip="logs: follow new lines, or stop"),
        Binding("left_square_bracket", "rank(-1)", "Prev rank", id="job.prev_rank",
                tooltip="logs: the previous rank (or a node's own output)"),
        Binding("right_square_bracket", "rank(1)", "Next rank", id="job.next_rank",
                tooltip="logs: the next rank (or a node's own output)"),
        Binding("escape", "back", "Back", id="job.back", tooltip="back to the views"),
    ]

    follow: reactive[bool] = reactive(True)
    rank_choice: reactive[int | None] = reactive(None)  # None: every rank

    def __init__(self, job_id: int, tab: str = "traffic") -> None:
        super().__init__()
        self.job_id = job_id
        self.initial_tab = tab
        self.lines: list[tuple[int, str]] = []
        self.partial: dict[int, bytes] = {}
        self.log_note = "waiting for output"
        self.ranks = DeckTable(RANK_COLUMNS, self._rank_row, id="ranks-table", empty="no ranks yet",
                               selectable=False)

    @property
    def deck(self) -> "GpudeckApp":
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield DeckHeader(show_clock=False)
        yield Banner(classes="banner")
        yield Static(id="job-summary")
        yield Static(id="job-progress")
        with TabbedContent(initial=self.initial_tab, id="job-tabs"):
            with TabPane("Traffic", id="traffic"):
                with VerticalScroll(id="job-traffic"):
                    yield Static("bytes per second by kind", classes="section", id="kinds-title")
                    yield KindRates(id="kind-rates")
                    yield Static("ranks: where they run and what they send", classes="section")
                    yield self.ranks
                    yield Static("node to node (derived from ranks and placement: press ? for how)",
                                 classes="section")
                    yield NodeMatrix(id="node-matrix")
            with TabPane("Logs", id="logs"):
                yield Static(id="log-status")
                yield JobLog(max_lines=LOG_LINES, id="job-log", auto_scroll=True)
        yield Footer()

    def on_mount(self) -> None:
        lost = self.deck.lost
        if lost is not None:
            banner = self.query_one(Banner)
            banner.say(f"Lost the coordinator {self.deck.where}: {lost.reason}. Reconnecting…")
            banner.add_class("-shown")
        self.model_changed(Changes(jobs={self.job_id}, traffic=True))
        self.follow_logs()
        self._focus_tab(self.initial_tab)

    @property
    def job(self) -> dict[str, Any] | None:
        return self.deck.cluster.jobs.get(self.job_id)

    def model_changed(self, changes: Changes) -> None:
        job = self.job
        if job is None:
            return
        if self.title != (title := f"job {job['id']} {job['name']}"):
            self.title = title
            self.deck.show_totals()  # the header's counts make room for this title
        self._show_summary(job)
        if self.job_id in changes.jobs or changes.traffic or changes.reset:
            self._update_traffic(job)
        self._update_log_status()

    def tick(self) -> None:
        job = self.job
        if job is not None and (job["state"] in ACTIVE_STATES or job["state"] == "pending"):
            self._show_summary(job)  # its runtime, or its planned start, counts

    def _show_summary(self, job: dict[str, Any]) -> None:
        text = self._summary(job)
        lines = text.plain.count("\n")
        self.query_one("#job-summary", Static).update(text, layout=lines != getattr(self, "_summary_lines", -1))
        self._summary_lines = lines
        progress = self.query_one("#job-progress", Static)
        shown = _progress_text(job)
        progress.display = bool(shown.plain)
        progress.update(shown)

    def _summary(self, job: dict[str, Any]) -> Text:
        cluster = self.deck.cluster
        text = Text()
        text.append(f"job {job['id']} ", style="bold")
        text.append(job["name"], style="bold")
        text.append(f"  {job['state']}", style="bold reverse" if job["state"] == "failed" else "bold")
        exit_code = "-" if job.get("exit_code") is None else str(job["exit_code"])
        text.append(f"  attempt {job['attempt']}  runtime {cluster.runtime(job)}  exit {exit_code}\n")
        limit = format_duration(job["time_limit"]) if job.get("time_limit") else "none"
        text.append(f"asked {asked_text(job)}  priority {job['priority']}  restarts "
                    f"{job['restarts']}/{job['max_restarts']}  time limit {limit}\n", style="dim")
        if job.get("reason"):
            text.append(f"{job['reason']}\n", style="italic")
        if job["state"] == "pending":
            text.append(queue_text(job, cluster.now()) + "\n")
        text.append("$ " + " ".join(job.get("command", [])), style="dim")
        kept = outputs_text(job)
        if kept:
            text.append(f"\noutputs {kept}")
        return text

    def _update_traffic(self, job: dict[str, Any]) -> None:
        traffic = self.deck.cluster.traffic.get(self.job_id)
        places = rank_places(job)
        self._places = places
        ended = job["state"] in FINISHED_STATES
        kinds_widget = self.query_one(KindRates)
        by_kind = job.get("traffic", {}).get("by_kind", {})
        kinds_widget.steps = known_steps(job)
        kinds_widget.moved = (("total", sum(by_kind.values())), *sorted(by_kind.items())) if ended and by_kind else ()
        title = "bytes per second by kind"
        if kinds_widget.moved:
            title = "bytes moved by kind, in total and per step" if kinds_widget.steps else "bytes moved by kind"
        self.query_one("#kinds-title", Static).update(title)
        if traffic is None:
            self.query_one(KindRates).rows = ()
            self._rank_rates: dict[int, dict[str, float]] = {}
        else:
            kinds = traffic.kind_rates()
            rows = [("total", sum(kinds.values()), tuple(traffic.series()))]
            rows += [(kind, kinds.get(kind, 0.0), tuple(traffic.series(kind))) for kind in traffic.kinds()]
            self.query_one(KindRates).rows = tuple(rows)
            self._rank_rates = traffic.rank_rates()
        self._health = rank_health(places, self._rank_rates, job["state"] == "running")
        names, matrix = node_matrix(job, self._rank_rates)
        self.query_one(NodeMatrix).data = (tuple(names), tuple(tuple(row) for row in matrix))
        height = min(len(places), 12) + 1
        if self.ranks.styles.height is None or self.ranks.styles.height.value != height:
            self.ranks.styles.height = height
        if self.ranks.keys != [p.rank for p in places]:
            self.ranks.set_keys([p.rank for p in places])
        else:
            self.ranks.refresh()

    def _rank_row(self, rank: int, p: Palette) -> dict[str, Any]:
        place = next((pl for pl in getattr(self, "_places", []) if pl.rank == rank), None)
        if place is None:
            return {}
        job = self.job or {}
        node = self.deck.cluster.nodes.get(place.node, {})
        kinds = getattr(self, "_rank_rates", {}).get(rank, {})
        traffic = self.deck.cluster.traffic.get(self.job_id)
        sent = sum((traffic.latest.get(rank, {}) if traffic else {}).values())
        reported = traffic is not None and rank in traffic.latest
        flag = getattr(self, "_health", {}).get(rank, "")
        if job.get("state") in FINISHED_STATES:
            moved = job.get("traffic", {}).get("by_rank", {}).get(str(rank), {})
            sent = sum(moved.values())
            kinds_text = ", ".join(f"{k} {human_bytes(v)}"
                                   for k, v in sorted(moved.items(), key=lambda kv: -kv[1]) if v)
        else:
            kinds_text = ", ".join(f"{k} {rate(v)}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]) if v)
        gpu = Text()
        if node.get("simulated"):
            gpu.append("SIM ", style=p.sim)
        gpu.append(str(place.gpu))
        if flag:
            pace = Text(flag.upper(), style=p.bad)
        elif job.get("state") == "running" and not reported:
            pace = Text("no report", style=p.warn)
        else:
            pace = Text("ok" if job.get("state") == "running" else "-", style=p.dim)
        return {
            "rank": str(rank), "node": place.node, "node_rank": str(place.node_rank), "gpu": gpu,
            "rate": "-" if job.get("state") in FINISHED_STATES else rate(sum(kinds.values())),
            "sent": human_bytes(sent), "kinds": kinds_text or "-",
            "health": pace,
        }

    # --- logs -------------------------------------------------------------------------------------

    def rank_options(self) -> list[int | None]:
        job = self.job or {}
        places = rank_places(job)
        nodes = len(job.get("placement") or [])
        return [None, *(p.rank for p in places), *(-n - 1 for n in range(nodes))]

    def _shows(self, rank: int) -> bool:
        job = self.job or {}
        if self.rank_choice is None:
            return rank >= 0 or job.get("state") == "failed"
        return rank == self.rank_choice

    def _format(self, rank: int, line: str) -> str:
        if self.rank_choice is not None:
            return line
        return f"[{rank if rank >= 0 else launcher_label(rank)}] {line}"

    def _feed(self, rank: int, data: bytes) -> list[str]:
        buffered = self.partial.get(rank, b"") + data
        *complete, rest = buffered.split(b"\n")
        self.partial[rank] = rest
        return self._add(rank, [safe_output(line.decode(errors="replace"), colours=False) for line in complete])

    def _add(self, rank: int, lines: list[str]) -> list[str]:
        self.lines.extend((rank, line) for line in lines)
        if len(self.lines) > LOG_LINES * 2:
            del self.lines[: len(self.lines) - LOG_LINES]
        return [self._format(rank, line) for line in lines if self._shows(rank)]

    @work(exclusive=True, group="logs")
    async def follow_logs(self) -> None:
        offsets: dict[str, int] = {}
        attempt: int | None = None
        log = self.query_one(Log)
        while True:
            try:
                reply = await self.deck.link.read_logs(self.job_id, None, offsets)
            except (NotConnected, ConnectionError, asyncio.TimeoutError, OSError):
                self.log_note = "not connected: waiting for the coordinator"
                self._update_log_status()
                await asyncio.sleep(1.0)
                continue
            except Refused as exc:
                self.log_note = f"no logs: {exc}"
                self._update_log_status()
                return
            if attempt is not None and reply["attempt"] != attempt:
                offsets, self.partial = {}, {}
                log.write_line(f"--- attempt {reply['attempt']} ---")
            attempt = reply["attempt"]
            shown: list[str] = []
            for rank, data in sorted(reply["chunks"].items(), key=lambda kv: int(kv[0])):
                offsets[rank] = offsets.get(rank, 0) + len(data)
                shown += self._feed(int(rank), data)
            more = any(reply["chunks"].values())
            if reply["finished"] and not more:
                for rank, rest in sorted(self.partial.items()):
                    if rest:
                        shown += self._add(rank, [safe_output(rest.decode(errors="replace"), colours=False)])
                self.partial.clear()
            if shown:
                log.write_lines(shown)
            self.log_note = f"attempt {attempt}" + (", finished" if reply["finished"] else "")
            self._update_log_status()
            if reply["finished"] and not more:
                if reply["state"] == "failed":
                    self._rewrite()  # failed jobs also show each node's own output
                return
            if not more:
                await asyncio.sleep(LOG_POLL)

    def _rewrite(self) -> None:
        log = self.query_one(Log)
        log.clear()
        log.write_lines([self._format(rank, line) for rank, line in self.lines if self._shows(rank)])

    def _update_log_status(self) -> None:
        try:
            status = self.query_one("#log-status", Static)
        except Exception:  # noqa: BLE001 - not mounted yet
            return
        choice = self.rank_choice
        which = ("every rank" if choice is None else f"rank {choice}" if choice >= 0
                 else f"{launcher_label(choice)}'s own output")
        count = sum(1 for rank, _ in self.lines if self._shows(rank))
        lines = f"{count} line{'s' if count != 1 else ''}" if count else "no lines"
        status.update(Text.assemble(("showing ", "dim"), (which, "bold"), ("  ([ ] to change)  follow: ", "dim"),
                                    ("on" if self.follow else "off", "bold"), ("  (f)  ", "dim"),
                                    (f"{self.log_note}, {lines}" if self.log_note.startswith("attempt")
                                     else self.log_note,
                                     "dim")))

    def watch_follow(self, follow: bool) -> None:
        log = self.query_one(Log)
        log.auto_scroll = follow
        if follow:
            log.scroll_end(animate=False)
        self._update_log_status()

    def watch_rank_choice(self) -> None:
        self._rewrite()
        self._update_log_status()

    def action_follow(self) -> None:
        self.follow = not self.follow

    def action_rank(self, step: int) -> None:
        options = self.rank_options()
        index = options.index(self.rank_choice) if self.rank_choice in options else 0
        self.rank_choice = options[(index + step) % len(options)]
        self._focus_tab("logs")

    def action_tab(self, tab: str) -> None:
        self._focus_tab(tab)

    def _focus_tab(self, tab: str) -> None:
        self.query_one("#job-tabs", TabbedContent).active = tab
        (self.query_one(Log) if tab == "logs" else self.ranks).focus()
        self.deck.refresh_bindings_soon()

    def action_back(self) -> None:
        self.dismiss()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("follow", "rank"):
            return self.query_one("#job-tabs", TabbedContent).active == "logs"
        return True


# --- submit ------------------------------------------------------------------------------------------


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


class SubmitScreen(ModalScreen[dict[str, Any] | None]):
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
    def deck(self) -> "GpudeckApp":
        return self.app  # type: ignore[return-value]

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


# --- small modal screens --------------------------------------------------------------------------------


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question; y or enter on the yes button confirms, n or escape declines."""

    BINDINGS = [
        Binding("y", "answer(True)", "Yes", id="confirm.yes"),
        Binding("n,escape", "answer(False)", "No", id="confirm.no"),
    ]

    def __init__(self, question: str, detail: str, yes: str, no: str = "No") -> None:
        super().__init__()
        self.question, self.detail, self.yes, self.no = question, detail, yes, no

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm"):
            yield Static(self.question, classes="title", markup=False)  # it names a job or a node
            yield Static(self.detail, classes="detail", markup=False)
            with Horizontal(classes="buttons"):
                yield Button(f"{self.yes} (y)", id="yes", variant="error", compact=True)
                yield Button(f"{self.no} (n)", id="no", compact=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


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



def _progress_text(job: dict[str, Any]) -> Text:
    """A running job's hang, straggler and per-rank heatmap of waiting in collectives (empty when
    its ranks reported no collective progress)."""
    progress = job.get("progress") if job["state"] == "running" else None
    text = Text()
    if not progress:
        return text
    if progress["hung"]:
        text.append(f"HUNG: {progress['hung']['sentence']}\n", style="bold reverse")
    if progress["straggler"]:
        text.append(f"straggler: {progress['straggler']}\n", style="bold")
    text.append(f"waiting in collectives ({progress['bucket_seconds']:g} s a cell, oldest left; blank: none, "
                "█: all the time):\n", style="dim")
    text.append("\n".join(wait_heatmap(progress, most_ranks=8)))
    return text
