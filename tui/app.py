"""The gpudeck dashboard: a Textual app over a `Link` to the coordinator.

The link's events run in one worker: a snapshot replaces the model, updates merge into it, and the
changes they cause accumulate until the app gets to repaint. If the screen falls behind, several
updates become one repaint of the rows they touched; nothing queues per update.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, TabbedContent, TabPane
from textual.worker import Worker

from gpudeck import config
from gpudeck.model import WORKLOADS
from gpudeck.protocol.session import Refused
from gpudeck.text import visible
from gpudeck.tui.client import Changed, Connected, CoordinatorLink, Link, Lost, NotConnected, NotFound
from gpudeck.tui.model import ACTIVE_STATES, FINISHED_STATES, Changes, Cluster
from gpudeck.tui.screens import ConfirmScreen, HelpScreen, JobScreen, NotFoundScreen, SubmitScreen
from gpudeck.tui.spec import Form
from gpudeck.tui.table import DeckTable
from gpudeck.tui.views import Banner, DeckHeader, FilteredView, JobsView, NodesView, TrafficView

KEYMAP_FILE = "keymap.json"
VIEWS = ("nodes", "jobs", "traffic")

# (action, title, help) for the command palette; the same actions as the key bindings.
COMMANDS = [
    ("view('nodes')", "Show nodes", "Nodes and their GPUs (1)"),
    ("view('jobs')", "Show jobs", "The queue and history (2)"),
    ("view('traffic')", "Show traffic", "Every running job's parameter-sync traffic (3)"),
    ("submit", "Submit a job", "Open the submit form (s)"),
    ("cancel_job", "Cancel the selected job", "Stop it and all its ranks, after confirming (c)"),
    ("open_job", "Open the selected job", "Its ranks, traffic and logs (enter)"),
    ("logs", "Show the selected job's logs", "Live logs per rank (l)"),
    ("drain", "Drain or resume the selected node", "Stop or restart placing new jobs on it (d)"),
    ("expand_all", "Expand or collapse all nodes", "Show or hide every node's GPUs (e)"),
    ("filter", "Filter this view", "Show only rows matching some words (/)"),
    ("help", "Help", "Keys, what the views show, how traffic is derived (?)"),
]


class ModelChanged(Message):
    """The model changed; the changes wait in the app until this is handled (one at a time)."""


class GpudeckApp(App[int]):
    CSS_PATH = "gpudeck.tcss"
    TITLE = "gpudeck"
    BINDINGS = [
        Binding("1", "view('nodes')", "Nodes", id="gpudeck.nodes", show=False),
        Binding("2", "view('jobs')", "Jobs", id="gpudeck.jobs", show=False),
        Binding("3", "view('traffic')", "Traffic", id="gpudeck.traffic", show=False),
        Binding("s", "submit", "Submit", id="gpudeck.submit"),
        Binding("c", "cancel_job", "Cancel", id="gpudeck.cancel"),
        Binding("l", "logs", "Logs", id="gpudeck.logs"),
        Binding("d", "drain", "Drain", id="gpudeck.drain"),
        Binding("e", "expand_all", "Expand", id="gpudeck.expand_all"),
        Binding("slash", "filter", "Filter", id="gpudeck.filter"),
        Binding("question_mark", "help", "Help", id="gpudeck.help"),
        Binding("q", "quit", "Quit", id="gpudeck.quit"),
    ]

    def __init__(self, link: Link, keymap_path: Path | None = None, wall: Callable[[], float] = time.time,
                 mono: Callable[[], float] = time.monotonic, tick: float = 1.0, cwd: str | None = None,
                 workloads: dict[str, str] | None = None) -> None:
        super().__init__()
        self.link = link
        self.workloads = WORKLOADS if workloads is None else workloads
        self.cluster = Cluster(wall, mono)
        self.keymap_path = keymap_path if keymap_path is not None else config.data_dir() / KEYMAP_FILE
        self.tick_every = tick
        self.cwd = cwd
        self.where = ""
        self.last_form: Form | None = None
        self.lost: Lost | None = None
        self._changes = Changes()
        self._posted = False
        self._link_worker: Worker[None] | None = None
        self._binding_state: tuple[Any, ...] = ()
        self.nodes_view = NodesView(self.cluster, id="nodes-view")
        self.jobs_view = JobsView(self.cluster, id="jobs-view")
        self.traffic_view = TrafficView(self.cluster, id="traffic-view")
        theme = os.environ.get("GPUDECK_THEME")
        if theme and theme in self.available_themes:
            self.theme = theme

    # --- layout -------------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield DeckHeader(show_clock=False)
        yield Banner(id="banner", classes="banner")
        with TabbedContent(initial="nodes", id="views"):
            with TabPane("1 Nodes", id="nodes"):
                yield self.nodes_view
            with TabPane("2 Jobs", id="jobs"):
                yield self.jobs_view
            with TabPane("3 Traffic", id="traffic"):
                yield self.traffic_view
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "looking for the coordinator…"
        self._load_keymap()
        self.restart_link()
        if self.tick_every:
            self.set_interval(self.tick_every, self._tick)
        self.nodes_view.table.focus()

    def _load_keymap(self) -> None:
        try:
            keymap = json.loads(self.keymap_path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            self.notify(f"ignored {self.keymap_path}: {exc}", severity="warning")
            return
        if not isinstance(keymap, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in keymap.items()):
            self.notify(f"ignored {self.keymap_path}: it must map binding ids to keys", severity="warning")
            return
        self.set_keymap(keymap)

    # --- the link -----------------------------------------------------------------------------------

    def restart_link(self) -> None:
        if self._link_worker is not None:
            self._link_worker.cancel()
        self._link_worker = self.run_worker(self._follow_link(), name="link", group="link", exclusive=True)

    async def _follow_link(self) -> None:
        async for event in self.link.events():
            try:
                self._on_link_event(event)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                # Data this version does not understand: say so and keep the dashboard up.
                logging.getLogger(__name__).exception("could not apply %s", type(event).__name__)
                self.notify(f"ignored an update this dashboard cannot read: {exc!r}", severity="error", markup=False)
            if self._changes and not self._posted:
                self._posted = True
                self.post_message(ModelChanged())

    def _on_link_event(self, event: object) -> None:
        if isinstance(event, Changed):
            for update in event.updates:
                self._changes.merge(self.cluster.apply(update))
        elif isinstance(event, Connected):
            self._changes.merge(self.cluster.reset(event.snapshot))
            self._connected(event)
        elif isinstance(event, Lost):
            self._changes.merge(self.cluster.disconnected())
            self._lost(event)
        elif isinstance(event, NotFound):
            self._not_found(event)

    def _connected(self, event: Connected) -> None:
        self.where = visible(event.where)  # it may name a node from an mDNS advert
        for banner in self.banners():
            banner.remove_class("-shown")
        if self.lost is not None:
            self.notify(f"reconnected to {self.where}", title="coordinator back", markup=False)
        self.lost = None
        for screen in list(self.screen_stack):
            if isinstance(screen, NotFoundScreen):
                screen.dismiss()

    def _lost(self, event: Lost) -> None:
        self.lost = event
        for banner in self.banners():
            banner.say(f"Lost the coordinator {self.where}: {event.reason.rstrip('.?! ')}. Reconnecting (try {event.attempt}, "
                       f"next in {event.retry_in:.0f} s); what you see is from before.")
            banner.add_class("-shown")
        self.sub_title = f"{self.where} · disconnected"

    def banners(self) -> list[Banner]:
        """The connection banner of every screen that has one (the main views, a job's detail)."""
        return [banner for screen in self.screen_stack for banner in screen.query(Banner)]

    def on_screen_resume(self) -> None:
        self.refresh_bindings_soon()

    def _not_found(self, event: NotFound) -> None:
        self.sub_title = "no coordinator"
        for screen in self.screen_stack:
            if isinstance(screen, NotFoundScreen):
                screen.show(event.reason, event.retry_in)
                return
        self.push_screen(NotFoundScreen(event.reason, event.retry_in))

    def on_model_changed(self, message: ModelChanged) -> None:
        changes, self._changes, self._posted = self._changes, Changes(), False
        for view in (self.nodes_view, self.jobs_view, self.traffic_view):
            view.model_changed(changes)
        for screen in self.screen_stack:
            if isinstance(screen, JobScreen):
                screen.model_changed(changes)
        if self.lost is None and self.cluster.connected:
            totals = self.cluster.totals()
            sim = f" ({totals['simulated']} SIM)" if totals["simulated"] else ""
            self.sub_title = (f"{self.where} · {totals['up']}/{totals['nodes']} nodes up · {totals['gpus']} GPUs{sim}"
                              f" · {totals['busy']} busy · {totals['running']} running · {totals['pending']} pending")
        self.refresh_bindings_soon()

    def _tick(self) -> None:
        """Once a second: ages and runtimes move on without any update."""
        view = self.active_view
        if view is not None:
            view.table.refresh()
        if isinstance(self.screen, JobScreen):
            self.screen.tick()

    # --- where the user is --------------------------------------------------------------------------

    @property
    def active_tab(self) -> str:
        try:
            return self.query_one("#views", TabbedContent).active or "nodes"
        except Exception:  # noqa: BLE001 - before compose
            return "nodes"

    @property
    def active_view(self) -> NodesView | JobsView | TrafficView | None:
        return {"nodes": self.nodes_view, "jobs": self.jobs_view, "traffic": self.traffic_view}.get(self.active_tab)

    def selected_job(self, screen: Screen | None = None) -> dict[str, Any] | None:
        screen = screen or self.screen
        if isinstance(screen, JobScreen):
            return screen.job
        if screen is not self.screen_stack[0]:
            return None
        if self.active_tab == "jobs":
            return self.jobs_view.selected_job()
        if self.active_tab == "traffic":
            return self.traffic_view.selected_job()
        return None

    def selected_node(self, screen: Screen | None = None) -> str | None:
        if (screen or self.screen) is self.screen_stack[0] and self.active_tab == "nodes":
            return self.nodes_view.selected_node()
        return None

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if not self.screen_stack:  # shutting down
            return False
        return self.applies(action, self.screen)

    def applies(self, action: str, screen: Screen) -> bool:
        """Whether an action makes sense on `screen` now (the footer and the palette show only those)."""
        if isinstance(screen, ModalScreen):
            return action not in _OWN_ACTIONS and action != "quit"
        if isinstance(screen, NotFoundScreen):
            return action not in _OWN_ACTIONS or action == "help"
        main = screen is self.screen_stack[0]
        if action == "cancel_job":
            job = self.selected_job(screen)
            return job is not None and job["state"] not in FINISHED_STATES
        if action in ("logs", "open_job"):
            return self.selected_job(screen) is not None and not isinstance(screen, JobScreen)
        if action == "drain":
            return self.selected_node(screen) is not None
        if action == "filter":
            return main and self.active_tab in ("nodes", "jobs")
        if action == "expand_all":
            return main and self.active_tab == "nodes"
        return True

    def refresh_bindings_soon(self) -> None:
        """Refresh the footer only when the set of keys that apply changed (it is not free)."""
        if not self.screen_stack:  # shutting down
            return
        state = (tuple(self.check_action(a, ()) for a in ("cancel_job", "logs", "drain", "filter", "expand_all")),
                 self.active_tab, len(self.screen_stack))
        if state != self._binding_state:
            self._binding_state = state
            self.refresh_bindings()

    def on_deck_table_highlighted(self, event: DeckTable.Highlighted) -> None:
        self.refresh_bindings_soon()

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        if event.tabbed_content.id == "views":
            view = self.active_view
            if view is not None:
                view.table.focus()
        self.refresh_bindings_soon()

    def on_deck_table_selected(self, event: DeckTable.Selected) -> None:
        if event.table.id in ("jobs-table", "traffic-table") and event.key is not None:
            self.push_screen(JobScreen(event.key, "traffic"))

    # --- actions ------------------------------------------------------------------------------------

    def _to_main(self) -> None:
        while len(self.screen_stack) > 1 and not isinstance(self.screen, NotFoundScreen):
            self.pop_screen()

    def action_view(self, name: str) -> None:
        self._to_main()
        self.query_one("#views", TabbedContent).active = name
        view = self.active_view
        if view is not None:
            view.table.focus()
        self.refresh_bindings_soon()

    def action_submit(self) -> None:
        self.push_screen(SubmitScreen(self.last_form, self.cwd, self.workloads), self._submitted)

    def _submitted(self, job: dict[str, Any] | None) -> None:
        if not job:
            return
        self.last_form = None
        self._changes.merge(self.cluster.upsert_job(job))
        self.on_model_changed(ModelChanged())
        self.action_view("jobs")
        if self.jobs_view.table.index_of(job["id"]) is None:
            self.jobs_view.clear_filter()  # a filter that hides the new job would hide the answer
        self.jobs_view.table.move_to(job["id"])
        self.notify(f"job {job['id']} {visible(job['name'])} submitted: {job['state']}", title="submitted", markup=False)

    def action_open_job(self) -> None:
        job = self.selected_job()
        if job is not None:
            self.push_screen(JobScreen(job["id"], "traffic"))

    def action_logs(self) -> None:
        job = self.selected_job()
        if job is not None:
            self.push_screen(JobScreen(job["id"], "logs"))

    def action_cancel_job(self) -> None:
        job = self.selected_job()
        if job is None or job["state"] in FINISHED_STATES:
            return
        where = f" on {', '.join(job['nodes'])}" if job.get("nodes") else ""
        detail = (f"It is {job['state']}{where}; every rank will be stopped." if job["state"] in ACTIVE_STATES
                  else "It is still waiting; it will not start.")
        self.push_screen(ConfirmScreen(f"Cancel job {job['id']} {job['name']}?", detail, "Cancel the job"),
                         partial(self._cancel_confirmed, job["id"]))

    def _cancel_confirmed(self, job_id: int, yes: bool | None) -> None:
        if yes:
            self.run_worker(self._request(self.link.cancel(job_id), f"job {job_id} cancelled"), group="requests")

    def action_drain(self) -> None:
        name = self.selected_node()
        node = self.cluster.nodes.get(name or "")
        if node is None:
            return
        if node.get("draining"):
            self.push_screen(ConfirmScreen(f"Resume node {name}?", "New jobs may be placed on it again.",
                                           "Resume it"), partial(self._drain_confirmed, name, False))
        else:
            jobs = len(node.get("jobs", []))
            self.push_screen(ConfirmScreen(
                f"Drain node {name}?",
                f"No new jobs will be placed on it; the {jobs} job{'s' if jobs != 1 else ''} running there go on.",
                "Drain it"), partial(self._drain_confirmed, name, True))

    def _drain_confirmed(self, name: str, on: bool, yes: bool | None) -> None:
        if yes:
            done = f"node {name} " + ("is draining" if on else "takes new jobs again")
            self.run_worker(self._request(self.link.drain(name, on), done), group="requests")

    async def _request(self, call: Any, done: str) -> None:
        """One request from an action: the reply updates the model; a refusal is a toast."""
        try:
            reply = await call
        except Refused as exc:
            self.notify(visible(str(exc)), title="refused", severity="error", markup=False)
            return
        except (NotConnected, ConnectionError, OSError, TimeoutError) as exc:
            self.notify(visible(f"not sent: {exc}"), title="no coordinator", severity="error", markup=False)
            return
        if isinstance(reply, dict) and "id" in reply:
            self._changes.merge(self.cluster.upsert_job(reply))
        elif isinstance(reply, dict) and "gpus" in reply and "name" in reply:
            self._changes.merge(self.cluster.apply({"nodes": [reply]}))
        self.on_model_changed(ModelChanged())
        self.notify(done, markup=False)  # it names a job or node

    def action_filter(self) -> None:
        view = self.active_view
        if isinstance(view, FilteredView):
            view.show_filter()

    def action_expand_all(self) -> None:
        self.nodes_view.toggle_all()

    def action_help(self) -> None:
        keys = []
        for binding in self.screen_stack[0].active_bindings.values():
            b = binding.binding
            if b.id and binding.node is self:
                keys.append((self.get_key_display(b), b.description, b.id))
        for extra in (("enter", "open the row (a node: its GPUs; a job: its detail)", "table.select"),
                      ("j k ↑ ↓", "move; PgUp PgDn page; g G first, last", "table.*"),
                      ("ctrl+p", "command palette: every action, and the theme", "")):
            keys.append(extra)
        if isinstance(self.screen, JobScreen):
            keys += [("t / l", "job: traffic / logs tab", "job.traffic, job.logs"),
                     ("f", "logs: follow on or off", "job.follow"),
                     ("[ ]", "logs: previous or next rank (or torchrun's own output)", "job.prev_rank, job.next_rank"),
                     ("escape", "back", "job.back")]
        self.push_screen(HelpScreen(sorted(set(keys), key=lambda k: k[2] or "~"), str(self.keymap_path)))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for action, title, text in COMMANDS:
            name = action.split("(")[0]
            if self.applies(name, screen):
                yield SystemCommand(title, text, partial(self.run_action, action))


_OWN_ACTIONS = {"view", "submit", "cancel_job", "logs", "open_job", "drain", "expand_all", "filter", "help"}


@contextmanager
def quiet_logging(path: Path | None) -> Iterator[None]:
    """Send log records to `path` (or nowhere) while the dashboard owns the terminal."""
    root = logging.getLogger()
    saved = root.handlers[:]
    handler: logging.Handler = logging.NullHandler()
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(path)
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        except OSError:
            pass
    root.handlers = [handler]
    try:
        yield
    finally:
        root.handlers = saved
        handler.close()


def run_dashboard(coordinator: str | None = None, token: str | None = None, token_file: str | None = None,
                  mdns_interfaces: list[str] | None = None) -> int:
    """`gpudeck` / `gpudeck tui`: the dashboard against the coordinator found as the CLI finds it."""
    app = GpudeckApp(CoordinatorLink(coordinator, token, token_file, mdns_interfaces=mdns_interfaces))
    with quiet_logging(None):
        app.run()
    return app.return_code or 0
