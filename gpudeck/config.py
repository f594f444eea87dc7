"""Where gpudeck keeps its files, and how a client finds the coordinator and its token.

The data dir is `$GPUDECK_HOME`, else `$XDG_DATA_HOME/gpudeck`, else `~/.local/share/gpudeck`. A
coordinator started with its state there (as `gpudeck up` does) leaves its address and token where
clients on the same machine find them without flags.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpudeck.protocol import auth

DEFAULT_PORT = 7070
WEB_PORT = 7080  # `gpudeck web`, the dashboard in a browser
ENDPOINT_FILE = "endpoint.json"

# Storage bounds, each a flag of `gpudeck coordinator` or `gpudeck agent` (the default here).
PROJECT_STORE_LIMIT = 8 * 1024**3  # the coordinator's store of shipped project files
IDLE_AFTER = 30 * 60.0  # seconds every GPU of a running job reads 0 % before the job is marked idle
HANG_AFTER = 600.0  # `gpudeck coordinator --hang-after`: no collective completed this long flags a job hung
NODE_CACHE_LIMIT = 16 * 1024**3  # a node's cache of project files
KEEP_OUTPUTS_FOR = 7 * 86400.0  # seconds a node keeps a job's outputs...
OUTPUTS_SPACE = 10 * 1024**3  # ...or until they take this much, the oldest going first
ENVIRONMENTS_KEPT = 8  # environments built from requirements files a node keeps
WARM_INTERPRETERS = 1  # interpreters with torch imported that a node keeps to fork ranks from


def data_dir() -> Path:
    if home := os.environ.get("GPUDECK_HOME"):
        return Path(home).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "gpudeck"


def coordinator_dir() -> Path:
    return data_dir() / "coordinator"


def agent_dir() -> Path:
    return data_dir() / "agent"


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    how: str  # where the address came from, for messages


def local_endpoint(state_dir: Path | None = None) -> Endpoint | None:
    """The address a coordinator using `state_dir` (default: this data dir) wrote when it started."""
    path = (state_dir or coordinator_dir()) / ENDPOINT_FILE
    try:
        data = json.loads(path.read_text())
        return Endpoint(str(data["host"]), int(data["port"]), f"the local coordinator ({path})")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def split_address(address: str, default_port: int | None = None) -> tuple[str, int]:
    """`HOST:PORT` (or `[v6]:PORT`) into its parts, with a sentence when it is not one."""
    host, sep, port = address.rpartition(":")
    if not sep and default_port is not None:
        return address, default_port
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not HOST:PORT (for example 192.168.1.10:7070)")
    return host, int(port)


def find_token(text: str | None, path: str | None) -> auth.JoinToken:
    """The token from --token, --token-file, $GPUDECK_TOKEN, $GPUDECK_TOKEN_FILE, or the local coordinator."""
    from gpudeck.protocol import auth  # TLS and hashing: for the commands that connect, not for every import

    text = text or os.environ.get("GPUDECK_TOKEN")
    path = path or os.environ.get("GPUDECK_TOKEN_FILE")
    if text or path:
        return auth.read_token_text(text, path)
    local = coordinator_dir() / auth.TOKEN_FILE
    if local.exists():
        return auth.read_token_text(path=str(local))
    raise auth.TokenError(
        "no join token: pass --token or --token-file, or set GPUDECK_TOKEN "
        "(print it with `gpudeck token` on the coordinator's machine)"
    )
