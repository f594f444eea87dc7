"""The learning task every built-in workload trains: classify the points of three interleaved spirals.

A real, non-linear classification problem (after Lang and Witbrock's two-spirals benchmark) that
needs no download: the 4,096 training points and 512 evaluation points are generated from the seed.
A plain MLP with tanh activations learns it with SGD: the evaluation cross-entropy falls steadily
from about 1.2 (ln 3 = 1.1 is chance) to 0.5 in 100 steps of 64 points and to 0.2 in 300, which
take about a second on one CPU core.

Everything here is a pure function of the :class:`Config` and the step number, with no hidden
random state, so that every rank of every workload, and a single process, draw the same
parameters and the same batches. That is what lets the tests compare the distributed workloads
with :func:`train_reference` (one process, one model, the whole batch) to 1e-5 or better.

The batch of step ``t`` is ``batch_size`` points drawn with replacement by a generator seeded from
``(seed, t)``; distributed workloads split it into equal contiguous shards (:func:`shard`) or
micro-batches (:func:`micro_batches`).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from gpudeck.train.workloads.options import DTYPE_NAMES, Config

CLASSES = 3
TRAIN_POINTS = 4096
EVAL_POINTS = 512
INPUTS = 2
TANH_GAIN = 5 / 3
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def torch_dtype(config: Config) -> torch.dtype:
    """The torch type of the model's parameters and activations."""
    return DTYPES[config.dtype]


def spirals(points: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``points`` noisy points of CLASSES spiral arms (inputs in float64, labels in int64).

    Bit for bit the same in every process: the angles are float64 whatever torch's default dtype,
    and their cosines and sines come from the C library one point at a time. torch's vectorised
    ``cos``/``sin`` compute a vector's body and its tail with different code (SIMD and scalar), so
    an element's last bit depends on how the call was cut into pieces (threads, SIMD width), and
    ranks that build the data on their own must agree on every bit."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(CLASSES, (points,), generator=generator)
    radius = torch.rand(points, generator=generator, dtype=torch.float64)
    angle = radius * 2 * math.pi + labels.to(torch.float64) * (2 * math.pi / CLASSES)
    turns = angle.tolist()
    arms = torch.tensor([[math.cos(a) for a in turns], [math.sin(a) for a in turns]], dtype=torch.float64).T
    inputs = 2 * radius[:, None] * arms
    inputs += 0.1 * torch.randn(points, INPUTS, generator=generator, dtype=torch.float64)
    return inputs, labels


class Data:
    """The training and evaluation sets, on ``device`` in the model's dtype."""

    def __init__(self, config: Config, device: torch.device | str = "cpu") -> None:
        self.config = config
        inputs, labels = spirals(TRAIN_POINTS, config.seed)
        self.inputs, self.labels = inputs.to(device, torch_dtype(config)), labels.to(device)
        eval_inputs, eval_labels = spirals(EVAL_POINTS, config.seed + 1_000_003)
        self.eval_inputs, self.eval_labels = eval_inputs.to(device, torch_dtype(config)), eval_labels.to(device)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole batch of ``step``: ``batch_size`` inputs and their labels."""
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_000_007 + step)
        index = torch.randint(TRAIN_POINTS, (self.config.batch_size,), generator=generator)
        index = index.to(self.inputs.device)
        return self.inputs[index], self.labels[index]


def shard(batch: tuple[torch.Tensor, torch.Tensor], index: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shard ``index`` of ``count`` equal contiguous shards of a batch (its size must divide)."""
    inputs, labels = batch
    size = inputs.shape[0] // count
    return inputs[index * size:(index + 1) * size], labels[index * size:(index + 1) * size]


def micro_batch_sizes(batch_size: int, count: int) -> list[int]:
    """How ``torch.tensor_split`` cuts ``batch_size`` rows into ``count`` micro-batches."""
    return [len(part) for part in torch.arange(batch_size).tensor_split(count)]


def micro_batches(tensor: torch.Tensor, count: int) -> tuple[torch.Tensor, ...]:
    """``tensor`` cut into ``count`` micro-batches along its first dimension."""
    return tensor.tensor_split(count)


def build_model(config: Config) -> nn.Sequential:
    """The MLP: ``layers`` Linear layers (2 -> hidden -> ... -> hidden -> 3), tanh between them.

    Initialised from ``config.seed`` (Glorot uniform, gain 5/3, zero biases) in float32 and then
    converted, so every dtype starts from the same values. Module names are the indices of a flat
    ``nn.Sequential`` ("0", "1", ...), which the pipeline's stages keep, so stage state dicts merge
    into the whole model's.
    """
    if config.layers < 2:
        raise ValueError("--layers must be at least 2")
    widths = [INPUTS] + [config.hidden] * (config.layers - 1) + [CLASSES]
    modules: list[nn.Module] = []
    generator = torch.Generator().manual_seed(config.seed)
    for layer in range(config.layers):
        linear = nn.Linear(widths[layer], widths[layer + 1], dtype=torch.float32)
        with torch.no_grad():  # Glorot's uniform init with tanh's gain: no plateau at the start
            bound = TANH_GAIN * math.sqrt(6 / (widths[layer] + widths[layer + 1]))
            draw = torch.rand(linear.weight.shape, generator=generator, dtype=torch.float32)
            linear.weight.copy_(draw * 2 * bound - bound)
            linear.bias.zero_()
        modules.append(linear)
        if layer < config.layers - 1:
            modules.append(nn.Tanh())
    return nn.Sequential(*modules).to(torch_dtype(config))


def stage_bounds(layers: int, stages: int) -> list[tuple[int, int]]:
    """Module index ranges of each pipeline stage: Linear layers spread as evenly as possible,
    each with the tanh after it, so every stage boundary carries a ``hidden``-wide activation."""
    if not 1 <= stages <= layers:
        raise ValueError(f"a pipeline of {stages} stages needs at least {stages} layers (--layers)")
    per = [layers // stages + (1 if s < layers % stages else 0) for s in range(stages)]
    bounds, first = [], 0
    for count in per:
        last = first + count  # Linear layers [first, last)
        bounds.append((2 * first, min(2 * last, 2 * layers - 1)))
        first = last
    return bounds


def stage_module(model: nn.Sequential, bounds: tuple[int, int]) -> nn.Sequential:
    """The modules of one stage, keeping their names in the whole model."""
    first, last = bounds
    return nn.Sequential(OrderedDict((str(i), model[i]) for i in range(first, last)))


def loss_fn(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of a batch."""
    return nn.functional.cross_entropy(outputs, labels)


def grad_of(tensor: torch.Tensor) -> torch.Tensor:
    """The gradient a backward just left in `tensor` (torch types `.grad` as maybe None: it is, before one)."""
    assert tensor.grad is not None
    return tensor.grad


def parameter_count(config: Config) -> int:
    """Number of parameters of the model."""
    widths = [INPUTS] + [config.hidden] * (config.layers - 1) + [CLASSES]
    return sum(widths[i] * widths[i + 1] + widths[i + 1] for i in range(config.layers))


def make_optimizer(parameters, config: Config) -> torch.optim.SGD:  # noqa: ANN001 - an iterable of tensors
    """Plain SGD with momentum: every workload and the reference use exactly this."""
    return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum)


@torch.no_grad()
def eval_loss(model: nn.Module, data: Data) -> float:
    """The loss on the evaluation set."""
    return loss_fn(model(data.eval_inputs), data.eval_labels).item()


def train_reference(config: Config, steps: int,
                    device: torch.device | str = "cpu") -> tuple[nn.Sequential, list[float]]:
    """Single-process SGD on the whole batch of every step: what every workload must equal."""
    data = Data(config, device)
    model = build_model(config).to(device)
    optimizer = make_optimizer(model.parameters(), config)
    losses = []
    for step in range(steps):
        inputs, labels = data.batch(step)
        loss = loss_fn(model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model, losses
