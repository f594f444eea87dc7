"""Running a job's commands in a container (`submit --image`), with podman or docker, whichever
works on this node (podman first: it needs no daemon).

The container shares the node's network (the rendezvous and gloo/NCCL ports are the node's) and IPC,
sees the attempt's working copy at the same path, and gets the job's variables, the marker among
them, so a cancel finds its processes as any rank's. GPUs go in through CDI with podman
(`--device nvidia.com/gpu=N`) and `--gpus` with docker; simulated GPUs pass nothing.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpudeck.agent.procs import run_bounded

if TYPE_CHECKING:
    from gpudeck.protocol.node_messages import Launch

RUNTIMES = ("podman", "docker")
PROBE_TIMEOUT = 10.0


@dataclass(frozen=True)
class Runtime:
    name: str  # podman or docker
    path: str


async def find_runtime() -> tuple[Runtime | None, str]:
    """The first runtime that answers, or None and why none does, in words."""
    why = []
    for name in RUNTIMES:
        path = shutil.which(name)
        if path is None:
            why.append(f"{name} is not installed")
            continue
        code = await _run_bounded([path, "info"])
        if code == 0:
            return Runtime(name, path), ""
        why.append(f"{name} is installed but `{name} info` fails"
                   + (" (is its daemon running?)" if name == "docker" else ""))
    return None, "; ".join(why)


def container_command(runtime: Runtime, image: str, name: str, inner: list[str], cwd: str, mounts: list[str],
                      env_names: list[str], gpus: list[int], simulated: bool) -> list[str]:
    """The runtime's command line that runs `inner` in `image` (env values come from the caller's
    environment: only the names are on the command line, so no value shows in `ps`)."""
    command = [runtime.path, "run", "--rm", "--init", "--name", name, "--network", "host", "--ipc", "host",
               "--workdir", cwd]
    if os.getuid() != 0:
        # The job's files in the working copy and its outputs stay the agent's, so it can keep and
        # remove them: docker runs as the daemon's root otherwise, podman maps to the agent's user.
        command += ["--user", f"{os.getuid()}:{os.getgid()}"] if runtime.name == "docker" else ["--userns", "keep-id"]
    for folder in mounts:
        command += ["--volume", f"{folder}:{folder}"]
    for key in env_names:
        command += ["--env", key]
    if gpus and not simulated:
        if runtime.name == "podman":
            command += [arg for index in gpus for arg in ("--device", f"nvidia.com/gpu={index}")]
        else:
            command += ["--gpus", f"device={','.join(map(str, gpus))}"]
    return [*command, image, *inner]


def container_name(order: "Launch", node: str) -> str:
    return f"gpudeck-{order.job}-{order.attempt}-{order.node_rank}-{node}"


async def _run_bounded(command: list[str]) -> int:
    """A runtime command's exit code, -1 when it could not start or ran past PROBE_TIMEOUT."""
    try:
        code = await run_bounded(command, PROBE_TIMEOUT)
    except OSError:
        return -1
    return -1 if code is None else code


async def stop_container(container: list[str]) -> None:
    """Ask the runtime to stop the job's container: a daemon's containers may run as another user,
    out of reach of the agent's signals."""
    if container:
        runtime, name = container
        await _run_bounded([runtime, "stop", "--time", "5", name])  # best effort: the marker's kill follows


async def remove_container(container: list[str]) -> None:
    if container:
        runtime, name = container
        await _run_bounded([runtime, "rm", "--force", name])
