"""What a screen pushed over the dashboard reads of it: the cluster as the app knows it, the link to
the coordinator and the app's shared state. The screens are written against this, not the app's
class, so that the app may import them (the app composes the screens; a screen never composes the app).
"""

from __future__ import annotations

from typing import Protocol

from gpudeck.tui.client import Link, Lost
from gpudeck.tui.model import Cluster
from gpudeck.tui.spec import Form


class Deck(Protocol):
    link: Link
    cluster: Cluster
    where: str  # the coordinator's address, as the header shows it
    lost: Lost | None  # why the coordinator is not answering, while it is not
    last_form: Form | None  # the submit form as it was left, to open it again as it was

    def show_totals(self) -> None: ...

    def refresh_bindings_soon(self) -> None: ...
