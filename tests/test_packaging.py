"""Packaging: the wheel and the sdist carry everything gpudeck needs at run time; packaging/install-node.sh
installs a node into a staging root (--root) and refuses what it must; the installed gpudeck joins a
coordinator and runs a job, as its systemd unit would run it.

Nothing here touches the machine's /etc, /opt, /var or systemd: every install goes into a temporary
root. One installation (a real venv with gpudeck[train] and the local CPU torch) is shared by the
tests of this module that need it; they run in file order, and the uninstall comes last.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11")

from gpudeck import __version__  # noqa: E402 - after the importorskip above
from gpudeck.protocol import auth  # noqa: E402 - after the importorskip above
from tests.cluster import Cluster, free_port, wait_until  # noqa: E402 - after the importorskip above

REPO = Path(__file__).resolve().parent.parent
PACKAGING = REPO / "packaging"
INSTALLER = PACKAGING / "install-node.sh"
SCRIPTS = REPO / "tests" / "scripts"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
TORCH_SPEC = "torch==2.13.0"  # the local CPU build (FIELD-NOTES): never pull a CUDA build in a test
SERVICE_UID = 4242  # the gpudeck user of the staging root's /etc/passwd
SETPRIV = shutil.which("setpriv")
NOT_OURS = {"etc/passwd", "etc/group"}  # the staging root's user database, written by the test


def _open_to_others(path: Path) -> bool:
    """Can a user other than root (the service user) reach and run this file?"""
    path = path.resolve()
    return all(part.stat().st_mode & stat.S_IXOTH for part in (path, *path.parents))


def _node_python() -> str:
    """A Python like a node's: system-wide, so that the service user can run it, and of this test's
    version, so that the local torch wheel fits. Else this test's own."""
    code = ("import sys, venv, ensurepip; print(sys.version_info[:2] == tuple(map(int, sys.argv[1].split('.'))) "
            "and sys._base_executable)")
    for candidate in ("/usr/bin/python3", sys.executable):
        try:
            probe = subprocess.run([candidate, "-I", "-c", code, "%d.%d" % sys.version_info[:2]], capture_output=True,
                                   text=True, timeout=30)
        except OSError:
            continue
        base = probe.stdout.strip()
        if probe.returncode == 0 and base not in ("", "False") and _open_to_others(Path(base)):
            return candidate
    return sys.executable


NODE_PYTHON = _node_python()


# --- building ---------------------------------------------------------------------------------------


def _source_files(tree: Path) -> dict[str, Path]:
    """Every file of the packages in tree, by the path it must have in the wheel: all but the parts'
    ruff.toml, which configure the linter in a checkout and mean nothing in an install."""
    files: dict[str, Path] = {}
    for package in PYPROJECT["tool"]["setuptools"]["packages"]:
        for path in (tree / package.replace(".", "/")).iterdir():
            if path.is_file() and path.suffix != ".pyc" and path.name != "ruff.toml":
                files[path.relative_to(tree).as_posix()] = path
    return files


def _data_files(tree: Path) -> dict[str, Path]:
    """What the wheel carries for the installer: install-node.sh, the units, the packaging README."""
    packaging = tree / "packaging"
    files = {"share/gpudeck/install-node.sh": packaging / "install-node.sh",
             "share/gpudeck/README.md": packaging / "README.md"}
    for unit in sorted((packaging / "systemd").iterdir()):
        files[f"share/gpudeck/systemd/{unit.name}"] = unit
    return files


def _copy_tree(dest: Path) -> Path:
    """The project's packaging inputs, copied so that a build never writes into the working tree."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    folders = {package.split(".")[0] for package in PYPROJECT["tool"]["setuptools"]["packages"]}
    for folder in sorted(folders | {"packaging"}):
        shutil.copytree(REPO / folder, dest / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    return dest


def _build(source: Path, out: Path, kind: str) -> Path:
    """Call the PEP 517 backend directly: no network and no build isolation needed."""
    code = f"import sys; from setuptools import build_meta; print(build_meta.build_{kind}(sys.argv[1]))"
    result = subprocess.run([sys.executable, "-c", code, str(out)], cwd=source, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / result.stdout.strip().splitlines()[-1]


@dataclass
class Dist:
    wheel: Path
    sdist: Path
    work: Path

    @property
    def source(self) -> Path:
        """The copy of the working tree the wheel and sdist were built from."""
        return self.work / "src"


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    work = tmp_path_factory.mktemp("dist")
    source = _copy_tree(work / "src")
    out = work / "dist"
    out.mkdir()
    return Dist(wheel=_build(source, out, "wheel"), sdist=_build(source, out, "sdist"), work=work)


# --- the installer ----------------------------------------------------------------------------------


def install(*args: str, stdin: str = "", timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUDECK_")}
    return subprocess.run(["bash", str(INSTALLER), *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=timeout)


def shell(code: str) -> subprocess.CompletedProcess[str]:
    """Run code with the installer's functions defined (sourced, it runs nothing itself)."""
    return subprocess.run(["bash", "-c", f'source "{INSTALLER}"; {code}'], capture_output=True, text=True,
                          timeout=60)


def snapshot(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """Mode, owner, mtime and content of every file and link outside the venv, and of gpudeck's own
    files inside it."""
    seen: dict[str, tuple[int, int, int, str]] = {}
    venv = root / "opt/gpudeck/venv"
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        if path.is_relative_to(venv) and "site-packages/gpudeck" not in relative and "share/gpudeck" not in relative:
            continue
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            content = "-> " + os.readlink(path)
        elif stat.S_ISREG(info.st_mode):
            content = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            content = "dir"
        seen[relative] = (info.st_mode, info.st_uid, info.st_mtime_ns, content)
    return seen


def unit_settings(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as {section: {key: [values]}}, comments left out."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


@dataclass
class Installed:
    root: Path
    first: subprocess.CompletedProcess[str]
    coordinator: Cluster
    dist: Dist
    token: str

    @property
    def venv(self) -> Path:
        return self.root / "opt/gpudeck/venv"

    def args(self, *more: str) -> list[str]:
        """The flags every run of the installer on this root takes."""
        return ["--root", str(self.root), "--from", str(self.dist.wheel), "--torch-spec", TORCH_SPEC,
                "--python", NODE_PYTHON, *more]


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A coordinator from the repo's venv on loopback: the cluster the installed node joins."""
    cluster = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start_coordinator()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def installed(dist: Dist, coordinator: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    # Outside pytest's 0700 temp dirs, so that the service user can reach the venv, as on a machine.
    root = Path(tempfile.mkdtemp(prefix="gpudeck-root-"))
    try:
        root.chmod(0o755)
        (root / "etc").mkdir()
        (root / "etc/passwd").write_text(f"root:x:0:0::/root:/bin/sh\ngpudeck:x:{SERVICE_UID}:{SERVICE_UID}:"
                                         "gpudeck:/var/lib/gpudeck:/usr/sbin/nologin\n")
        (root / "etc/group").write_text(f"root:x:0:\nvideo:x:44:gpudeck\ngpudeck:x:{SERVICE_UID}:\n")
        token_file = tmp_path_factory.mktemp("token") / "token"
        token_file.write_text(coordinator.token + "\n")
        state = Installed(root, subprocess.CompletedProcess([], 0), coordinator, dist, coordinator.token)
        state.first = install(*state.args("--coordinator", f"127.0.0.1:{coordinator.port}",
                                          "--token-file", str(token_file)))
        assert state.first.returncode == 0, state.first.stdout[-3000:] + state.first.stderr[-3000:]
        yield state
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- the wheel and the sdist ------------------------------------------------------------------------


def test_wheel_carries_every_file_of_the_packages_and_the_installer(dist: Dist) -> None:
    with zipfile.ZipFile(dist.wheel) as wheel:
        names = set(wheel.namelist())
        data_prefix = f"gpudeck-{__version__}.data/data/"
        missing = [wanted for wanted in _source_files(dist.source) if wanted not in names]
        assert not missing, (f"the wheel lacks {missing}: add their package to `packages` or the files to "
                             "package-data in pyproject.toml")
        for wanted, source in _data_files(dist.source).items():
            assert wheel.read(data_prefix + wanted) == source.read_bytes(), wanted
        installer_mode = wheel.getinfo(data_prefix + "share/gpudeck/install-node.sh").external_attr >> 16
        assert installer_mode & 0o111, "install-node.sh lost its executable bit in the wheel"
        metadata = wheel.read(f"gpudeck-{__version__}.dist-info/METADATA").decode()
    assert f"Version: {PYPROJECT['project']['version']}" in metadata
    assert PYPROJECT["project"]["version"] == __version__, "pyproject.toml and gpudeck.__version__ disagree"
    assert "Provides-Extra: train" in metadata


def test_sdist_carries_everything_and_builds_the_same_wheel(dist: Dist) -> None:
    with tarfile.open(dist.sdist) as sdist:
        prefix = f"gpudeck-{__version__}/"
        names = {name.removeprefix(prefix) for name in sdist.getnames()}
        unpacked = dist.work / "from-sdist"
        sdist.extractall(unpacked, filter="data")
    files = (*_source_files(dist.source).values(), *_data_files(dist.source).values())
    for wanted in [str(p.relative_to(dist.source)) for p in files]:
        assert wanted in names, f"the sdist lacks {wanted}"
    out = dist.work / "from-sdist-dist"
    out.mkdir()
    rebuilt = _build(unpacked / prefix, out, "wheel")
    with zipfile.ZipFile(rebuilt) as again, zipfile.ZipFile(dist.wheel) as first:
        assert sorted(again.namelist()) == sorted(first.namelist())


def test_installer_token_pattern_is_the_one_gpudeck_parses() -> None:
    match = re.search(r"^TOKEN_PATTERN='(.*)'$", INSTALLER.read_text(), re.M)
    assert match, "TOKEN_PATTERN is gone from install-node.sh"
    assert match.group(1) == auth._TOKEN_RE.pattern.replace("(", "").replace(")", "")


# --- refusals: each one before anything is written --------------------------------------------------


def _refused(result: subprocess.CompletedProcess[str], root: Path, words: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    message = result.stderr.strip()
    assert message.startswith("install-node.sh: ") and "\n" not in message, message
    assert words in message, message
    assert not root.exists(), f"a refused run wrote {sorted(p.name for p in root.rglob('*'))}"


def test_refuses_unless_root(tmp_path: Path) -> None:
    refused = shell("require_root 1000")
    assert refused.returncode == 1
    assert refused.stderr.strip() == ("install-node.sh: this installer must run as root, because it creates the "
                                      "gpudeck user and writes /opt/gpudeck, /etc/gpudeck and systemd units: run it "
                                      "again with sudo.")
    assert shell("require_root 0 && echo passed").stdout.strip() == "passed"
    if SETPRIV is None or os.geteuid() != 0:
        return  # the function is the check; running the script as another user needs root and setpriv
    root = tmp_path / "root"
    result = subprocess.run([SETPRIV, "--reuid=65534", "--regid=65534", "--clear-groups", "bash", str(INSTALLER),
                             "--root", str(root), "--token-file", "/nonexistent"], capture_output=True, text=True,
                            timeout=60, cwd="/")
    _refused(result, root, "must run as root")


VALID = "gd1." + "ab" * 32 + "." + "s" * 43


@pytest.mark.parametrize("how, expected", [
    ("nothing", "no join token: give --token-file F, or the token on standard input"),
    ("stdin garbage", "the token on standard input is not a gpudeck join token"),
    ("file garbage", "is not a gpudeck join token (expected gd1.<64 hex digits>.<secret>"),
    ("short secret", "is not a gpudeck join token"),
    ("empty file", "is empty"),
    ("missing file", "cannot read the token file"),
])
def test_refuses_a_missing_or_malformed_token(tmp_path: Path, how: str, expected: str) -> None:
    root = tmp_path / "root"
    token_file = tmp_path / "token"
    args, stdin = ["--root", str(root)], ""
    if how == "stdin garbage":
        stdin = "not-a-token\n"
    elif how in ("file garbage", "short secret", "empty file"):
        token_file.write_text({"file garbage": "gd1.xyz.secret", "short secret": VALID[:-20],
                               "empty file": "\n"}[how])
        args += ["--token-file", str(token_file)]
    elif how == "missing file":
        args += ["--token-file", str(tmp_path / "nope")]
    _refused(install(*args, stdin=stdin), root, expected)


def test_refuses_a_coordinator_whose_certificate_is_not_the_pinned_one(coordinator: Cluster, tmp_path: Path) -> None:
    other = auth.JoinToken(fingerprint="0" * 64, secret=auth.JoinToken.parse(coordinator.token).secret)
    root = tmp_path / "root"
    result = install("--root", str(root), "--coordinator", f"127.0.0.1:{coordinator.port}",
                     "--python", sys.executable, stdin=str(other))
    _refused(result, root, "other than the one the token pins")
    assert "Nothing was installed" in result.stderr


def test_an_unreachable_coordinator_is_a_warning(tmp_path: Path) -> None:
    closed = free_port()
    result = shell(f'PYTHON="{sys.executable}" WORK="{tmp_path}"; check_pin 127.0.0.1 {closed} {VALID}; echo "rc=$?"')
    assert result.stdout.strip().endswith("rc=0"), result.stderr
    assert f"warning: could not reach the coordinator at 127.0.0.1:{closed}" in result.stdout


SYSTEMCTL_STUB = """
systemd_running() { true; }
systemctl() {
    echo "systemctl $*" >> "$CALLS"
    case "$1" in is-active) [ -n "${ACTIVE:-}" ] && [[ " $ACTIVE " == *" ${@: -1} "* ]];; *) true;; esac
}
"""


@pytest.mark.parametrize("active, changes, expected", [
    ("", "", ["daemon-reload", "enable --quiet gpudeck-agent.service", "is-active --quiet gpudeck-agent.service",
              "start gpudeck-agent.service"]),
    ("gpudeck-agent.service", "", ["daemon-reload", "enable --quiet gpudeck-agent.service",
                                   "is-active --quiet gpudeck-agent.service"]),
    ("gpudeck-agent.service gpudeck-coordinator.service", "upgraded",
     ["daemon-reload", "enable --quiet gpudeck-agent.service", "is-active --quiet gpudeck-agent.service",
      "restart gpudeck-agent.service", "is-active --quiet gpudeck-coordinator.service",
      "restart gpudeck-coordinator.service"]),
])
def test_with_systemd_it_enables_starts_and_restarts_only_on_change(tmp_path: Path, active: str, changes: str,
                                                                     expected: list[str]) -> None:
    """The branch for a machine where systemd runs, with systemctl stubbed (the test machine has none)."""
    calls = tmp_path / "calls"
    code = (f'{SYSTEMCTL_STUB} CALLS="{calls}" ACTIVE="{active}" ROOT="" ROLE=agent; '
            f'CHANGES=({changes}); start_service; echo "started=$STARTED"')
    result = shell(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("started=1")
    assert [line.removeprefix("systemctl ") for line in calls.read_text().splitlines()] == expected


def test_with_systemd_uninstall_ends_the_agent_with_its_jobs(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    units = tmp_path / "etc/systemd/system"
    units.mkdir(parents=True)
    (units / "gpudeck-agent.service").write_text("[Service]\n")
    # The real paths, rebased: uninstall must only touch what the stub and tmp_path hold.
    code = (f'{SYSTEMCTL_STUB} sleep() {{ :; }}; CALLS="{calls}" ACTIVE="gpudeck-agent.service" ROOT="" '
            f'UNIT_DIR="{units}" ETC_DIR="{tmp_path}/etc/gpudeck" OPT_DIR="{tmp_path}/opt/gpudeck" '
            f'STATE_DIR="{tmp_path}/var/lib/gpudeck" BIN_LINK="{tmp_path}/bin/gpudeck" '
            f'SYSUSERS_FILE="{tmp_path}/sysusers" TMPFILES_FILE="{tmp_path}/tmpfiles" '
            'SERVICE_USER=gpudeck-test-absent; '
            'uninstall')
    result = shell(code)
    assert result.returncode == 0, result.stderr
    assert [line.removeprefix("systemctl ") for line in calls.read_text().splitlines()] == [
        "is-active --quiet gpudeck-agent.service", "kill gpudeck-agent.service",
        "disable --now --quiet gpudeck-agent.service", "daemon-reload"]
    assert not (units / "gpudeck-agent.service").exists()


@pytest.mark.parametrize("args", [["--bogus"], ["--coordinator-node", "--token-file", "t"], ["--port", "7070"],
                                  ["--coordinator", "host:notaport"]])
def test_usage_errors_exit_2(tmp_path: Path, args: list[str]) -> None:
    root = tmp_path / "root"
    result = install("--root", str(root), *args, stdin=VALID)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "(see --help)" in result.stderr and not root.exists()


def test_help_names_every_option() -> None:
    result = install("--help")
    assert result.returncode == 0
    for option in ("--token-file", "--coordinator", "--coordinator-node", "--port", "--from", "--torch-spec",
                   "--python", "--root", "--uninstall"):
        assert option in result.stdout


# --- an installation into a staging root (shared by the tests below, in this order) -----------------


@pytest.mark.slow
def test_installs_files_with_their_modes_owners_and_units(installed: Installed) -> None:
    root = installed.root
    print(installed.first.stdout)
    assert f"checked: the coordinator at 127.0.0.1:{installed.coordinator.port} presents the certificate the " \
           "token pins" in installed.first.stdout

    def mode_owner(relative: str) -> tuple[str, int, int]:
        info = (root / relative).lstat()
        return oct(stat.S_IMODE(info.st_mode)), info.st_uid, info.st_gid

    # The environment: a working gpudeck whose scripts name the final path, as in the image.
    version = subprocess.run([str(installed.venv / "bin/python"), "-I", "-m", "gpudeck", "--version"],
                             capture_output=True, text=True, timeout=60)
    assert version.stdout.strip() == f"gpudeck {__version__}"
    assert (installed.venv / "bin/gpudeck").read_text().splitlines()[0] == "#!/opt/gpudeck/venv/bin/python"
    assert os.readlink(root / "usr/local/bin/gpudeck") == "/opt/gpudeck/venv/bin/gpudeck"

    # Settings and the token.
    assert mode_owner("etc/gpudeck") == ("0o755", 0, 0)
    assert mode_owner("etc/gpudeck/token") == ("0o600", SERVICE_UID, SERVICE_UID)
    assert (root / "etc/gpudeck/token").read_text().strip() == installed.token
    assert mode_owner("etc/gpudeck/agent.env") == ("0o644", 0, 0)
    settings = env_file(root / "etc/gpudeck/agent.env")
    assert settings == {"GPUDECK_COORDINATOR": f"127.0.0.1:{installed.coordinator.port}",
                        "GPUDECK_TOKEN_FILE": "/etc/gpudeck/token", "GPUDECK_AGENT_ARGS": ""}
    assert mode_owner("var/lib/gpudeck") == ("0o750", SERVICE_UID, SERVICE_UID)
    assert mode_owner("var/lib/gpudeck/agent") == ("0o750", SERVICE_UID, SERVICE_UID)

    # The units come from the installed package, unchanged; enabled for boot.
    unit_path = root / "etc/systemd/system/gpudeck-agent.service"
    assert unit_path.read_bytes() == (PACKAGING / "systemd/gpudeck-agent.service").read_bytes()
    assert unit_path.read_bytes() == (installed.venv / "share/gpudeck/systemd/gpudeck-agent.service").read_bytes()
    assert mode_owner("etc/systemd/system/gpudeck-agent.service") == ("0o644", 0, 0)
    assert os.readlink(root / "etc/systemd/system/multi-user.target.wants/gpudeck-agent.service") == \
        "/etc/systemd/system/gpudeck-agent.service"
    assert not (root / "etc/systemd/system/gpudeck-coordinator.service").exists()
    assert (root / "etc/sysusers.d/gpudeck.conf").read_bytes() == (PACKAGING / "systemd/gpudeck.sysusers").read_bytes()
    assert (root / "etc/tmpfiles.d/gpudeck.conf").read_bytes() == (PACKAGING / "systemd/gpudeck.tmpfiles").read_bytes()
    assert "nothing was started" in installed.first.stdout
    private = "is not open to other users, so the gpudeck user cannot run" in installed.first.stdout
    assert private == (not _open_to_others(installed.venv / "bin/python"))


def test_unit_contents() -> None:
    agent = unit_settings(PACKAGING / "systemd/gpudeck-agent.service")
    coordinator = unit_settings(PACKAGING / "systemd/gpudeck-coordinator.service")
    for unit in (agent, coordinator):
        assert ("network-online.target" in unit["Unit"]["After"][0]
                and unit["Unit"]["Wants"] == ["network-online.target"])
        assert unit["Unit"]["StartLimitIntervalSec"] == ["0"]
        service = unit["Service"]
        assert service["User"] == ["gpudeck"] and service["Restart"] == ["on-failure"]
        assert service["RestartSec"] and service["RestartSteps"] and service["RestartMaxDelaySec"]
        assert service["NoNewPrivileges"] == ["yes"]
        assert service["ExecStart"][0].startswith("/opt/gpudeck/venv/bin/gpudeck ")
        assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    service = agent["Service"]
    assert service["EnvironmentFile"] == ["/etc/gpudeck/agent.env"]
    assert service["ExecStart"] == ["/opt/gpudeck/venv/bin/gpudeck agent --state-dir /var/lib/gpudeck/agent "
                                    "$GPUDECK_AGENT_ARGS"]
    assert service["StateDirectory"] == ["gpudeck gpudeck/agent"]
    # The jobs outlive the agent: only the agent's own process is stopped.
    assert service["KillMode"] == ["process"]
    assert service["ProtectSystem"] == ["full"]
    text = (PACKAGING / "systemd/gpudeck-agent.service").read_text()
    for left_out in ("PrivateDevices", "PrivateTmp", "ProtectHome"):
        assert left_out not in service, f"{left_out}= would stop NVML or the jobs"
        assert re.search(rf"^# - {left_out}=: \S", text, re.M), f"say in the unit why {left_out}= is left out"
    assert coordinator["Service"]["EnvironmentFile"] == ["/etc/gpudeck/coordinator.env"]
    assert coordinator["Service"]["ProtectSystem"] == ["strict"] and coordinator["Service"]["PrivateTmp"] == ["yes"]
    assert "KillMode" not in coordinator["Service"]


@pytest.mark.slow
def test_units_pass_systemd_analyze_verify(installed: Installed, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd): the units' syntax is unchecked")
    number = re.search(r"\d+", subprocess.run([analyze, "--version"], capture_output=True, text=True).stdout)
    assert number is not None, "systemd-analyze --version printed no version number"
    version = int(number[0])
    # systemd checks that ExecStart= names an executable: point the units at the staging root's.
    for unit in ("gpudeck-agent.service", "gpudeck-coordinator.service"):
        text = (installed.venv / "share/gpudeck/systemd" / unit).read_text()
        (tmp_path / unit).write_text(text.replace("/opt/gpudeck/", f"{installed.root}/opt/gpudeck/"))
    result = subprocess.run([analyze, "verify", "--man=no", *sorted(str(p) for p in tmp_path.glob("*.service"))],
                            capture_output=True, text=True, timeout=60)
    allowed = re.compile(r"Unknown key '(RestartSteps|RestartMaxDelaySec)'") if version < 254 else None
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if line.strip() and not (allowed and allowed.search(line))]
    assert result.returncode == 0 and not complaints, "\n".join(complaints)


@pytest.mark.slow
def test_a_second_run_changes_nothing(installed: Installed) -> None:
    before = snapshot(installed.root)
    # No token and no --coordinator: both are kept from the first run.
    again = install(*installed.args())
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "nothing to change: already installed and up to date" in again.stdout, again.stdout
    assert "wrote " not in again.stdout and "created " not in again.stdout, again.stdout
    assert snapshot(installed.root) == before


@pytest.mark.slow
def test_a_run_with_a_newer_wheel_upgrades_in_place_and_keeps_the_token(installed: Installed) -> None:
    source = installed.dist.work / "newer-src"
    shutil.copytree(installed.dist.source, source)
    newer = __version__ + ".post1"
    for name in ("pyproject.toml", "gpudeck/__init__.py"):
        path = source / name
        path.write_text(path.read_text().replace(f'"{__version__}"', f'"{newer}"', 1))
    unit = source / "packaging/systemd/gpudeck-agent.service"
    unit.write_text(unit.read_text() + "# upgraded\n")
    out = installed.dist.work / "newer"
    out.mkdir()
    wheel = _build(source, out, "wheel")
    token_before = snapshot(installed.root)["etc/gpudeck/token"]
    result = install("--root", str(installed.root), "--from", str(wheel), "--torch-spec", TORCH_SPEC,
                     "--python", NODE_PYTHON)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"installed gpudeck {newer}" in result.stdout
    assert "wrote /etc/systemd/system/gpudeck-agent.service" in result.stdout
    assert (installed.root / "etc/systemd/system/gpudeck-agent.service").read_text().endswith("# upgraded\n")
    assert "wrote /etc/gpudeck" not in result.stdout
    assert snapshot(installed.root)["etc/gpudeck/token"] == token_before
    version = subprocess.run([str(installed.venv / "bin/python"), "-I", "-m", "gpudeck", "--version"],
                             capture_output=True, text=True, timeout=60)
    assert version.stdout.strip() == f"gpudeck {newer}"


def _runs_as_service_user(installed: Installed) -> bool:
    """As systemd would, unless setpriv is missing or only root can run the venv's Python (the
    installer warns about that)."""
    return SETPRIV is not None and os.geteuid() == 0 and _open_to_others(installed.venv / "bin/python")


def _as_service_user(installed: Installed, command: list[str]) -> list[str]:
    """As systemd runs the unit: the service user, no new privileges."""
    if not _runs_as_service_user(installed):
        return command
    assert SETPRIV is not None  # _runs_as_service_user found it
    return [SETPRIV, f"--reuid={SERVICE_UID}", f"--regid={SERVICE_UID}", "--clear-groups", "--no-new-privs",
            *command]


def _unit_command(installed: Installed, unit: str, env_key: str, env: dict[str, str]) -> list[str]:
    """ExecStart= of an installed unit, with its paths inside the staging root. The venv's scripts name
    the image's path, so its Python runs `-m gpudeck` here."""
    exec_start = unit_settings(installed.root / "etc/systemd/system" / unit)["Service"]["ExecStart"][0]
    words = exec_start.split()
    assert words[0] == "/opt/gpudeck/venv/bin/gpudeck"
    command = [str(installed.venv / "bin/python"), "-m", "gpudeck"]
    for word in words[1:]:
        if word == f"${env_key}":
            command += env.get(env_key, "").split()
        else:
            command.append(f"{installed.root}{word}" if word.startswith("/var/lib/gpudeck") else word)
    return command


def _service_env(installed: Installed, settings: dict[str, str]) -> dict[str, str]:
    home = str(installed.root / "var/lib/gpudeck")
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "GPUDECK_HOME": home, "PYTHONUNBUFFERED": "1"}
    for key, value in settings.items():
        env[key] = f"{installed.root}{value}" if key == "GPUDECK_TOKEN_FILE" else value
    return env


def _stop(process: subprocess.Popen[bytes] | None, jobs: Path | None = None) -> None:
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
    for record in (jobs.glob("*/job.json") if jobs else []):
        try:
            os.killpg(json.loads(record.read_text())["pgid"], signal.SIGKILL)
        except (OSError, ValueError, KeyError):
            pass


@pytest.mark.slow
def test_the_installed_agent_joins_the_coordinator_and_runs_a_job(installed: Installed) -> None:
    settings = env_file(installed.root / "etc/gpudeck/agent.env")
    env = _service_env(installed, settings)
    command = _unit_command(installed, "gpudeck-agent.service", "GPUDECK_AGENT_ARGS", settings)
    command += ["--name", "installed-node", "--simulate-gpus", "1", "--no-mdns"]
    state = installed.root / "var/lib/gpudeck/agent"
    cluster = installed.coordinator
    log_path = cluster.root / "installed-agent.log"
    agent = None
    # Submitted from a directory the service user can read, as from a shared file system.
    workdir = Path(tempfile.mkdtemp(prefix="gpudeck-work-"))
    try:
        workdir.chmod(0o755)
        with open(log_path, "ab") as log:
            agent = subprocess.Popen(_as_service_user(installed, command), env=env, cwd=state, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        node = cluster.wait_nodes("up", 1, timeout=60)[0]
        assert node["name"] == "installed-node"
        result = subprocess.run([sys.executable, "-m", "gpudeck", "submit", "--json", "--coordinator",
                                 f"127.0.0.1:{cluster.port}", "--token", cluster.token, "--gpus", "1",
                                 str(SCRIPTS / "ddp_linear.py"), "--steps", "3"],
                                capture_output=True, text=True, env=cluster.env, cwd=workdir, timeout=60)
        assert result.returncode == 0, result.stderr
        job_id = json.loads(result.stdout)["id"]
        job = cluster.wait_job(job_id, ("succeeded", "failed", "cancelled"), timeout=120)
        logs = cluster.cli("logs", str(job_id), "--launcher").stdout
        assert job["state"] == "succeeded", f"{job}\n{logs}\n{log_path.read_text()[-3000:]}"
        assert "rank 0 step 2" in logs
        # The ranks ran from the installed environment, as the service user, in its state dir.
        job_dir = next((state / "jobs").iterdir())
        if _runs_as_service_user(installed):
            assert job_dir.stat().st_uid == SERVICE_UID
        assert agent.poll() is None, log_path.read_text()[-3000:]
    finally:
        _stop(agent, state / "jobs")
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.slow
def test_coordinator_node_installs_the_coordinator_and_prints_the_join_command(installed: Installed) -> None:
    port = free_port()
    first = install(*installed.args("--coordinator-node", "--port", str(port)))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    root = installed.root
    unit = root / "etc/systemd/system/gpudeck-coordinator.service"
    assert unit.read_bytes() == (installed.venv / "share/gpudeck/systemd/gpudeck-coordinator.service").read_bytes()
    assert os.readlink(root / "etc/systemd/system/multi-user.target.wants/gpudeck-coordinator.service") == \
        "/etc/systemd/system/gpudeck-coordinator.service"
    settings = env_file(root / "etc/gpudeck/coordinator.env")
    assert settings == {"GPUDECK_COORDINATOR_ARGS": f"--host 0.0.0.0 --port {port}"}
    assert "wrote /etc/gpudeck/agent.env" not in first.stdout and "wrote /etc/gpudeck/token" not in first.stdout
    # Not started (a staging root), so there is no token yet: it says how to get one.
    assert "gpudeck token --state-dir /var/lib/gpudeck/coordinator" in first.stdout

    # Start the installed coordinator as its unit would (on loopback, without mDNS, for the test).
    env = _service_env(installed, settings)
    command = _unit_command(installed, "gpudeck-coordinator.service", "GPUDECK_COORDINATOR_ARGS", settings)
    command += ["--host", "127.0.0.1", "--no-mdns"]
    state = root / "var/lib/gpudeck/coordinator"
    process = None
    try:
        with open(installed.coordinator.root / "installed-coordinator.log", "ab") as log:
            process = subprocess.Popen(_as_service_user(installed, command), env=env, cwd=state, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        token_file = state / "token"
        wait_until(lambda: token_file.exists() and token_file.read_text().strip(), 30,
                   "the installed coordinator's token")
        token = token_file.read_text().strip()
        if _runs_as_service_user(installed):
            assert token_file.stat().st_uid == SERVICE_UID
        # A run with the coordinator's token present prints the join command with it.
        again = install(*installed.args("--coordinator-node"))
        assert again.returncode == 0, again.stderr
        assert "nothing to change" in again.stdout
        join = re.search(rf"echo '({re.escape(token)})' \| sudo \./install-node\.sh --coordinator (\S+):(\d+) --from "
                         rf"{re.escape(installed.dist.wheel.name)}$", again.stdout, re.M)
        assert join, again.stdout
        assert join.group(3) == str(port)
        # That command joins this very machine: the agent's token and address change, checked by pin.
        joined = install(*installed.args("--coordinator", f"127.0.0.1:{port}"), stdin=join.group(1) + "\n")
        assert joined.returncode == 0, joined.stdout[-3000:] + joined.stderr[-3000:]
        assert f"checked: the coordinator at 127.0.0.1:{port} presents the certificate the token pins" in joined.stdout
        assert (root / "etc/gpudeck/token").read_text().strip() == token
        assert env_file(root / "etc/gpudeck/agent.env")["GPUDECK_COORDINATOR"] == f"127.0.0.1:{port}"
    finally:
        _stop(process)


@pytest.mark.slow
def test_uninstall_leaves_only_the_state_dir_and_names_it(installed: Installed) -> None:
    root = installed.root
    result = install("--root", str(root), "--uninstall")
    assert result.returncode == 0, result.stderr
    assert f"kept the state dir {root}/var/lib/gpudeck" in result.stdout
    left = []
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if relative.parts[:3] == ("var", "lib", "gpudeck") or str(relative) in NOT_OURS:
            continue
        if path.is_dir() and not path.is_symlink() and "gpudeck" not in path.name:
            continue  # an ordinary directory such as etc/systemd/system, present on any machine
        left.append(str(relative))
    assert not left, f"--uninstall left {sorted(left)}"
    assert (root / "var/lib/gpudeck/agent").is_dir()
    twice = install("--root", str(root), "--uninstall")
    assert twice.returncode == 0 and "nothing to remove" in twice.stdout
