"""The workloads' shared parts without torchrun: the registry, the task, options and checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from gpudeck.model import DOCTOR, WORKLOADS
from gpudeck.train.workloads import MODULES, load, options, parameter_server, task
from tests.workloads.runs import whole_checkpoint_steps
from gpudeck.train.workloads.checkpoint import Checkpoints
from gpudeck.train.workloads.session import Session


def test_every_workload_the_cli_offers_exists_with_a_main():
    assert set(WORKLOADS) | {DOCTOR} == set(MODULES)
    for name in MODULES:
        module = load(name)
        assert module.NAME == name and callable(module.main)
        assert WORKLOADS.get(name) or name == DOCTOR


def test_the_task_is_a_pure_function_of_the_seed():
    config = task.Config(seed=3)
    first, second = task.Data(config), task.Data(config)
    assert torch.equal(first.batch(5)[0], second.batch(5)[0]) and torch.equal(first.batch(5)[1], second.batch(5)[1])
    assert not torch.equal(first.batch(5)[0], first.batch(6)[0])
    assert set(first.labels.tolist()) == {0, 1, 2}
    a, b = task.build_model(config), task.build_model(config)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    wide = task.build_model(task.Config(seed=3, dtype="float64"))
    assert all(torch.equal(p.double(), q) for p, q in zip(a.parameters(), wide.parameters()))
    assert task.parameter_count(config) == sum(p.numel() for p in a.parameters())


def test_the_data_and_model_are_the_same_bits_whatever_the_process_state():
    """Ranks build the data and the model on their own, in processes whose torch settings differ (a
    user's script may set the default dtype; thread counts follow the machine), and must agree on every
    bit: before, the angles followed the default dtype and the initial weights were drawn in it."""
    config = task.Config(seed=3)
    reference, model = task.Data(config), task.build_model(config)
    threads, default = torch.get_num_threads(), torch.get_default_dtype()
    try:
        for count, dtype in [(1, torch.float64), (2, torch.float32), (1, torch.float32)]:
            torch.set_num_threads(count)
            torch.set_default_dtype(dtype)
            again = task.Data(config)
            assert torch.equal(again.inputs, reference.inputs) and torch.equal(again.eval_inputs, reference.eval_inputs)
            assert all(torch.equal(p, q) for p, q in zip(task.build_model(config).parameters(), model.parameters()))
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(default)


def test_an_async_replay_with_one_worker_is_plain_sgd():
    """With one worker nothing is stale: each push is the whole batch's gradient at the current
    parameters, so the replay the async tests compare with must be `train_reference` exactly."""
    config = task.Config(seed=5, dtype="float64")
    steps = 20
    reference, _ = task.train_reference(config, steps)
    replayed = parameter_server.replay_async(config, 1, [1] * steps, resumed_at=[7])
    assert all(torch.equal(replayed[name], value) for name, value in reference.state_dict().items())


@pytest.mark.parametrize("layers,stages", [(2, 1), (2, 2), (4, 2), (4, 3), (5, 2), (7, 4), (8, 8)])
def test_stages_cover_the_model_and_merge_back_into_it(layers, stages):
    config = task.Config(layers=layers)
    model = task.build_model(config)
    bounds = task.stage_bounds(layers, stages)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(model)
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert all(first % 2 == 0 and last > first for first, last in bounds)  # each starts with a Linear layer
    merged: dict[str, torch.Tensor] = {}
    for bound in bounds:
        merged.update(task.stage_module(model, bound).state_dict())
    assert merged.keys() == model.state_dict().keys()
    x = torch.randn(5, 2)
    y = x
    for bound in bounds:
        y = task.stage_module(model, bound)(y)
    assert torch.equal(y, model(x))
    with pytest.raises(ValueError):
        task.stage_bounds(layers, layers + 1)


def test_micro_batches_and_shards_cut_a_batch_into_its_parts():
    assert task.micro_batch_sizes(30, 4) == [8, 8, 7, 7]
    assert [len(p) for p in task.micro_batches(torch.arange(30), 4)] == [8, 8, 7, 7]
    batch = (torch.arange(12.0).reshape(6, 2), torch.arange(6))
    parts = [task.shard(batch, i, 3) for i in range(3)]
    assert torch.equal(torch.cat([p[0] for p in parts]), batch[0])


def test_options_default_to_the_job_checkpoint_dir_and_refuse_nonsense(monkeypatch, capsys):
    monkeypatch.setenv("GPUDECK_CHECKPOINT_DIR", "/data/checkpoints/9")
    args = options.parse("pipeline", [])
    assert args.checkpoint_dir == "/data/checkpoints/9" and args.steps == 300
    assert options.config(args) == task.Config()
    monkeypatch.delenv("GPUDECK_CHECKPOINT_DIR")
    assert options.parse("pipeline", []).checkpoint_dir is None
    for bad in (["--layers", "1"], ["--batch-size", "0"], ["--dtype", "float16"]):
        with pytest.raises(SystemExit):
            options.parse("pipeline", bad)


def test_saves_are_atomic_keep_two_steps_and_are_kept_apart_by_fingerprint(tmp_path: Path):
    checkpoints = Checkpoints(tmp_path, "pipeline", {"hidden": 8})
    for step in (10, 20, 30):
        checkpoints.save("stage-1", step, {"value": torch.tensor([step])})
    checkpoints.save("stage-10", 30, {"value": torch.tensor([0])})
    assert checkpoints.steps("stage-1") == [30, 20] and checkpoints.steps("stage-10") == [30]
    assert checkpoints.load("stage-1", 20)["value"].item() == 20
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".pt"]  # no temporary file left behind
    assert Checkpoints(tmp_path, "pipeline", {"hidden": 16}).steps("stage-1") == []
    assert Checkpoints(None, "pipeline", {}).steps("stage-1") == []


@pytest.fixture
def one_rank(tmp_path: Path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield Session(0, 1, 0, torch.device("cpu"), "gloo")
    dist.destroy_process_group()


def test_restore_picks_the_newest_step_every_piece_has(tmp_path: Path, one_rank: Session):
    checkpoints = Checkpoints(tmp_path / "ck", "pipeline", {})
    assert checkpoints.restore(one_rank, {"stage-0": {0}, "stage-1": {0}}) == (0, {})
    for step in (50, 100):
        checkpoints.save("stage-0", step, {"step": step})
    checkpoints.save("stage-1", 50, {"step": 50})
    step, states = checkpoints.restore(one_rank, {"stage-0": {0}, "stage-1": {0}})
    assert step == 50 and states == {"stage-0": {"step": 50}, "stage-1": {"step": 50}}


def _run_module(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUDECK_") and k not in ("RANK", "WORLD_SIZE")}
    return subprocess.run([sys.executable, "-m", "gpudeck.train.run", *args], capture_output=True, text=True,
                          env=env, timeout=60)


def test_the_wrapper_refuses_unknown_workloads_and_passes_usage_errors_through():
    unknown = _run_module("--workload", "ring-allreduce")
    assert unknown.returncode == 2 and "no built-in workload 'ring-allreduce'" in unknown.stderr
    assert "data-parallel, doctor, parameter-server, pipeline" in unknown.stderr
    assert _run_module("--workload").returncode == 2
    bad = _run_module("--workload", "pipeline", "--layers", "1")
    assert bad.returncode == 2 and "--layers must be at least 2" in bad.stderr
    outside = _run_module("--workload", "data-parallel")
    assert outside.returncode == 1 and "runs under torchrun" in outside.stderr


def test_submit_passes_the_options_after_the_workload_name_to_it():
    from gpudeck.cli import build_parser
    from gpudeck.cli.submit import spec_from_args

    args = build_parser().parse_args(["submit", "--nodes", "2", "--gpus-per-node", "1", "--workload", "pipeline",
                                      "--steps", "5", "--micro-batches", "2"])
    spec = spec_from_args(args)
    assert spec.run.workload == "pipeline" and spec.run.args == ["--steps", "5", "--micro-batches", "2"]


def test_doctor_rounds_meet_every_pair_once_and_no_node_twice_in_a_round():
    from gpudeck.train.workloads.doctor import rounds

    for count in range(1, 10):
        ranks = list(range(count))
        plan = rounds(ranks)
        met = [pair for round_ in plan for pair in round_]
        assert sorted(met) == [(a, b) for a in ranks for b in ranks if a < b]
        assert all(len({r for pair in round_ for r in pair}) == 2 * len(round_) for round_ in plan)
        assert len(plan) == (count - 1 if count % 2 == 0 else count)


def test_a_step_one_pipeline_stage_has_saved_is_not_a_whole_checkpoint(tmp_path: Path):
    """The killed-run test waited for any file of step 100 and once killed the run between the two
    stages' saves: it then resumed from step 50."""
    for name in ("stage-0-00000050", "stage-1-00000050", "stage-0-00000100"):
        (tmp_path / f"pipeline-f00d-{name}.pt").write_bytes(b"")
    assert whole_checkpoint_steps(tmp_path) == [50]
    (tmp_path / "pipeline-f00d-stage-1-00000100.pt").write_bytes(b"")
    assert sorted(whole_checkpoint_steps(tmp_path)) == [50, 100]
