"""A job in detail: its summary, ranks, traffic and logs."""

from __future__ import annotations

import asyncio
from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer, Log, Static, TabPane, TabbedContent

from gpudeck.logtail import LogTail
from gpudeck.model import format_duration
from gpudeck.output import outputs_text, starts_text, wait_heatmap
from gpudeck.protocol.handshake import Refused
from gpudeck.protocol.views import JobView
from gpudeck.text import human_bytes, rate, safe_output
from gpudeck.tui.client import NotConnected
from gpudeck.tui.deck import Deck
from gpudeck.tui.model import (
    ACTIVE_STATES, FINISHED_STATES, Changes, asked_text, known_steps, node_matrix, rank_health, rank_places,
)
from gpudeck.tui.table import Column, DeckTable, Palette
from gpudeck.tui.widgets.header import Banner, DeckHeader
from gpudeck.tui.widgets.job_log import JobLog
from gpudeck.tui.widgets.traffic import KindRates, NodeMatrix



LOG_LINES = 20000

LOG_POLL = 0.5


def launcher_label(rank: int) -> str:
    """A node's own output (rank -1 is node 0's): environment builds, gpudeck's notes, torchrun's."""
    return f"node {-rank - 1}"


def queue_text(job: JobView, now: float) -> str:
    """A pending job's planned start and its priority score with each factor's part, in one line."""
    start = starts_text(job.estimated_start, now)
    text = f"starts {start} (planned)" if start != "-" else "start not planned yet (only the next job in line has one)"
    factors = job.priority_factors
    if factors:
        parts = " + ".join(f"{f.name.replace('_', ' ')} {f.contribution:,.0f}" for f in factors)
        text += f"  ·  priority score {job.priority_score:,.0f} = {parts}"
    return text

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
        self.log_note = "waiting for output"
        self.ranks = DeckTable(RANK_COLUMNS, self._rank_row, id="ranks-table", empty="no ranks yet",
                               selectable=False)

    @property
    def deck(self) -> Deck:
        return self.app  # type: ignore[return-value]  # the app the screen was pushed on: GpudeckApp, a Deck

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
    def job(self) -> JobView | None:
        return self.deck.cluster.jobs.get(self.job_id)

    def model_changed(self, changes: Changes) -> None:
        job = self.job
        if job is None:
            return
        if self.title != (title := f"job {job.id} {job.name}"):
            self.title = title
            self.deck.show_totals()  # the header's counts make room for this title
        self._show_summary(job)
        if self.job_id in changes.jobs or changes.traffic or changes.reset:
            self._update_traffic(job)
        self._update_log_status()

    def tick(self) -> None:
        job = self.job
        if job is not None and (job.state in ACTIVE_STATES or job.state == "pending"):
            self._show_summary(job)  # its runtime, or its planned start, counts

    def _show_summary(self, job: JobView) -> None:
        text = self._summary(job)
        lines = text.plain.count("\n")
        self.query_one("#job-summary", Static).update(text, layout=lines != getattr(self, "_summary_lines", -1))
        self._summary_lines = lines
        progress = self.query_one("#job-progress", Static)
        shown = _progress_text(job)
        progress.display = bool(shown.plain)
        progress.update(shown)

    def _summary(self, job: JobView) -> Text:
        cluster = self.deck.cluster
        text = Text()
        text.append(f"job {job.id} ", style="bold")
        text.append(job.name, style="bold")
        text.append(f"  {job.state}", style="bold reverse" if job.state == "failed" else "bold")
        exit_code = "-" if job.exit_code is None else str(job.exit_code)
        text.append(f"  attempt {job.attempt}  runtime {cluster.runtime(job)}  exit {exit_code}\n")
        limit = format_duration(job.time_limit) if job.time_limit else "none"
        text.append(f"asked {asked_text(job)}  priority {job.priority}  restarts "
                    f"{job.restarts}/{job.max_restarts}  time limit {limit}\n", style="dim")
        if job.reason:
            text.append(f"{job.reason}\n", style="italic")
        if job.state == "pending":
            text.append(queue_text(job, cluster.now()) + "\n")
        text.append("$ " + " ".join(job.command), style="dim")
        kept = outputs_text(job)
        if kept:
            text.append(f"\noutputs {kept}")
        return text

    def _update_traffic(self, job: JobView) -> None:
        traffic = self.deck.cluster.traffic.get(self.job_id)
        places = rank_places(job)
        self._places = places
        ended = job.state in FINISHED_STATES
        kinds_widget = self.query_one(KindRates)
        by_kind = job.traffic.by_kind
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
        self._health = rank_health(places, self._rank_rates, job.state == "running")
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
        job = self.job
        if job is None:
            return {}
        node = self.deck.cluster.nodes.get(place.node)
        kinds = getattr(self, "_rank_rates", {}).get(rank, {})
        traffic = self.deck.cluster.traffic.get(self.job_id)
        sent = sum((traffic.latest.get(rank, {}) if traffic else {}).values())
        reported = traffic is not None and rank in traffic.latest
        flag = getattr(self, "_health", {}).get(rank, "")
        if job.state in FINISHED_STATES:
            moved = job.traffic.by_rank.get(rank, {})
            sent = sum(moved.values())
            kinds_text = ", ".join(f"{k} {human_bytes(v)}"
                                   for k, v in sorted(moved.items(), key=lambda kv: -kv[1]) if v)
        else:
            kinds_text = ", ".join(f"{k} {rate(v)}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]) if v)
        gpu = Text()
        if node is not None and node.simulated:
            gpu.append("SIM ", style=p.sim)
        gpu.append(str(place.gpu))
        if flag:
            pace = Text(flag.upper(), style=p.bad)
        elif job.state == "running" and not reported:
            pace = Text("no report", style=p.warn)
        else:
            pace = Text("ok" if job.state == "running" else "-", style=p.dim)
        return {
            "rank": str(rank), "node": place.node, "node_rank": str(place.node_rank), "gpu": gpu,
            "rate": "-" if job.state in FINISHED_STATES else rate(sum(kinds.values())),
            "sent": human_bytes(sent), "kinds": kinds_text or "-",
            "health": pace,
        }

    # --- logs -------------------------------------------------------------------------------------

    def rank_options(self) -> list[int | None]:
        job = self.job
        if job is None:
            return [None]
        nodes = len(job.placement)
        return [None, *(p.rank for p in rank_places(job)), *(-n - 1 for n in range(nodes))]

    def _shows(self, rank: int) -> bool:
        if self.rank_choice is None:
            return rank >= 0 or (self.job is not None and self.job.state == "failed")
        return rank == self.rank_choice

    def _format(self, rank: int, line: str) -> str:
        if self.rank_choice is not None:
            return line
        return f"[{rank if rank >= 0 else launcher_label(rank)}] {line}"

    def _add(self, rank: int, lines: list[str]) -> list[str]:
        self.lines.extend((rank, line) for line in lines)
        if len(self.lines) > LOG_LINES * 2:
            del self.lines[: len(self.lines) - LOG_LINES]
        return [self._format(rank, line) for line in lines if self._shows(rank)]

    @work(exclusive=True, group="logs")
    async def follow_logs(self) -> None:
        tail = LogTail()
        log = self.query_one(Log)
        while True:
            try:
                reply = await self.deck.link.read_logs(self.job_id, None, tail.offsets)
            except (NotConnected, ConnectionError, asyncio.TimeoutError, OSError):
                self.log_note = "not connected: waiting for the coordinator"
                self._update_log_status()
                await asyncio.sleep(1.0)
                continue
            except Refused as exc:
                self.log_note = f"no logs: {exc}"
                self._update_log_status()
                return
            step = tail.take(reply)
            if step.restarted:
                log.write_line(f"--- attempt {step.attempt} ---")
            shown: list[str] = []
            for rank, line in step.lines:
                shown += self._add(rank, [safe_output(line.decode(errors="replace"), colours=False)])
            if shown:
                log.write_lines(shown)
            self.log_note = f"attempt {step.attempt}" + (", finished" if step.finished else "")
            self._update_log_status()
            if step.ended:
                if step.state == "failed":
                    self._rewrite()  # failed jobs also show each node's own output
                return
            if not step.more:
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


def _progress_text(job: JobView) -> Text:
    """A running job's hang, straggler and per-rank heatmap of waiting in collectives (empty when
    its ranks reported no collective progress)."""
    progress = job.progress if job.state == "running" else None
    text = Text()
    if not progress:
        return text
    if progress.hung:
        text.append(f"HUNG: {progress.hung.sentence}\n", style="bold reverse")
    if progress.straggler:
        text.append(f"straggler: {progress.straggler}\n", style="bold")
    text.append(f"waiting in collectives ({progress.bucket_seconds:g} s a cell, oldest left; blank: none, "
                "█: all the time):\n", style="dim")
    text.append("\n".join(wait_heatmap(progress, most_ranks=8)))
    return text
