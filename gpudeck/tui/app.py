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
from typing import Any, Awaitable, Callable, Iterable, Iterator

from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, TabbedContent, TabPane
from textual.worker import Worker

from gpudeck import config
from gpudeck.arrays import job_label
from gpudeck.model import WORKLOADS
from gpudeck.protocol.handshake import Refused
from gpudeck.protocol.views import JobView, NodeView
from gpudeck.text import counted, visible
from gpudeck.tui.client import (
    Changed, ClusterUpdate, Connected, CoordinatorLink, Link, Lost, NotConnected, NotFound,
)
from gpudeck.tui.deck import Deck
from gpudeck.tui.login import LoginScreen, TokenCheck
from gpudeck.tui.model import ACTIVE_STATES, FINISHED_STATES, USAGE_WINDOWS, Changes, Cluster, FollowsCluster, Ticking
from gpudeck.tui.screens.confirm import ConfirmScreen
from gpudeck.tui.screens.help import HelpScreen
from gpudeck.tui.screens.job import JobScreen
from gpudeck.tui.screens.not_found import NotFoundScreen
from gpudeck.tui.screens.submit import SubmitScreen
from gpudeck.tui.spec import Form
from gpudeck.tui.table import DeckTable
from gpudeck.tui.views.filtered import FilteredView
from gpudeck.tui.views.jobs import JobsView
from gpudeck.tui.views.nodes import NodesView
from gpudeck.tui.views.people import PeopleView
from gpudeck.tui.views.traffic import TrafficView
from gpudeck.tui.widgets.header import Banner, DeckHeader

KEYMAP_FILE = "keymap.json"
VIEWS = ("nodes", "jobs", "traffic", "people")
USAGE_EVERY = 30.0  # seconds between asks for the people view's usage figures

# (action, title, help) for the command palette; the same actions as the key bindings.
COMMANDS = [
    ("view('nodes')", "Show nodes", "Nodes and their GPUs (1)"),
    ("view('jobs')", "Show jobs", "The queue and history (2)"),
    ("view('traffic')", "Show traffic", "Every running job's parameter-sync traffic (3)"),
    ("view('people')", "Show people", "Each user's GPUs, queue, share and recent usage (4)"),
    ("submit", "Submit a job", "Open the submit form (s)"),
    ("cancel_job", "Cancel the selected job", "Stop it and all its ranks, after confirming (c)"),
    ("open_job", "Open the selected job", "Its ranks, traffic and logs (enter)"),
    ("logs", "Show the selected job's logs", "Live logs per rank (l)"),
    ("drain", "Drain or resume the selected node", "Stop or restart placing new jobs on it (d)"),
    ("expand_all", "Expand or collapse all nodes", "Show or hide every node's GPUs (e)"),
    ("filter", "Filter this view", "Show only rows matching some words (/)"),
    ("mine", "Only my jobs, or everyone's", "Jobs: show only the jobs submitted with your token, or all (m)"),
    ("help", "Help", "Keys, what the views show, how traffic is derived (?)"),
]


class ModelChanged(Message):
    """The model changed; the changes wait in the app until this is handled (one at a time)."""


class GpudeckApp(App[int]):
    CSS_PATH = "gpudeck.tcss"
    TITLE = "gpudeck"
    # In the order the help window lists them: the views, then what acts on them.
    BINDINGS = [
        Binding("1", "view('nodes')", "Nodes", id="gpudeck.nodes", show=False, tooltip="view: nodes and their GPUs"),
        Binding("2", "view('jobs')", "Jobs", id="gpudeck.jobs", show=False, tooltip="view: the queue and history"),
        Binding("3", "view('traffic')", "Traffic", id="gpudeck.traffic", show=False,
                tooltip="view: every running job's parameter-sync traffic"),
        Binding("4", "view('people')", "People", id="gpudeck.people", show=False,
                tooltip="view: each user's GPUs, queue, share and recent usage"),
        Binding("s", "submit", "Submit", id="gpudeck.submit", tooltip="submit a job (a form)"),
        Binding("c", "cancel_job", "Cancel", id="gpudeck.cancel", tooltip="cancel the selected job, after asking"),
        Binding("l", "logs", "Logs", id="gpudeck.logs", tooltip="the selected job's logs, live, per rank"),
        Binding("d", "drain", "Drain", id="gpudeck.drain",
                tooltip="drain the selected node (no new jobs there), or resume it"),
        Binding("e", "expand_all", "Expand", id="gpudeck.expand_all", tooltip="nodes: show or hide every node's GPUs"),
        Binding("slash", "filter", "Filter", id="gpudeck.filter", tooltip="show only the rows matching some words"),
        Binding("m", "mine", "Mine", id="gpudeck.mine", tooltip="jobs: only yours, or everyone's again"),
        Binding("question_mark", "help", "Help", id="gpudeck.help", tooltip="this help"),
        Binding("q", "quit", "Quit", id="gpudeck.quit", tooltip="quit the dashboard"),
    ]

    def __init__(self, link: Link, keymap_path: Path | None = None, wall: Callable[[], float] = time.time,
                 mono: Callable[[], float] = time.monotonic, tick: float = 1.0, cwd: str | None = None,
                 workloads: dict[str, str] | None = None, local_node: str | None = None,
                 token_check: TokenCheck | None = None, usage_every: float = USAGE_EVERY) -> None:
        """`local_node`: the agent `gpudeck up` runs beside this dashboard, whose coordinator and agent
        stop when it quits. `token_check`: ask for the token on a prompt first, and connect only once
        this has accepted the typed one (`gpudeck web`). `usage_every`: seconds between asks for the
        people view's usage figures (0: only when connecting)."""
        super().__init__()
        self.token_check = token_check
        self.local_node = local_node
        self.link = link
        self.workloads = WORKLOADS if workloads is None else workloads
        self.cluster = Cluster(wall, mono)
        self.keymap_path = keymap_path if keymap_path is not None else config.data_dir() / KEYMAP_FILE
        self.tick_every = tick
        self.usage_every = usage_every
        self.cwd = cwd
        self.where = ""
        self.last_form: Form | None = None
        self.lost: Lost | None = None
        self._changes = Changes()
        self._posted = False
        self._link_worker: Worker[None] | None = None
        self._binding_state: tuple[Any, ...] = ()
        self.nodes_view = NodesView(self.cluster, id="nodes-view", local_node=local_node)
        self.jobs_view = JobsView(self.cluster, id="jobs-view")
        self.traffic_view = TrafficView(self.cluster, id="traffic-view")
        self.people_view = PeopleView(self.cluster, id="people-view")
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
            with TabPane("4 People", id="people"):
                yield self.people_view
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = (f"starting the coordinator and the local agent ({self.local_node})…" if self.local_node
                          else "looking for the coordinator…")
        self._load_keymap()
        if self.token_check is None:
            self.restart_link()
        else:
            self.push_screen(LoginScreen(self.token_check), lambda _token: self.restart_link())
        if self.tick_every:
            self.set_interval(self.tick_every, self._tick)
        if self.usage_every:
            self.set_interval(self.usage_every, self.refresh_usage)
        self.nodes_view.table.focus()

    def _load_keymap(self) -> None:
        try:
            keymap = json.loads(self.keymap_path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            self.notify(f"ignored {self.keymap_path}: {exc}", severity="warning")
            return
        if not isinstance(keymap, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in keymap.items()):
            self.notify(f"ignored {self.keymap_path}: it must map binding ids to keys", severity="warning")
            return
        unknown = sorted(set(keymap) - binding_ids())
        if unknown:
            self.notify(f"{self.keymap_path}: no key has the binding id {', '.join(map(repr, unknown))}, so "
                        f"{'it is' if len(unknown) == 1 else 'they are'} ignored; ? lists the ids",
                        severity="warning", markup=False)
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
            self._post_changes()

    def _post_changes(self) -> None:
        """Ask for one repaint of what changed, unless one is already asked for."""
        if self._changes and not self._posted:
            self._posted = True
            self.post_message(ModelChanged())

    def refresh_usage(self) -> None:
        self.run_worker(self._fetch_usage(), name="usage", group="usage", exclusive=True)

    async def _fetch_usage(self) -> None:
        """The people view's usage figures, one ask per window; kept as they were when the coordinator
        cannot answer (the banner already says when it is lost)."""
        now = self.cluster.now()
        try:
            views = {name: await self.link.usage(now - seconds) for name, seconds in USAGE_WINDOWS.items()}
        except (Refused, NotConnected, ConnectionError, OSError, TimeoutError):
            return
        self._changes.merge(self.cluster.set_usage(views))
        self._post_changes()

    def _on_link_event(self, event: object) -> None:
        if isinstance(event, Changed):
            for update in event.updates:
                self._changes.merge(self.cluster.apply(update))
        elif isinstance(event, Connected):
            self._changes.merge(self.cluster.reset(event.snapshot))
            self._connected(event)
            self.refresh_usage()
        elif isinstance(event, Lost):
            self._changes.merge(self.cluster.disconnected())
            self._lost(event)
        elif isinstance(event, NotFound):
            self._not_found(event)

    def _connected(self, event: Connected) -> None:
        self.where = visible(event.where)  # it may name a node from an mDNS advert
        self.jobs_view.me = event.user
        self.jobs_view.rebuild()
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
            banner.say(f"Lost the coordinator {self.where}: {event.reason.rstrip('.?! ')}. Reconnecting "
                       f"(try {event.attempt}, next in {event.retry_in:.0f} s); what you see is from before.")
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
        asked = getattr(self.link, "coordinator", None) or os.environ.get("GPUDECK_COORDINATOR")
        self.push_screen(NotFoundScreen(event.reason, event.retry_in, visible(asked) if asked else None))

    def on_model_changed(self, message: ModelChanged) -> None:
        changes, self._changes, self._posted = self._changes, Changes(), False
        for view in (self.nodes_view, self.jobs_view, self.traffic_view, self.people_view):
            view.model_changed(changes)
        for screen in self.screen_stack:
            if isinstance(screen, FollowsCluster):
                screen.model_changed(changes)
        self.show_totals()
        self.refresh_bindings_soon()

    def show_totals(self) -> None:
        """The header's counts; where the terminal is narrow, without the coordinator's address."""
        if self.lost is not None or not self.cluster.connected or not self.screen_stack:
            return  # (no screen: between one screen and the next, or shutting down)
        totals = self.cluster.totals()
        sim = f" ({totals['simulated']} SIM)" if totals["simulated"] else ""
        nodes = f"{totals['up']}/{totals['nodes']} nodes up"
        if not totals["nodes"] and self.local_node:
            nodes = f"the local agent ({self.local_node}) is starting"
        jobs = f"{totals['busy']} busy · {totals['running']} running · {totals['pending']} pending"
        gpus = counted(totals["gpus"], "GPU")
        counts = f"{nodes} · {gpus}{sim} · {jobs}"
        room = self.size.width - HEADER_MARGIN - max(len(screen.title or self.title) for screen in self.screen_stack)
        if len(f" — {self.where} · {counts}") <= room:
            self.sub_title = f"{self.where} · {counts}"
        elif len(f" — {counts}") <= room:
            self.sub_title = counts
        else:  # the counts a person acts on, in the fewest words
            self.sub_title = f"{totals['up']}/{totals['nodes']} up · {gpus} · {jobs}"

    def on_resize(self) -> None:
        self.show_totals()

    def _tick(self) -> None:
        """Once a second: ages and runtimes move on without any update."""
        view = self.active_view
        if view is not None:
            view.table.refresh()
        if isinstance(self.screen, Ticking):
            self.screen.tick()

    # --- where the user is --------------------------------------------------------------------------

    @property
    def active_tab(self) -> str:
        try:
            return self.query_one("#views", TabbedContent).active or "nodes"
        except Exception:  # noqa: BLE001 - before compose
            return "nodes"

    @property
    def active_view(self) -> NodesView | JobsView | TrafficView | PeopleView | None:
        views: dict[str, NodesView | JobsView | TrafficView | PeopleView] = {
            "nodes": self.nodes_view, "jobs": self.jobs_view, "traffic": self.traffic_view, "people": self.people_view}
        return views.get(self.active_tab)

    def selected_job(self, screen: Screen | None = None) -> JobView | None:
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
        if isinstance(screen, LoginScreen):
            return action == "quit"
        if isinstance(screen, ModalScreen):
            return action not in _OWN_ACTIONS and action != "quit"
        if isinstance(screen, NotFoundScreen):
            return action not in _OWN_ACTIONS or action == "help"
        main = screen is self.screen_stack[0]
        if action == "cancel_job":
            job = self.selected_job(screen)
            return job is not None and job.state not in FINISHED_STATES
        if action in ("logs", "open_job"):
            return self.selected_job(screen) is not None and not isinstance(screen, JobScreen)
        if action == "drain":
            return self.selected_node(screen) is not None
        if action == "filter":
            return main and self.active_tab in ("nodes", "jobs")
        if action == "expand_all":
            return main and self.active_tab == "nodes"
        if action == "mine":
            return main and self.active_tab == "jobs" and bool(self.jobs_view.me)
        return True

    def refresh_bindings_soon(self) -> None:
        """Refresh the footer only when the set of keys that apply changed (it is not free)."""
        if not self.screen_stack:  # shutting down
            return
        state = (tuple(self.check_action(a, ())
                       for a in ("cancel_job", "logs", "drain", "filter", "expand_all", "mine")),
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

    def _submitted(self, job: JobView | None) -> None:
        if not job:
            return
        self.last_form = None
        self._changes.merge(self.cluster.upsert_job(job))
        self.on_model_changed(ModelChanged())
        self.action_view("jobs")
        if self.jobs_view.table.index_of(job.id) is None:
            self.jobs_view.clear_filter()  # a filter that hides the new job would hide the answer
        self.jobs_view.table.move_to(job.id)
        self.notify(f"job {job.id} {visible(job.name)} submitted: {job.state}", title="submitted",
                    markup=False)

    def action_open_job(self) -> None:
        job = self.selected_job()
        if job is not None:
            self.push_screen(JobScreen(job.id, "traffic"))

    def action_logs(self) -> None:
        job = self.selected_job()
        if job is not None:
            self.push_screen(JobScreen(job.id, "logs"))

    def action_cancel_job(self) -> None:
        job = self.selected_job()
        if job is None or job.state in FINISHED_STATES:
            return
        where = f" on {', '.join(job.nodes)}" if job.nodes else ""
        detail = (f"It is {job.state}{where}; every rank will be stopped." if job.state in ACTIVE_STATES
                  else "It is still waiting; it will not start.")
        label = job_label(job.id, job.array_job, job.array_index)
        self.push_screen(ConfirmScreen(f"Cancel job {label} {job.name}?", detail, "Cancel the job",
                                       "Keep the job"), partial(self._cancel_confirmed, job))

    def _cancel_confirmed(self, job: JobView, yes: bool | None) -> None:
        """Cancel the selected job: of an array, that one task (its row), never the whole array."""
        if yes:
            label = job_label(job.id, job.array_job, job.array_index)
            cancel = (self.link.cancel(job.array_job, job.array_index) if job.array_job is not None
                      else self.link.cancel(job.id))
            self.run_worker(self._request(cancel, f"job {label} cancelled"), group="requests")

    def action_drain(self) -> None:
        name = self.selected_node()
        node = self.cluster.nodes.get(name or "")
        if name is None or node is None:
            return
        if node.draining:
            self.push_screen(ConfirmScreen(f"Resume node {name}?", "New jobs may be placed on it again.",
                                           "Resume it", "Keep it drained"), partial(self._drain_confirmed, name, False))
        else:
            jobs = len(node.jobs)
            running = ("no job runs there now" if not jobs else "the job running there goes on" if jobs == 1
                       else f"the {jobs} jobs running there go on")
            self.push_screen(ConfirmScreen(f"Drain node {name}?", f"No new jobs will be placed on it; {running}.",
                                           "Drain it", "Don't drain"), partial(self._drain_confirmed, name, True))

    def _drain_confirmed(self, name: str, on: bool, yes: bool | None) -> None:
        if yes:
            done = f"node {name} " + ("is draining" if on else "takes new jobs again")
            self.run_worker(self._request(self.link.drain(name, on), done), group="requests")

    async def _request(self, call: Awaitable[JobView | NodeView], done: str) -> None:
        """One request from an action: the reply updates the model; a refusal is a toast."""
        try:
            reply = await call
        except Refused as exc:
            self.notify(visible(str(exc)), title="refused", severity="error", markup=False)
            return
        except (NotConnected, ConnectionError, OSError, TimeoutError) as exc:
            self.notify(visible(f"not sent: {exc}"), title="no coordinator", severity="error", markup=False)
            return
        if isinstance(reply, JobView):
            self._changes.merge(self.cluster.upsert_job(reply))
        else:
            self._changes.merge(self.cluster.apply(ClusterUpdate(nodes=[reply])))
        self.on_model_changed(ModelChanged())
        self.notify(done, markup=False)  # it names a job or node

    async def action_quit(self) -> None:
        """In `gpudeck up`, quitting stops the coordinator and the agent: with jobs running, ask first."""
        running = len(self.cluster.active_jobs())
        if not self.local_node or not running:
            self.exit()
            return
        self.push_screen(ConfirmScreen(
            "Quit gpudeck up?",
            f"{running} job{' is' if running == 1 else 's are'} running. Quitting stops the coordinator and the local "
            "agent; the ranks keep running and are adopted on the next `gpudeck up`.", "Quit", "Stay"),
            self._quit_confirmed)

    def _quit_confirmed(self, yes: bool | None) -> None:
        if yes:
            self.exit()

    def action_filter(self) -> None:
        view = self.active_view
        if isinstance(view, FilteredView):
            view.show_filter()

    def action_mine(self) -> None:
        self.jobs_view.mine_only = not self.jobs_view.mine_only

    def action_expand_all(self) -> None:
        self.nodes_view.toggle_all()

    def action_help(self) -> None:
        """Every key of where the user is: the views, the actions, the open screen's own keys, then
        moving around; each as the keymap has it now."""
        keys = [self._key_help(binding) for binding in self.BINDINGS if isinstance(binding, Binding)]
        if isinstance(self.screen, JobScreen):
            keys += [self._key_help(binding, "job: ") for binding in self.screen.BINDINGS
                     if isinstance(binding, Binding)]
        keys += MOVING_KEYS
        self.push_screen(HelpScreen(keys, str(self.keymap_path)))

    def _key_help(self, binding: Binding, prefix: str = "") -> tuple[str, str, str]:
        return (self.get_key_display(binding), prefix + (binding.tooltip or binding.description.lower()),
                binding.id or "")

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        if isinstance(screen, LoginScreen):
            return  # nothing runs for someone who has not proven a token
        yield from super().get_system_commands(screen)
        for action, title, text in COMMANDS:
            name = action.split("(")[0]
            if self.applies(name, screen):
                yield SystemCommand(title, text, partial(self.run_action, action))


HEADER_MARGIN = 12  # the header's icon and padding, in columns


def binding_ids() -> set[str]:
    """Every binding id a keymap file may name (the app's, its screens' and the tables')."""
    owners = (GpudeckApp, JobScreen, SubmitScreen, ConfirmScreen, HelpScreen, NotFoundScreen, DeckTable)
    return {binding.id for owner in owners for binding in owner.BINDINGS
            if isinstance(binding, Binding) and binding.id}


# Keys of the tables and the command palette, for the help window: (keys, what they do, binding id).
MOVING_KEYS = [
    ("enter", "open the row (a node: show or hide its GPUs; a job: its detail)", "table.select"),
    ("j k ↑ ↓", "move; PgUp PgDn page; g G first, last", ""),
    ("ctrl+p", "command palette: every action, and the theme", ""),
]

_OWN_ACTIONS = {"view", "submit", "cancel_job", "logs", "open_job", "drain", "expand_all", "filter", "mine", "help"}


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
                  mdns_interfaces: list[str] | None = None, ask_token: bool = False) -> int:
    """`gpudeck` / `gpudeck tui`: the dashboard against the coordinator found as the CLI finds it.
    `ask_token` (a browser session of `gpudeck web`): only the token typed on the prompt is used,
    never one from flags, the environment or this machine's data dir."""
    if ask_token:
        link = CoordinatorLink(coordinator, mdns_interfaces=mdns_interfaces, name="web")
        app = GpudeckApp(link, token_check=link.check_token)
    else:
        app = GpudeckApp(CoordinatorLink(coordinator, token, token_file, mdns_interfaces=mdns_interfaces))
    with quiet_logging(None):
        app.run()
    return app.return_code or 0


# The screens read the app they are pushed on as a Deck (gpudeck.tui.deck); mypy checks here that it is one.
_APP_IS_A_DECK: type[Deck] = GpudeckApp
