"""The design's import boundaries, checked on the source so a stray import fails CI, not a user.

gpudeck/tui and gpudeck/agent import only the shared kernel (gpudeck.*, not each other or the coordinator);
the coordinator never imports torch or textual; train imports none of the other parts. Each part's
`ruff.toml` states its rules (ruff reports a stray import in an editor and in CI); this test reads
the same files, so the suite checks them too. The composition root (the package gpudeck/cli/, the
command line, which composes the parts) is exempt there, as a package.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading the parts' ruff.toml needs Python 3.11")

ROOT = Path(__file__).resolve().parent.parent
# The shared kernel (gpudeck/ itself and gpudeck/protocol/) and the four parts in folders of their own.
PARTS = ("gpudeck", "gpudeck/agent", "gpudeck/coordinator", "gpudeck/train", "gpudeck/tui")


def _part_rules(folder: str) -> dict:
    return tomllib.loads((ROOT / folder / "ruff.toml").read_text())["lint"]


FORBIDDEN = {folder: tuple(_part_rules(folder)["flake8-tidy-imports"]["banned-api"]) for folder in PARTS}
# The composition root: the command line's package, the one place that may import every part.
COMPOSITION_ROOT = ROOT / "gpudeck" / "cli"
EXEMPT = {pattern for pattern, codes in _part_rules("gpudeck")["per-file-ignores"].items() if "TID251" in codes}


def imported_modules(path: Path, names_too: bool = False) -> set[str]:
    """What a module imports, wherever the import is (inside a function, under TYPE_CHECKING);
    `names_too`: with each `from X import name` as `X.name`, which may be a submodule."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if names_too:
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _sources(folder: str) -> list[Path]:
    """The part's modules: a part's whole folder; the kernel's, less the parts and the composition root."""
    files = sorted((ROOT / folder).rglob("*.py"))
    if folder == "gpudeck":
        inner = [ROOT / part for part in PARTS if part != folder] + [COMPOSITION_ROOT]
        files = [f for f in files if not any(f.is_relative_to(part) for part in inner)]
    return files


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_parts_import_only_what_the_design_allows(folder):
    offences = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in _sources(folder)
        for name in imported_modules(path)
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[folder])
    ]
    assert not offences, "\n".join(offences)


def test_only_the_composition_root_may_import_every_part():
    """An exemption added to gpudeck/ruff.toml for convenience would silently open a boundary: the one
    exemption is the composition root's package, gpudeck/cli/."""
    assert EXEMPT == {"cli/**"}


def test_the_checker_sees_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import torch\nfrom gpudeck.coordinator import store\n")
    assert imported_modules(sample) == {"torch", "gpudeck.coordinator"}


def test_a_client_command_loads_no_wire_types_of_the_nodes():
    """The messages between agents and the coordinator, and their payloads, were a seventh of every
    command's start; a client never receives them, so what a command imports leaves them out."""
    code = ("import sys, gpudeck.cli, gpudeck.client, gpudeck.upload, gpudeck.protocol.session; "
            "gpudeck.cli.build_parser(); "  # every command's module (gpudeck.cli alone loads only the registry)
            "print(' '.join(m for m in ('gpudeck.protocol.node_messages', 'gpudeck.protocol.payloads') "
            "if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == []


def test_submit_runs_without_asyncio():
    """A shell loop of submits is bound by the command's start, and asyncio's import and loop were a
    sixth of it (issue 25): what `gpudeck submit` imports to connect and ship a project leaves asyncio out."""
    code = ("import sys, gpudeck.cli, gpudeck.client, gpudeck.upload, gpudeck.protocol.blocking; "
            "gpudeck.cli.build_parser(); "  # every command's module, submit's among them
            "print('asyncio' in sys.modules)")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "False"


def _module_of(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(folder: Path) -> dict[str, set[str]]:
    """Each module of `folder` and the modules of `folder` it imports (its own packages left out: a
    module's package is imported before the module, whatever it says)."""
    modules = {_module_of(path, folder.parent): path for path in sorted(folder.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = set()
        for imported in imported_modules(path, names_too=True):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                graph[name].add(imported)
    return graph


def a_circle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle of the graph, as the modules along it; [] for none."""
    done: set[str] = set()

    def walk(module: str, path: list[str]) -> list[str]:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return []
        for imported in sorted(graph[module]):
            circle = walk(imported, [*path, module])
            if circle:
                return circle
        done.add(module)
        return []

    for module in sorted(graph):
        circle = walk(module, [])
        if circle:
            return circle
    return []


def test_no_module_imports_itself_through_others():
    """Modules import in one direction (issue 26: cli.py and local.py imported each other, the dashboard's
    app and its login screen, a rank's wrapper and its counting hook): a circle makes the order of
    imports matter and the two modules one."""
    circle = a_circle(import_graph(ROOT / "gpudeck"))
    assert not circle, " imports ".join(circle)


def test_the_circle_finder_finds_circles(tmp_path):
    package = tmp_path / "gpudeck"
    (package / "part").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "part" / "__init__.py").write_text("from gpudeck.part import b\n")
    (package / "part" / "a.py").write_text("def late():\n    from gpudeck.part.b import thing\n")
    (package / "part" / "b.py").write_text("from gpudeck.part import a\n")
    (package / "c.py").write_text("import gpudeck.part.b\n")
    graph = import_graph(package)
    assert graph["gpudeck.part.a"] == {"gpudeck.part.b"} and graph["gpudeck.c"] == {"gpudeck.part.b"}
    circle = a_circle(graph)
    assert circle[0] == circle[-1] and sorted(circle[1:]) == ["gpudeck.part.a", "gpudeck.part.b"], circle
    (package / "part" / "a.py").write_text("")
    assert a_circle(import_graph(package)) == []
