"""The traffic datagram codec, the byte counter and the UDP reporter of the ranks.

These run without torch processes. The codec (gpudeck.protocol.traffic) is what the agent's sink
trusts, so every way a datagram can be malformed must come out as ValueError.
"""

from __future__ import annotations

import socket
import threading

import msgpack
import pytest

from gpudeck.protocol.traffic import TrafficReport, decode_report, encode_report
from gpudeck.train.counter import TrafficCounter
from gpudeck.train.reporter import reporter_from_env

SYNC = {"entered": 41, "ops": 40, "wait_us": 1_250_000, "span_us": 9_000_000}
VALID = {"v": 2, "job": 7, "attempt": 2, "rank": 1, "bytes": {"all_reduce": 8320, "send": 0}, "sync": SYNC}


def pack(body: object) -> bytes:
    return msgpack.packb(body)


def with_field(**changes: object) -> dict:
    return {**VALID, **changes}


def test_round_trip() -> None:
    report = TrafficReport(job=7, attempt=2, rank=1, bytes={"all_reduce": 8320, "rpc": 2**40})
    decoded = decode_report(encode_report(report))
    assert (decoded.job, decoded.attempt, decoded.rank) == (7, 2, 1)
    assert dict(decoded.bytes) == {"all_reduce": 8320, "rpc": 2**40}


def test_decodes_a_hand_built_datagram() -> None:
    decoded = decode_report(pack(VALID))
    assert dict(decoded.bytes) == VALID["bytes"] and dict(decoded.sync) == SYNC
    assert dict(decode_report(pack(with_field(sync={}))).sync) == {}  # before the first collective


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1", id="reserved-byte"),
        pytest.param(pack(VALID)[:-1], id="truncated"),
        pytest.param(pack(VALID) + b"\x00", id="trailing-data"),
        pytest.param(pack([1, 2, 3]), id="array"),
        pytest.param(pack(42), id="int"),
        pytest.param(pack("all_reduce"), id="string"),
        pytest.param(b"\x00" * 9000, id="oversized"),
    ],
)
def test_rejects_what_is_not_a_report_map(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode_report(data)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({k: v for k, v in VALID.items() if k != "rank"}, id="missing-key"),
        pytest.param(with_field(extra=1), id="unknown-key"),
        pytest.param(with_field(v=3), id="future-version"),
        pytest.param(with_field(v=1), id="older-version"),
        pytest.param({k: v for k, v in VALID.items() if k != "sync"}, id="no-sync"),
        pytest.param(with_field(sync={"ops": 1}), id="partial-sync"),
        pytest.param(with_field(sync={**SYNC, "extra": 1}), id="unknown-sync-key"),
        pytest.param(with_field(sync={**SYNC, "ops": -1}), id="negative-sync"),
        pytest.param(with_field(sync={**SYNC, "wait_us": 0.5}), id="float-sync"),
        pytest.param(with_field(sync=[1]), id="sync-array"),
        pytest.param(with_field(v=True), id="bool-version"),
        pytest.param(with_field(job="7"), id="string-job"),
        pytest.param(with_field(attempt=1.0), id="float-attempt"),
        pytest.param(with_field(rank=True), id="bool-rank"),
        pytest.param(with_field(rank=-1), id="negative-rank"),
        pytest.param(with_field(bytes=[1]), id="bytes-array"),
        pytest.param(with_field(bytes={"send": -1}), id="negative-bytes"),
        pytest.param(with_field(bytes={"send": 2**63}), id="bytes-too-large"),
        pytest.param(with_field(bytes={"send": 1.5}), id="float-bytes"),
        pytest.param(with_field(bytes={"send": "12"}), id="string-bytes"),
        pytest.param(with_field(bytes={"send": None}), id="nil-bytes"),
        pytest.param(with_field(bytes={"All-Reduce": 1}), id="kind-not-snake-case"),
        pytest.param(with_field(bytes={"": 1}), id="empty-kind"),
        pytest.param(with_field(bytes={f"k{i}": 1 for i in range(65)}), id="too-many-kinds"),
        pytest.param(with_field(bytes={"send": {"nested": 1}}), id="nested-map"),
        pytest.param(with_field(bytes={"send": b"\x01"}), id="binary"),
    ],
)
def test_rejects_wrong_fields(body: dict) -> None:
    with pytest.raises(ValueError):
        decode_report(pack(body))


def test_rejects_integer_map_keys() -> None:
    with pytest.raises(ValueError):
        decode_report(pack({1: 1}))


@pytest.mark.parametrize("depth", [100, 2000])
def test_rejects_huge_nesting(depth: int) -> None:
    nested: object = 1
    for _ in range(depth):
        nested = {"a": nested}
    with pytest.raises(ValueError):
        decode_report(pack(with_field(bytes=nested)))
    with pytest.raises(ValueError):
        decode_report(b"\x91" * depth + b"\xc0")


def test_counter_is_exact_under_threads() -> None:
    counter = TrafficCounter()

    def add_many() -> None:
        for _ in range(10_000):
            counter.add("send", 3)

    threads = [threading.Thread(target=add_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counter.add("recv", 0)
    assert counter.snapshot() == {"send": 120_000}


def receiver() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    return sock


def last_report(sink: socket.socket) -> TrafficReport:
    """The last datagram waiting on ``sink`` (a periodic one may precede the final one)."""
    reports = [decode_report(sink.recv(65536))]
    sink.settimeout(0.2)
    try:
        while True:
            reports.append(decode_report(sink.recv(65536)))
    except TimeoutError:
        return reports[-1]


def test_overlapping_collectives_count_the_time_in_flight_once() -> None:
    """DDP keeps several buckets in flight: their waits overlap and must not add up past the span."""
    counter = TrafficCounter()
    assert counter.sync() == {}
    counter.entered()
    counter.entered()
    threading.Event().wait(0.05)
    counter.completed()
    counter.completed()
    sync = counter.sync()
    assert sync["entered"] == sync["ops"] == 2
    assert 0 < sync["wait_us"] <= sync["span_us"] + 1000, sync
    counter.entered()  # in flight now: its wait keeps growing while it is blocked
    before = counter.sync()
    threading.Event().wait(0.02)
    after = counter.sync()
    assert after["wait_us"] > before["wait_us"] and after["ops"] == 2 and after["entered"] == 3


def test_reporter_sends_final_totals_on_close() -> None:
    counter = TrafficCounter()
    with receiver() as sink:
        env = {
            "GPUDECK_TRAFFIC_ADDR": f"127.0.0.1:{sink.getsockname()[1]}",
            "GPUDECK_JOB_ID": "12", "GPUDECK_ATTEMPT": "3", "RANK": "5",
        }
        reporter = reporter_from_env(counter, env)
        assert reporter is not None
        reporter.start()
        counter.add("all_reduce", 100)
        reporter.close()
        report = last_report(sink)
    assert (report.job, report.attempt, report.rank) == (12, 3, 5)
    assert dict(report.bytes) == {"all_reduce": 100}


def test_reporter_is_off_without_an_address() -> None:
    assert reporter_from_env(TrafficCounter(), {}) is None


@pytest.mark.parametrize(
    "env",
    [
        {"GPUDECK_TRAFFIC_ADDR": "no-port", "GPUDECK_JOB_ID": "1", "GPUDECK_ATTEMPT": "0"},
        {"GPUDECK_TRAFFIC_ADDR": "127.0.0.1:x", "GPUDECK_JOB_ID": "1", "GPUDECK_ATTEMPT": "0"},
        {"GPUDECK_TRAFFIC_ADDR": "127.0.0.1:9", "GPUDECK_ATTEMPT": "0"},
        {"GPUDECK_TRAFFIC_ADDR": "127.0.0.1:9", "GPUDECK_JOB_ID": "one", "GPUDECK_ATTEMPT": "0"},
    ],
)
def test_unusable_reporting_settings_warn_instead_of_failing(
    env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert reporter_from_env(TrafficCounter(), env) is None
    assert "traffic reporting disabled" in capsys.readouterr().err


def test_reporter_survives_send_errors() -> None:
    """A datagram too large for the socket fails in sendto; close() must still return quietly."""
    counter = TrafficCounter()
    env = {"GPUDECK_TRAFFIC_ADDR": "127.0.0.1:9", "GPUDECK_JOB_ID": "1", "GPUDECK_ATTEMPT": "0"}
    reporter = reporter_from_env(counter, env)
    assert reporter is not None
    for i in range(3000):
        counter.add(f"kind_{i}_" + "x" * 40, 1)
    reporter.close()
