"""The rank wrapper for real: torchrun jobs over gloo whose traffic totals arrive at a UDP sink.

Each job is an ordinary training script written to tmp_path and launched as
``torchrun --nproc-per-node 2 -m gpudeck.train.run script.py``; expected byte counts are worked
out from tensor shapes, so any double counting or missed path shows as a mismatch.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.traffic_sink import Sink

pytestmark = pytest.mark.slow

LINEAR_64_32_BYTES = (64 * 32 + 32) * 4  # Linear(64, 32) gradients in float32: 8320 bytes
FINISHED = re.compile(r"rank \d finished with parameters \[[^\]]*\]")


@pytest.fixture
def sink() -> Iterator[Sink]:
    sink = Sink()
    yield sink
    sink.stop()


def child_env(sink: Sink | None = None, **extra: str) -> dict[str, str]:
    # The wrapper run by hand, not by an agent (which sets what a rank needs): one thread a rank, as
    # torchrun gives ranks that share a machine, keeps tests that start two from oversubscribing two cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPUDECK_JOB_ID": "41", "GPUDECK_ATTEMPT": "1", **extra}
    if sink is not None:
        env["GPUDECK_TRAFFIC_ADDR"] = sink.address
    return env


def write_script(tmp_path: Path, source: str, name: str = "train.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def torchrun(script: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "gpudeck.train.run", str(script), *args,
    ]
    result = subprocess.run(command, env=env, cwd=script.parent, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def run_direct(script: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The wrapper without torchrun, which would replace the script's exit status by its own."""
    command = [sys.executable, "-m", "gpudeck.train.run", str(script), *args]
    return subprocess.run(command, env=env, cwd=script.parent, capture_output=True, text=True, timeout=60)


DDP_SCRIPT = """
    import os, sys
    import torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(64, 32))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    torch.manual_seed(1 + dist.get_rank())
    for _ in range(int(sys.argv[1])):
        optimizer.zero_grad()
        model(torch.randn(8, 64)).pow(2).sum().backward()
        optimizer.step()
    checksum = [p.double().sum().item() for p in model.parameters()]
    print(f"rank {dist.get_rank()} finished with parameters {checksum!r}")
    os.write(2, b"written to fd 2 directly\\n")
    dist.destroy_process_group()
"""


def test_ddp_gradient_bytes_are_exact_and_logs_go_per_rank(tmp_path: Path, sink: Sink) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "rank-0.log").write_text("from an earlier attempt\n")
    steps = 5
    script = write_script(tmp_path, DDP_SCRIPT)
    result = torchrun(script, str(steps), env=child_env(sink, GPUDECK_LOG_DIR=str(logs)))
    totals = sink.close()
    expected = {"all_reduce": LINEAR_64_32_BYTES * steps, "broadcast": LINEAR_64_32_BYTES}
    assert totals == {0: expected, 1: expected}
    for rank in (0, 1):  # the last datagram's collective progress: every collective entered and completed
        sync = dict([report for report in sink.reports if report.rank == rank][-1].sync)
        assert sync["entered"] == sync["ops"] >= steps + 1, sync  # DDP's all-reduces and broadcasts
        assert 0 < sync["wait_us"] <= sync["span_us"] * 1.5, sync
    for rank in (0, 1):
        log = (logs / f"rank-{rank}.log").read_text()
        assert f"rank {rank} finished" in log
        assert "written to fd 2 directly" in log
    assert (logs / "rank-0.log").read_text().startswith("from an earlier attempt\n")
    assert "finished" not in result.stdout


def test_ddp_trains_exactly_as_without_the_wrapper(tmp_path: Path) -> None:
    """The counting hook must not change a single bit of what DDP computes."""
    script = write_script(tmp_path, DDP_SCRIPT)
    plain_command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), "3",
    ]
    plain = subprocess.run(plain_command, env=child_env(), capture_output=True, text=True, timeout=120)
    wrapped = torchrun(script, "3", env=child_env())
    finished = sorted(FINISHED.findall(plain.stdout))  # two ranks share the pipe: lines may interleave
    assert len(finished) == 2
    assert finished == sorted(FINISHED.findall(wrapped.stdout))


HOOKS_SCRIPT = """
    import torch, torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    calls = []

    def user_hook(state, bucket):
        calls.append(bucket.buffer().numel())
        return default_hooks.allreduce_hook(state, bucket)

    with_user_hook = DDP(torch.nn.Linear(64, 32))
    with_builtin_hook = DDP(torch.nn.Linear(16, 8))
    with_builtin_hook._register_builtin_comm_hook(dist.BuiltinCommHookType.FP16_COMPRESS)
    for step in range(3):
        loss = with_user_hook(torch.randn(4, 64)).sum()
        if step == 0:  # DDP allows registering between the first forward and backward
            with_user_hook.register_comm_hook(None, user_hook)
        loss.backward()
        with_builtin_hook(torch.randn(4, 16)).sum().backward()
    try:
        with_user_hook.register_comm_hook(None, user_hook)
    except RuntimeError as error:
        print(f"second hook refused: {error}")
    print(f"user hook calls: {calls}")
    dist.destroy_process_group()
"""


def test_user_and_builtin_ddp_hooks_still_run_and_are_counted(tmp_path: Path, sink: Sink) -> None:
    result = torchrun(write_script(tmp_path, HOOKS_SCRIPT), env=child_env(sink))
    totals = sink.close()
    fp16_bytes = (16 * 8 + 8) * 2
    expected = {
        "all_reduce": 3 * (LINEAR_64_32_BYTES + fp16_bytes),
        "broadcast": LINEAR_64_32_BYTES + (16 * 8 + 8) * 4,
    }
    assert totals == {0: expected, 1: expected}
    assert result.stdout.count("user hook calls: [2080, 2080, 2080]") == 2
    assert result.stdout.count("second hook refused: register_comm_hook") == 2


COLLECTIVES_SCRIPT = """
    import torch, torch.distributed as dist

    dist.init_process_group("gloo")
    root = dist.get_rank() == 0
    ones = torch.ones  # 10 float32 elements are 40 bytes
    dist.all_reduce(ones(10))
    dist.all_reduce_coalesced([ones(10), ones(5)])
    dist.broadcast(ones(10), src=0)
    dist.all_gather([ones(10), ones(10)], ones(10))
    dist.all_gather_into_tensor(ones(20), ones(10))
    dist.reduce_scatter_tensor(ones(10), ones(20))
    dist.reduce_scatter(ones(10), [ones(10), ones(10)])
    dist.all_to_all_single(ones(20), ones(20))
    dist.all_to_all([ones(10), ones(10)], [ones(10), ones(10)])
    dist.reduce(ones(10), dst=0)
    dist.gather(ones(10), [ones(10), ones(10)] if root else None, dst=0)
    dist.scatter(ones(10), [ones(10), ones(10)] if root else None, src=0)
    dist.barrier()
    dist.destroy_process_group()
"""


def test_every_collective_counts_what_this_rank_hands_over(tmp_path: Path, sink: Sink) -> None:
    torchrun(write_script(tmp_path, COLLECTIVES_SCRIPT), env=child_env(sink))
    expected = {
        "all_reduce": 40 + 60, "broadcast": 40, "all_gather": 40 + 40, "reduce_scatter": 80 + 80,
        "all_to_all": 80 + 80, "reduce": 40, "gather": 40, "scatter": 40,
    }
    assert sink.close() == {0: expected, 1: expected}


P2P_SCRIPT = """
    import torch, torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    peer = 1 - rank
    buffer = torch.zeros(100)
    if rank == 0:
        dist.send(buffer, dst=1)
        dist.isend(torch.ones(50, dtype=torch.float64), dst=1).wait()
    else:
        dist.recv(buffer, src=0)
        dist.irecv(torch.zeros(50, dtype=torch.float64), src=0).wait()
    ops = [
        dist.P2POp(dist.isend, torch.ones(10, dtype=torch.int16), peer),
        dist.P2POp(dist.irecv, torch.zeros(10, dtype=torch.int16), peer),
    ]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    dist.destroy_process_group()
"""


def test_send_recv_and_batch_isend_irecv_bytes(tmp_path: Path, sink: Sink) -> None:
    torchrun(write_script(tmp_path, P2P_SCRIPT), env=child_env(sink))
    totals = sink.close()
    one_way, batched = 100 * 4 + 50 * 8, 10 * 2
    assert totals == {
        0: {"send": one_way + batched, "recv": batched},
        1: {"send": batched, "recv": one_way + batched},
    }


PIPELINE_SCRIPT = """
    import sys
    import torch, torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    microbatch, chunks, steps = 2, 4, int(sys.argv[1])
    if rank == 0:
        module = torch.nn.Linear(16, 32)
        example_in, example_out = torch.randn(microbatch, 16), torch.randn(microbatch, 32, requires_grad=True)
    else:
        module = torch.nn.Linear(32, 8)
        example_in, example_out = torch.randn(microbatch, 32, requires_grad=True), torch.randn(microbatch, 8)
    stage = PipelineStage(module, rank, 2, torch.device("cpu"), input_args=example_in, output_args=example_out)
    schedule = ScheduleGPipe(stage, chunks, loss_fn=lambda y, target: ((y - target) ** 2).mean())
    for _ in range(steps):
        if rank == 0:
            schedule.step(torch.randn(microbatch * chunks, 16))
        else:
            losses = []
            schedule.step(target=torch.randn(microbatch * chunks, 8), losses=losses)
            assert len(losses) == chunks
    dist.destroy_process_group()
"""


def test_pipelining_gpipe_trains_and_counts_activations_and_gradients(tmp_path: Path, sink: Sink) -> None:
    steps = 2
    torchrun(write_script(tmp_path, PIPELINE_SCRIPT), str(steps), env=child_env(sink))
    totals = sink.close()
    # Each step sends 4 microbatches of (2, 32) float32 activations forward and as many gradients
    # back; the stages also pass one int32 once, the vote on static shape inference.
    per_direction = steps * 4 * 2 * 32 * 4 + 4
    assert totals == {
        0: {"send": per_direction, "recv": per_direction},
        1: {"send": per_direction, "recv": per_direction},
    }


RPC_SCRIPT = """
    import os
    import torch
    import torch.distributed.rpc as rpc

    def doubled(x):
        return {"y": [x * 2]}

    def plus_one(xs, named):
        return xs[0] + 1, named["k"][0] + 1

    rank = int(os.environ["RANK"])
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=2)
    if rank == 0:
        assert rpc.rpc_sync("worker1", doubled, args=(torch.ones(10),))["y"][0].sum() == 20
        summed = rpc.rpc_async("worker1", torch.add,
                               args=(torch.ones(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)))
        assert summed.wait().sum() == 10
        remote = rpc.remote("worker1", plus_one, args=([torch.ones(3)], {"k": (torch.ones(2),)}))
        assert remote.to_here()[1].sum() == 4
    rpc.shutdown()
"""


def test_rpc_arguments_and_results_are_counted(tmp_path: Path, sink: Sink) -> None:
    torchrun(write_script(tmp_path, RPC_SCRIPT), env=child_env(sink))
    totals = sink.close()
    rpc_sync, rpc_async, remote = 40 + 40, 80 + 40, (12 + 8) + (12 + 8)
    assert totals == {0: {"rpc": rpc_sync + rpc_async + remote}, 1: {}}


EXIT_SCRIPT = """
    import sys
    import torch, torch.distributed as dist

    print("argv", sys.argv, "name", __name__, "path0", sys.path[0])
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    dist.all_reduce(torch.ones(4))
    if sys.argv[1] == "exit":
        sys.exit(3)
    if sys.argv[1] == "raise":
        raise ValueError("boom from the script")
"""


@pytest.mark.parametrize(("how", "status"), [("return", 0), ("exit", 3), ("raise", 1)])
def test_exit_status_is_the_scripts_and_final_totals_are_sent(
    tmp_path: Path, sink: Sink, how: str, status: int
) -> None:
    script = write_script(tmp_path, EXIT_SCRIPT, name="job.py")
    result = run_direct(script, how, "--flag", env=child_env(sink))
    assert result.returncode == status, result.stderr
    assert f"argv ['{script}', '{how}', '--flag'] name __main__ path0 {tmp_path}" in result.stdout
    assert sink.close() == {0: {"all_reduce": 16}}
    if how == "raise":
        # torch.distributed's excepthook prefixes "[rank0]: ", as under plain torchrun.
        frames = [line for line in result.stderr.splitlines() if 'File "' in line]
        assert [frame.split("File ")[1] for frame in frames] == [f'"{script}", line 11, in <module>']
        assert "Traceback (most recent call last):" in result.stderr
        assert result.stderr.rstrip().endswith("ValueError: boom from the script")


OPEN_GROUP_SCRIPT = """
    import atexit
    import torch, torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    dist.all_reduce(torch.ones(4))
    atexit.register(lambda: print("group still open at exit:", dist.is_initialized()))
"""


def test_a_process_group_the_script_left_open_is_closed_before_python_tears_down(tmp_path: Path) -> None:
    """Left to Python's teardown after runpy, the group's destruction raced gloo's threads: about
    one run in ten aborted with "terminate called without an active exception" (status -6)."""
    result = run_direct(write_script(tmp_path, OPEN_GROUP_SCRIPT), env=child_env())
    assert result.returncode == 0, result.stderr
    assert "group still open at exit: False" in result.stdout


def test_missing_script_is_a_usage_error(tmp_path: Path) -> None:
    result = run_direct(tmp_path / "absent.py", env=child_env())
    assert result.returncode == 2
    assert "can't open file" in result.stderr
