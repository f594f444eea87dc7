"""Job environments built with uv from a requirements file, once per node for each distinct one.

An environment is keyed by the content of its files, the Python version and the torch the agent
has, so an unchanged requirements file on a later job reuses it at once. It is built in place under a
lock and marked ready only when uv succeeded, so a job never sees a half-built one, and two jobs that
want the same one at the same time build it once. Unless the files name torch themselves, uv is told
never to install it: every environment uses the agent's torch (and gpudeck), through the overlay
(`gpudeck.agent.overlay`), instead of downloading gigabytes for each.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import os
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from gpudeck.config import ENVIRONMENTS_KEPT

if sys.version_info >= (3, 11):
    import tomllib
else:  # the agent runs on 3.10 too; tomllib is tomli, adopted into the standard library in 3.11
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]  # tomli is installed only on 3.10

# An override whose marker is never true: uv leaves torch out of the environment entirely.
_NO_TORCH = 'torch ; python_version < "0"\n'
_TORCH = re.compile(r"^\s*torch\s*($|[=<>!~;\[ @])", re.IGNORECASE)


class BuildFailed(Exception):
    """uv could not build the environment; the text is uv's own error, for the job's reason."""


@dataclass(frozen=True)
class Environment:
    key: str
    python: str  # the environment's interpreter
    bin: str  # its scripts folder, first on the job's PATH
    built_now: bool


def uv_binary() -> str | None:
    try:
        from uv import find_uv_bin

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        return shutil.which("uv")


def agent_torch() -> str:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def environment_key(files: dict[str, bytes]) -> str:
    digest = hashlib.sha256(b"gpudeck environment 1\0")
    digest.update(f"{sys.version}\0{agent_torch()}\0".encode())
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return digest.hexdigest()[:32]


def names_torch(files: dict[str, bytes], exported: str = "") -> bool:
    """Whether the requirements ask for torch by name (then uv installs the torch they ask for)."""
    lines = exported.splitlines()
    if "requirements.txt" in files:
        lines += files["requirements.txt"].decode(errors="replace").splitlines()
    if "pyproject.toml" in files and "uv.lock" not in files:
        try:
            lines += tomllib.loads(files["pyproject.toml"].decode(errors="replace")).get("project", {}).get(
                "dependencies", [])
        except tomllib.TOMLDecodeError:
            pass  # uv says what is wrong with it
    return any(_TORCH.match(line) for line in lines if isinstance(line, str))


class Environments:
    """The environments of this node, at most `keep` of them: beyond that the least recently used
    that no job of this node uses go."""

    def __init__(self, root: Path, keep: int = ENVIRONMENTS_KEPT) -> None:
        self.root = root
        self.keep = keep
        self._locks: dict[str, asyncio.Lock] = {}
        self._in_use: Counter[str] = Counter()

    async def get(self, files: dict[str, bytes], log: IO[bytes]) -> Environment:
        """The ready environment for these files, building it first if this node has none; in use
        until `release`d."""
        key = environment_key(files)
        home, ready = self.root / key, self.root / f"{key}.ready"
        self._in_use[key] += 1
        try:
            async with self._locks.setdefault(key, asyncio.Lock()):
                built_now = not ready.exists()
                if built_now:
                    await self._build(files, home, log)
                    ready.write_text(", ".join(sorted(files)) + "\n")
                else:
                    os.utime(ready)
                    log.write(f"gpudeck: using the environment built earlier on this node for these "
                              f"{' and '.join(sorted(files))} ({home})\n".encode())
        except BaseException:
            self.release(key)
            raise
        self._prune()
        return Environment(key=key, python=str(home / "bin" / "python"), bin=str(home / "bin"), built_now=built_now)

    def hold(self, key: str) -> None:
        """Mark an environment in use by a job an earlier agent started (see JobRunner.adopt)."""
        if key:
            self._in_use[key] += 1

    def release(self, key: str) -> None:
        if key and self._in_use[key] > 0:
            self._in_use[key] -= 1

    def _prune(self) -> None:
        for files in self.root.glob("*.files"):  # builds that failed: nothing marks them ready
            key = files.name.removesuffix(".files")
            if not (self.root / f"{key}.ready").exists() and not self._in_use[key]:
                shutil.rmtree(self.root / key, ignore_errors=True)
                shutil.rmtree(files, ignore_errors=True)
        ready = sorted(self.root.glob("*.ready"), key=lambda p: p.stat().st_mtime, reverse=True)
        for marker in ready[self.keep:]:
            key = marker.name.removesuffix(".ready")
            if self._in_use[key] == 0 and not self._locks.get(key, asyncio.Lock()).locked():
                marker.unlink(missing_ok=True)  # first: never a ready marker over a half-removed one
                shutil.rmtree(self.root / key, ignore_errors=True)
                shutil.rmtree(self.root / f"{key}.files", ignore_errors=True)

    async def _build(self, files: dict[str, bytes], home: Path, log: IO[bytes]) -> None:
        uv = uv_binary()
        if uv is None:
            raise BuildFailed("uv is not installed for the agent (install gpudeck[train], or `pip install uv`)")
        self.root.mkdir(parents=True, exist_ok=True)
        if home.exists():
            shutil.rmtree(home)  # a build that an earlier agent did not finish
        source = home.with_name(home.name + ".files")
        shutil.rmtree(source, ignore_errors=True)
        source.mkdir(parents=True)
        for name, content in files.items():
            (source / name).write_bytes(content)
        log.write(f"gpudeck: building the environment for {' and '.join(sorted(files))} with uv in {home}\n".encode())
        log.flush()
        await self._uv(log, uv, "venv", "--quiet", "--python", sys.executable, str(home))
        requirements = source / files_to_install(files)
        exported = ""
        if "uv.lock" in files:
            requirements = source / "exported.txt"
            await self._uv(log, uv, "export", "--quiet", "--frozen", "--no-hashes", "--no-emit-project",
                           "--format", "requirements-txt", "--project", str(source), "-o", str(requirements))
            exported = requirements.read_text(errors="replace")
        install = ["pip", "install", "--python", str(home / "bin" / "python"), "-r", str(requirements)]
        if not names_torch(files, exported):
            (source / "no-torch.txt").write_text(_NO_TORCH)
            install += ["--override", str(source / "no-torch.txt")]
        await self._uv(log, uv, *install)

    @staticmethod
    async def _uv(log: IO[bytes], uv: str, *args: str) -> None:
        env = dict(os.environ, UV_NO_PROGRESS="1", NO_COLOR="1")
        process = await asyncio.create_subprocess_exec(uv, *args, stdin=asyncio.subprocess.DEVNULL,
                                                       stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                                                       env=env)
        try:
            output, _ = await process.communicate()
        except asyncio.CancelledError:
            process.kill()  # the job was cancelled: the half-built environment is never marked ready
            await process.wait()
            raise
        log.write(output)
        log.flush()
        if process.returncode != 0:
            lines = [line.strip() for line in output.decode(errors="replace").splitlines() if line.strip()]
            raise BuildFailed(" ".join(lines[-4:])[:400] or f"uv {args[0]} exited with code {process.returncode}")


def files_to_install(files: dict[str, bytes]) -> str:
    return "requirements.txt" if "requirements.txt" in files else "pyproject.toml"
