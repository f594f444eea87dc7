"""`gpudeck coordinator --metrics`: what Prometheus scrapes from a real cluster, checked by promtool,
and what the unauthenticated endpoint lets a stranger cost."""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.parser import text_string_to_metric_families

from gpudeck.coordinator.metrics import MAX_CONNECTIONS, MAX_REQUEST_HEAD, MetricsEndpoint
from tests.cluster import Cluster, free_port, wait_until

SCRIPTS = Path(__file__).resolve().parent / "scripts"
Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(port: int) -> tuple[str, Samples]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    found = [v for have, v in samples.get(name, []) if all(have.get(k) == want for k, want in labels.items())]
    return sum(found) if found else None


def find_promtool(into: Path) -> str | None:
    """promtool, or Debian's, unpacked (not installed: the package would start a Prometheus server)
    where this test may fetch it (root with apt-get); None where it cannot be had."""
    found = shutil.which("promtool")
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run: dict[str, Any] = {"cwd": into, "env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL,
                          "timeout": 600}
    if subprocess.run(["apt-get", "download", "prometheus"], **run).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], **run)
        subprocess.run(["apt-get", "download", "prometheus"], **run)
    for package in glob.glob(str(into / "prometheus_*.deb")):
        subprocess.run(["dpkg-deb", "-x", package, str(into / "root")], **run)
    promtool = into / "root" / "usr" / "bin" / "promtool"
    return str(promtool) if promtool.exists() else None


@pytest.fixture
def metered(tmp_path: Path) -> Iterator[tuple[Cluster, int]]:
    cluster = Cluster(tmp_path)
    port = free_port()
    cluster.start_coordinator("--metrics", str(port))
    cluster.start_agent("node-a", 2)
    cluster.wait_nodes("up", 1)
    yield cluster, port
    cluster.stop()


def test_a_scrape_shows_gpus_under_dcgm_names_with_the_holding_job_and_counts_jobs(metered, tmp_path: Path):
    cluster, port = metered
    job = cluster.submit("--gpus", "1", "--no-project", "--", sys.executable, str(SCRIPTS / "sends_traffic.py"))
    cluster.wait_job(job, ("running",))

    def traffic_counted() -> Samples | None:
        _, samples = scrape(port)
        return samples if value(samples, "gpudeck_job_traffic_bytes_total", job=str(job), kind="all_reduce") else None

    samples = wait_until(traffic_counted, 60, "the job's traffic in the metrics")
    held = cluster.job(job)["placement"][0]["gpus"][0]
    gpus = samples["DCGM_FI_DEV_GPU_UTIL"]
    assert sorted(labels["gpu"] for labels, _ in gpus) == ["0", "1"]
    assert all(labels["simulated"] == "true" and labels["node"] == "node-a" and labels["UUID"] for labels, _ in gpus)
    assert {labels["gpu"]: (labels["job"], labels["owner"]) for labels, _ in gpus} == {
        str(held): (str(job), "admin"), str(1 - held): ("", "")}
    for name in ("DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE",
                 "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"):
        assert len(samples[name]) == 2, name
    used, free = value(samples, "DCGM_FI_DEV_FB_USED", gpu="0"), value(samples, "DCGM_FI_DEV_FB_FREE", gpu="0")
    assert used is not None and free is not None
    total_mib = used + free
    assert total_mib == pytest.approx(cluster.nodes()[0]["gpus"][0]["memory_total"] / 2**20)
    assert value(samples, "gpudeck_gpus", state="busy") == 1 and value(samples, "gpudeck_gpus", state="free") == 1
    assert value(samples, "gpudeck_nodes", state="up") == 1
    assert value(samples, "gpudeck_jobs", state="running") == 1
    assert value(samples, "gpudeck_queue_wait_seconds_count") == 1
    assert value(samples, "gpudeck_job_traffic_bytes_total", job=str(job), owner="admin", kind="send") == 24
    passes = value(samples, "gpudeck_scheduling_pass_seconds_count", kind="full")
    assert passes is not None and passes >= 1

    cluster.cli("cancel", str(job))
    cluster.wait_job(job, ("cancelled",))
    def cancel_counted() -> Samples | None:
        _, samples = scrape(port)
        return samples if value(samples, "gpudeck_job_exits_total", outcome="cancelled") == 1 else None

    after = wait_until(cancel_counted, 30, "the cancel counted in the metrics")
    assert value(after, "gpudeck_jobs", state="cancelled") == 1 and value(after, "gpudeck_gpus", state="free") == 2

    promtool = find_promtool(tmp_path)
    if promtool is None:
        pytest.skip("promtool (Debian package prometheus) is missing and cannot be fetched here")
    text, _ = scrape(port)
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    problems = [line for line in (checked.stdout + checked.stderr).splitlines() if line.strip()]
    # dcgm-exporter's label names (modelName, UUID, Hostname) are not snake_case: promtool's lint says
    # so (exit 3) of its series as of ours; anything else, and any parse error (exit 1), fails.
    assert checked.returncode in (0, 3), problems
    assert all(line.startswith("DCGM_FI_DEV_") and "camelCase" in line for line in problems), problems


def listening(pid: int) -> set[tuple[str, int]]:
    """The IPv4 (address, port) pairs process `pid` listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
            address, port = fields[1].split(":")
            found.add((socket.inet_ntoa(bytes.fromhex(address)[::-1]), int(port, 16)))
    return found


def test_metrics_listen_on_loopback_given_a_port_alone(metered):
    cluster, port = metered
    assert listening(cluster.procs["coordinator"].pid) == {("127.0.0.1", cluster.port), ("127.0.0.1", port)}


def test_metrics_stay_off_unless_asked(tmp_path: Path):
    cluster = Cluster(tmp_path)
    try:
        cluster.start_coordinator()
        assert listening(cluster.procs["coordinator"].pid) == {("127.0.0.1", cluster.port)}
    finally:
        cluster.stop()


@pytest.fixture
async def endpoint() -> AsyncIterator[MetricsEndpoint]:
    registry = CollectorRegistry()
    Gauge("probe", "A value to read back.", registry=registry).set(7)
    served = MetricsEndpoint(registry, "127.0.0.1", 0)
    await served.start()
    yield served
    await served.stop()


async def ask(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    try:
        return await asyncio.wait_for(reader.read(), 15)
    except ConnectionResetError:  # closed unanswered, with the request unread
        return b""
    finally:
        writer.close()


async def test_only_get_metrics_is_answered(endpoint: MetricsEndpoint):
    ok = await ask(endpoint.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200") and b"probe 7.0" in ok
    assert (await ask(endpoint.port, b"GET /api HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
    assert (await ask(endpoint.port, b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405")
    assert (await ask(endpoint.port, b"\x16\x03\x01 not http\r\n\r\n")).startswith(b"HTTP/1.1 405")


async def test_an_oversized_request_head_is_closed_unanswered(endpoint: MetricsEndpoint):
    huge = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (MAX_REQUEST_HEAD * 2) + b"\r\n\r\n"
    assert await ask(endpoint.port, huge) == b""


async def test_idle_connections_beyond_the_cap_are_refused_and_the_held_ones_time_out(endpoint: MetricsEndpoint):
    """A stranger holding connections open costs a bounded number of them, for a bounded time."""
    held = [await asyncio.open_connection("127.0.0.1", endpoint.port) for _ in range(MAX_CONNECTIONS)]
    while len(endpoint._open) < MAX_CONNECTIONS:
        await asyncio.sleep(0.05)
    assert await ask(endpoint.port, b"GET /metrics HTTP/1.1\r\n\r\n") == b""
    for reader, _ in held:  # the server ends each one once its deadline for the request head passes
        try:
            assert await asyncio.wait_for(reader.read(), 30) == b""
        except ConnectionResetError:
            pass
    assert (await ask(endpoint.port, b"GET /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 200")
    for _, writer in held:
        writer.close()


def test_the_coordinator_says_so_when_the_metrics_port_is_taken(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cluster = Cluster(tmp_path)
        result = subprocess.run([sys.executable, "-m", "gpudeck", "coordinator", "--port", str(free_port()),
                                 "--no-mdns", "--state-dir", str(tmp_path / "coord"), "--metrics", str(port)],
                                capture_output=True, text=True, env=cluster.env, timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and f"metrics on 127.0.0.1:{port}" in result.stderr, result.stderr
