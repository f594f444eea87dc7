"""Framing, the message codec and the join token: round trips and every kind of hostile input."""

from __future__ import annotations

import re
import struct

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpudeck.protocol import auth
from gpudeck.protocol.framing import MAX_DEPTH, MAX_FRAME, FrameDecoder, FrameError, decode_body, encode_frame
from gpudeck.protocol.messages import REGISTRY, Error, Hello, ListJobs, ProtocolError, decode
from gpudeck.model import JobSpec, RunSpec
from gpudeck.protocol.node_messages import Launch, LogChunk, Register, Telemetry, Traffic
from gpudeck.protocol.payloads import GpuProcess, GpuReading, JobReport, WarmStatus
from gpudeck.protocol.values import ShapeError
from gpudeck.protocol.views import JobView, OutputFile, PlacementView

SAMPLES = [
    Hello(secret="s", role="agent", name="node-a", version=1),
    Error(message="no", code="refused", req=None),
    Telemetry(gpus=[GpuReading(index=0, name="Simulated GPU", uuid="SIM-0", memory_total=1, memory_used=None,
                               utilization=None, temperature=30.5, power=None, power_limit=None,
                               processes=(GpuProcess(pid=7, name="python", memory_used=None, foreign=True),))]),
    Register(hostname="h", address="10.0.0.2", simulated=True, gpus=[],
             jobs=[JobReport(job=4, attempt=2, exit_code=3, detail="rank 1 exited with code 3", failed_at=5.5)]),
    LogChunk(job=3, attempt=1, rank=-1, offset=1024, data=b"\x00\xffline\n"),
    Traffic(job=3, attempt=2, by_rank={0: {"all_reduce": 8320}, 11: {"send": 1}},
            sync={0: {"entered": 9, "ops": 8, "wait_us": 1200, "span_us": 90000}}),
    Launch(job=1, attempt=1, node_rank=0, nnodes=2, gpus=[0, 1], master_addr="10.0.0.1", master_port=29500,
           run=RunSpec(script_name="t.py", script=b"print()", args=["--steps", "5"], workdir="/tmp")),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.kind)
def test_every_sample_round_trips_through_a_frame(message):
    (body,) = FrameDecoder().feed(encode_frame(message.to_wire()))
    assert decode(body) == message


def test_frames_fed_one_byte_at_a_time_come_out_whole_and_in_order():
    stream = b"".join(encode_frame(m.to_wire()) for m in SAMPLES)
    decoder, bodies = FrameDecoder(), []
    for i in range(len(stream)):
        bodies += decoder.feed(stream[i:i + 1])
    assert [decode(b) for b in bodies] == SAMPLES


@given(st.dictionaries(st.text(max_size=8), st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=20), max_size=6))
def test_any_small_map_round_trips(body):
    assert FrameDecoder().feed(encode_frame(body)) == [body]


def test_a_huge_declared_length_is_refused_before_any_body_is_read():
    decoder = FrameDecoder()
    with pytest.raises(FrameError, match="over the"):
        decoder.feed(struct.pack(">I", 0xFFFFFFFF))


def test_an_empty_frame_is_refused():
    with pytest.raises(FrameError, match="empty"):
        FrameDecoder().feed(struct.pack(">I", 0))


@pytest.mark.parametrize("payload", [
    msgpack.packb([1, 2, 3]),             # not a map
    msgpack.packb("text"),
    b"\xc1",                              # a byte msgpack never uses
    b"\x91" * 5000 + b"\xc0",             # nesting deeper than the unpacker's stack
    msgpack.packb({1: "int key"}),        # keys must be strings
    msgpack.packb({"a": 1}) + b"\x00",    # trailing bytes
    b"\xdd\xff\xff\xff\xff",              # an array claiming 4 billion items
], ids=["list", "string", "reserved-byte", "deep", "int-key", "trailing", "huge-array"])
def test_malformed_bodies_become_frame_errors(payload):
    with pytest.raises(FrameError):
        decode_body(payload)


def test_nesting_past_the_depth_limit_is_refused():
    value: list = []
    for _ in range(MAX_DEPTH + 2):
        value = [value]
    with pytest.raises(FrameError, match="deeper"):
        decode_body(msgpack.packb({"a": value}))


def test_a_frame_too_big_to_send_is_refused_at_the_sender():
    with pytest.raises(FrameError):
        encode_frame({"data": b"x" * (MAX_FRAME + 1)})


@pytest.mark.parametrize("body, problem", [
    ({"kind": "nonsense"}, "unknown message kind"),
    ({"secret": "x"}, "unknown message kind"),
    ({"kind": "hello", "secret": "s", "role": "agent", "name": "a"}, "missing field 'version'"),
    ({"kind": "hello", "secret": 5, "role": "agent", "name": "a", "version": 1}, "'secret' has the wrong type"),
    ({"kind": "hello", "secret": "s", "role": "agent", "name": "a", "version": True}, "'version' has the wrong type"),
    ({"kind": "hello", "secret": "s", "role": "agent", "name": "a", "version": 1, "x": 1}, "unknown field"),
    ({"kind": "traffic", "job": 1, "attempt": 1, "by_rank": {"0": {"all_reduce": "many"}}},
     "field \"by_rank['0']['all_reduce']\" has the wrong type (str)"),
    ({"kind": "traffic", "job": 1, "attempt": 1, "by_rank": {"rank0": {}}}, "has a key that is not a number"),
    ({"kind": "telemetry", "gpus": [{"index": 0}]}, "missing field 'gpus[0].name'"),
    ({"kind": "register", "hostname": "h", "address": "a", "simulated": True, "gpus": [],
      "jobs": [{"job": 1, "attempt": "1", "exit_code": None, "detail": "", "retry": False, "failed_at": None}]},
     "field 'jobs[0].attempt' has the wrong type (str)"),
    ({"kind": "launch", **{k: 0 for k in Launch.__dataclass_fields__}}, "wrong type"),
    ({**SAMPLES[-1].to_wire(), "run": {"script_name": 5}}, "field 'run.script_name' has the wrong type (int)"),
    ({**SAMPLES[-1].to_wire(), "run": {"shell": "rm -rf /"}}, "unknown field 'run.shell'"),
])
def test_wrong_messages_are_protocol_errors_with_a_reason(body, problem):
    with pytest.raises(ProtocolError, match=re.escape(problem)):
        decode(body)


def test_fields_added_to_a_message_later_may_be_absent_so_the_version_before_stays_valid():
    listing = decode({"kind": "list_jobs", "req": 1, "after": 0, "limit": 10})
    assert listing == ListJobs(req=1, after=0, limit=10, states=[], since=None, before=None, newest=False)
    assert decode({"kind": "telemetry", "gpus": []}) == Telemetry(gpus=[], warm=WarmStatus())
    filtered = decode({"kind": "list_jobs", "req": 1, "after": 0, "limit": 10, "states": ["failed"]})
    assert isinstance(filtered, ListJobs) and filtered.states == ["failed"]
    with pytest.raises(ProtocolError, match="missing field 'limit'"):
        decode({"kind": "list_jobs", "req": 1, "after": 0})


def test_fields_a_nested_value_gained_later_may_be_absent_too():
    """A run option added to `RunSpec` needs nothing between submit and the agent: a launch from a
    coordinator without it still decodes, with the option's default."""
    launch = SAMPLES[-1]
    assert isinstance(launch, Launch)
    body = launch.to_wire()
    del body["run"]["launcher"], body["run"]["env"]
    decoded, again = decode(body), decode(body)
    assert decoded == launch and isinstance(decoded, Launch) and isinstance(again, Launch)
    assert decoded.run.env == {} and decoded.run.env is not again.run.env, "every decode gets a map of its own"


def test_a_job_spec_travels_with_its_run_nested_and_is_checked_with_the_same_sentences():
    spec = JobSpec(name="t", gpus=2, priority=3, run=RunSpec(script_name="t.py", script=b"print()",
                                                             env={"A": "1"}, requirements={"uv.lock": b"x"}))
    wire = spec.to_wire()
    assert wire["run"]["script"] == b"print()" and "script" not in wire
    assert JobSpec.from_wire(wire) == spec
    refusals = [
        ({**wire, "colour": "red"}, "unknown job field 'colour'"),
        ({**wire, "run": {**wire["run"], "shell": "sh"}}, "unknown job field 'shell'"),
        ({**wire, "run": ["t.py"]}, "job field 'run' has the wrong type (list)"),
        ({**wire, "run": {**wire["run"], "script": "print()"}}, "job field 'script' has the wrong type (str)"),
        ({k: v for k, v in wire.items() if k != "run"}, "malformed job: "),
        ({**wire, "run": {**wire["run"], "workload": "pipeline"}}, "give one of a script, a built-in workload"),
    ]
    for data, problem in refusals:
        with pytest.raises(ValueError, match=re.escape(problem)):
            JobSpec.from_wire(data)


def _job_wire() -> dict:
    view = JobView.build(1, JobSpec(name="t", gpus=3, run=RunSpec(script_name="t.py", script=b"")), "running",
                         submitted_at=1.0, hosts=[("n1", [0, 1]), ("n2", [0])], traffic={0: {"send": 1}},
                         outputs={"n1": [OutputFile(path="a.txt", size=1)]})
    return view.to_json()


@pytest.mark.parametrize("path, value, delete, problem", [
    (["placement", 1, "gpus", 0], "0", False, "field 'job.placement[1].gpus[0]' has the wrong type (str)"),
    (["outputs", "n1", 0, "size"], "1", False, "field \"job.outputs['n1'][0].size\" has the wrong type (str)"),
    (["traffic", "by_rank", "x"], {}, False, "field 'job.traffic.by_rank' has a key that is not a number ('x')"),
    (["traffic", "by_kind", 1], 2, False, "field 'job.traffic.by_kind key' has the wrong type (int)"),
    (["placement", 0, "colour"], "red", False, "unknown field 'job.placement[0].colour'"),
    (["request", "gpus"], None, True, "missing field 'job.request.gpus'"),
    (["progress"], {"bucket_seconds": "x", "wait": {}}, False, "field 'job.progress' has the wrong type (dict)"),
])
def test_a_wrong_value_deep_in_a_view_is_named_by_its_whole_location(path, value, delete, problem):
    """Locations are put together only once something is wrong, level by level on the way out."""
    wire = _job_wire()
    parent = wire
    for step in path[:-1]:
        parent = parent[step]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    with pytest.raises(ShapeError) as refused:
        JobView.from_json(wire)
    assert str(refused.value) == problem


def test_a_view_decodes_to_what_was_sent_whatever_the_order_of_its_fields():
    wire = _job_wire()
    view = JobView.from_json(wire)
    assert view.to_json() == wire and view.placement == [PlacementView(node="n1", node_rank=0, gpus=[0, 1]),
                                                         PlacementView(node="n2", node_rank=1, gpus=[0])]
    assert JobView.from_json(dict(reversed(wire.items()))) == view
    assert view.placement is not JobView.from_json(wire).placement, "every decode gets lists of its own"


def test_every_message_kind_is_registered_once_under_its_own_name():
    assert all(cls.kind == kind for kind, cls in REGISTRY.items())
    assert {"hello", "welcome", "error", "register", "launch", "kill", "submit", "reply"} <= set(REGISTRY)


def test_token_round_trip_and_refusals(tmp_path):
    identity = auth.CoordinatorIdentity(tmp_path)
    token = identity.ensure()
    assert auth.JoinToken.parse(str(token)) == token
    assert token.fingerprint == identity.fingerprint()
    assert identity.ensure() == token, "a second start keeps the same token"
    assert (tmp_path / "token").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "coordinator.key").stat().st_mode & 0o777 == 0o600
    for bad in ["", "gd1.abc.def", str(token).replace("gd1", "gd2"), str(token) + "!"]:
        with pytest.raises(auth.TokenError):
            auth.JoinToken.parse(bad)
