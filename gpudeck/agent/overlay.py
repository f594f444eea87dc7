"""The folder put first on every job process's PYTHONPATH, holding a `sitecustomize` module.

It lets an interpreter that is not the agent's (a uv-built environment, `--python`, `--venv`) import
the agent's torch and gpudeck after its own packages, where the Python version is the same: so the
counting wrapper and the built-in workloads run there, and an environment need not install torch. In
a command job it also arms the counting of ranks the job's own launcher starts (gpudeck.train.autocount).
A `sitecustomize` the interpreter had of its own is still imported after this one.
"""

from __future__ import annotations

import os
import site
import sys
from pathlib import Path

SITE_DIRS = "GPUDECK_AGENT_SITE"
PYTHON_VERSION = "GPUDECK_AGENT_PYTHON"
AUTOCOUNT = "GPUDECK_AUTOCOUNT"  # the same name as gpudeck.train.autocount.ENABLED (no import of train here)

_SITECUSTOMIZE = '''"""gpudeck's start-up hook for job processes (written by the agent; see gpudeck.agent.overlay)."""
import os as _os
import sys as _sys


def _gpudeck_overlay():
    here = _os.path.dirname(_os.path.abspath(__file__))
    if _os.environ.get("%(version)s") == "%%d.%%d" %% _sys.version_info[:2]:
        import site
        for folder in _os.environ.get("%(dirs)s", "").split(_os.pathsep):
            if folder:
                site.addsitedir(folder)
    if _os.environ.get("%(autocount)s") and "RANK" in _os.environ:
        try:
            from gpudeck.train import autocount
            autocount.arm()
        except Exception as exc:  # counting is an extra: it never stops a rank
            _sys.stderr.write("gpudeck: traffic of this rank is not counted (%%s)\\n" %% exc)
    # The sitecustomize this one hides, if the interpreter has one.
    me = _sys.modules.pop(__name__)
    saved = _sys.path[:]
    _sys.path[:] = [p for p in saved if _os.path.abspath(p or ".") != here]
    try:
        import sitecustomize  # noqa: F401
    except ImportError:
        _sys.modules[__name__] = me
    finally:
        _sys.path[:] = saved


_gpudeck_overlay()
''' % {"version": PYTHON_VERSION, "dirs": SITE_DIRS, "autocount": AUTOCOUNT}


def write_overlay(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    return folder


def overlay_env(folder: Path, env: dict[str, str]) -> dict[str, str]:
    """The variables that put the overlay in force for a job's processes."""
    paths = [p for p in site.getsitepackages() if os.path.isdir(p)]
    return {
        "PYTHONPATH": os.pathsep.join(p for p in (str(folder), env.get("PYTHONPATH", "")) if p),
        SITE_DIRS: os.pathsep.join(paths),
        PYTHON_VERSION: "%d.%d" % sys.version_info[:2],
    }
