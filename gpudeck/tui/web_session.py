"""One browser session of the dashboard: the process `gpudeck web` starts for each browser connection
under Textual's web driver, as `python -m gpudeck.tui.web_session [--coordinator HOST:PORT]
[--mdns-interface IP]`. It shows the token prompt (gpudeck.tui.login) before anything else.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from gpudeck.tui.app import run_dashboard


def end_with_parent() -> None:
    """Have Linux send this process SIGTERM (which the web driver turns into quitting) when
    `gpudeck web` dies without closing the session, killed or crashed: the driver would otherwise
    only stop reading its closed stdin and the dashboard would stay connected, with no one watching."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the parent was already gone before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    """One browser session: the dashboard, behind the token prompt."""
    parser = argparse.ArgumentParser(prog="python -m gpudeck.tui.web_session",
                                     description="The dashboard behind a token prompt, as `gpudeck web` runs it "
                                     "for each browser session.")
    parser.add_argument("--coordinator", metavar="HOST:PORT",
                        help="the coordinator (default: as the dashboard finds it)")
    parser.add_argument("--mdns-interface", action="append", metavar="IP", help="look for it over mDNS only there")
    args = parser.parse_args(argv)
    end_with_parent()
    return run_dashboard(args.coordinator, mdns_interfaces=args.mdns_interface, ask_token=True)


if __name__ == "__main__":
    sys.exit(main())
