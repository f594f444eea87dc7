"""How a command's end becomes its exit code, in one place: 0 success, 1 the request was refused (the
reason on stderr), 2 usage, 130 Ctrl-C, 141 a reader that closed our stdout early.

Commands raise `Failure` and `UsageError`; a refusal by the coordinator or a failed connection comes as
the exception of the module that met it, and is worded here.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from gpudeck.text import visible


class Failure(Exception):
    """A refusal to report on stderr with exit code 1."""


class UsageError(Failure):
    """Arguments that cannot make a request: reported like argparse's own errors, exit code 2."""


def exit_code(prog: str, command: str, run: Callable[[], int]) -> int:
    """Run `gpudeck COMMAND` (`prog` and `command`) and say on stderr why it did not succeed."""
    try:
        return _flushed(run)
    except UsageError as exc:
        print(f"{prog} {command}: error: {visible(str(exc))}", file=sys.stderr)
        return 2
    except (Failure, ValueError) as exc:
        return _refused(str(exc))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - _why_refused words refusals and failed connections, re-raises the rest
        return _refused(_why_refused(exc))


def _flushed(run: Callable[[], int]) -> int:
    """Run the command; a reader that closes our stdout early (`gpudeck jobs | head -1`) ends it
    quietly with 141, the status of a process that SIGPIPE ended, as `ls | head` gives. Stdout is
    flushed here, since output still buffered would otherwise fail at exit, where nothing catches it."""
    try:
        code = run()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python flushes stdout at exit
        return 141


def _why_refused(exc: Exception) -> str:
    """The sentence for a refusal or a failed connection (their types come with the modules that
    raise them, imported only by the commands that connect); anything else is a bug and goes on."""
    from gpudeck.client import NoCoordinator
    from gpudeck.protocol import auth
    from gpudeck.protocol.handshake import Refused

    if isinstance(exc, (Refused, auth.TokenError, auth.PinMismatch, NoCoordinator)):
        return str(exc)
    if isinstance(exc, (ConnectionError, TimeoutError, *_asyncio_timeout())):
        return ("the coordinator closed the connection or stopped answering before it replied "
                f"({exc or type(exc).__name__})")
    if isinstance(exc, OSError):
        return str(exc)
    raise exc


def _asyncio_timeout() -> tuple[type[BaseException], ...]:
    """asyncio's timeout where a command loaded asyncio (on Python 3.10 it is not `TimeoutError`)."""
    asyncio = sys.modules.get("asyncio")
    return (asyncio.TimeoutError,) if asyncio is not None else ()


def _refused(reason: str) -> int:
    print(f"gpudeck: {visible(reason)}", file=sys.stderr)
    return 1
