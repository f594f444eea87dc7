"""Running a job's commands in a container (`submit --image`), with podman or docker, whichever
works on this node (podman first: it needs no daemon).

The container shares the node's network (the rendezvous and gloo/NCCL ports are the node's) and IPC,
sees the attempt's working copy at the same path, and gets the job's variables, the marker among
them, so a cancel finds its processes as any rank's. GPUs go in through CDI with podman
(`--device nvidia.com/gpu=N`) and `--gpus` with docker; simulated GPUs pass nothing.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass

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
        try:
            probe = await asyncio.create_subprocess_exec(path, "info", stdin=asyncio.subprocess.DEVNULL,
                                                         stdout=asyncio.subprocess.DEVNULL,
                                                         stderr=asyncio.subprocess.DEVNULL)
            code = await asyncio.wait_for(probe.wait(), PROBE_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            code = -1
        if code == 0:
            return Runtime(name, path), ""
        why.append(f"{name} is installed but `{name} info` fails" + (" (is its daemon running?)" if name == "docker" else ""))
    return None, "; ".join(why)


def container_command(runtime: Runtime, image: str, name: str, inner: list[str], cwd: str, mounts: list[str],
                      env_names: list[str], gpus: list[int], simulated: bool) -> list[str]:
    """The runtime's command line that runs `inner` in `image` (env values come from the caller's
    environment: only the names are on the command line, so no value shows in `ps`)."""
    command = [runtime.path, "run", "--rm", "--init", "--name", name, "--network", "host", "--ipc", "host",
               "--workdir", cwd]
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
