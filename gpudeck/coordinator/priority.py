"""A pending job's priority: a weighted sum of factors, each from 0 to 1, as in Slurm's
priority/multifactor plugin. The scheduler serves pending jobs highest total first.

    total = W_fair_share * fair_share + W_age * age + W_priority * priority

- `fair_share`: Slurm's classic 2^(-U/S). U is the owner's part of the cluster's decayed usage (their
  decayed GPU-seconds over everyone's) and S the part of the cluster each person is due (1/n, equal
  shares among the n people who used GPUs lately or wait for them). Someone who used nothing scores 1,
  someone who used exactly their share 0.5, twice their share 0.25. A GPU-second used `a` seconds ago
  counts 2^(-a / half_life) (default half-life 7 days), so last month's week-long run weighs little and
  a person who has just been away is served first.
- `age`: how long the job has waited since it was submitted, over a cap (default 7 days), at most 1.
  Every waiting job rises with time, so no job starves behind people with more share.
- `priority`: the job's own `--priority`, -1000..1000, mapped linearly to 0..1 (0 gives 0.5).

Default weights, and why: fair share 10000, age 1000, priority 1000 (the proportions of Slurm's
documented example). Between people, fair share decides; `--priority` orders one person's own jobs
and moves a job past another person's only when their fair-share factors are within 0.1 of each
other; a week of waiting is worth the whole `--priority` range.

Pure: no I/O and no clock (callers pass `now`), standard library only, so the policy is tested with
properties and the coordinator decides how often to recompute (decayed usage is incremental:
`decayed_usage` continues an earlier result with only the records since then).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

WEEK = 7 * 86400.0
MAX_PRIORITY = 1000  # --priority runs from -MAX_PRIORITY to MAX_PRIORITY
FACTORS = ("fair_share", "age", "priority")  # the order `gpudeck show` lists them in


class Held(Protocol):
    """GPUs one attempt of a job held (`Store.held_gpus` gives these): `ended_at` None while held."""

    @property
    def owner(self) -> str: ...
    @property
    def gpus(self) -> int: ...
    @property
    def started_at(self) -> float: ...
    @property
    def ended_at(self) -> float | None: ...


@dataclass(frozen=True)
class Weights:
    """What each factor counts for in the total."""

    fair_share: float = 10000.0
    age: float = 1000.0
    priority: float = 1000.0


@dataclass(frozen=True)
class Factor:
    """One term of a job's total, as `sprio` shows it."""

    name: str
    value: float  # 0..1
    weight: float

    @property
    def contribution(self) -> float:
        return self.value * self.weight


@dataclass(frozen=True)
class Policy:
    """The cluster's priority settings: weights, the fair-share half-life and the age cap (seconds)."""

    weights: Weights = Weights()
    half_life: float = WEEK
    age_cap: float = WEEK

    def total(self, priority: int, submitted_at: float, fair_share: float, now: float) -> float:
        """The job's priority score: what the scheduler orders pending jobs by."""
        w = self.weights
        return (w.fair_share * fair_share + w.age * age_factor(submitted_at, now, self.age_cap)
                + w.priority * priority_factor(priority))

    def explain(self, priority: int, submitted_at: float, fair_share: float, now: float) -> tuple[Factor, ...]:
        """The factors of `total`, each with its value and weight (their contributions sum to it)."""
        w = self.weights
        return (Factor("fair_share", fair_share, w.fair_share),
                Factor("age", age_factor(submitted_at, now, self.age_cap), w.age),
                Factor("priority", priority_factor(priority), w.priority))


def priority_factor(priority: int) -> float:
    """--priority from -1000 to 1000 as 0..1 (values outside are clamped)."""
    return (max(-MAX_PRIORITY, min(MAX_PRIORITY, priority)) + MAX_PRIORITY) / (2 * MAX_PRIORITY)


def age_factor(submitted_at: float, now: float, cap: float) -> float:
    """The time waited over `cap`, from 0 (just submitted, or a clock that went back) to 1."""
    return min(1.0, max(0.0, now - submitted_at) / cap)


def fair_shares(usage: Mapping[str, float], people: Collection[str]) -> dict[str, float]:
    """Each person's fair-share factor 2^(-U/S) (see the module docstring): everyone in `usage` or
    `people` shares the cluster equally. A name in neither has used nothing: its factor is 1."""
    everyone = set(usage) | set(people)
    spent = sum(max(0.0, used) for used in usage.values())
    if not everyone or spent <= 0:
        return {name: 1.0 for name in everyone}
    return {name: 2.0 ** (-(max(0.0, usage.get(name, 0.0)) / spent) * len(everyone)) for name in everyone}


def decayed_usage(held: Iterable[Held], now: float, half_life: float, since: float | None = None,
                  before: Mapping[str, float] | None = None) -> dict[str, float]:
    """Each owner's GPU-seconds up to `now`, a second used `a` seconds ago counting 2^(-a/half_life).

    With `since`, only the time from `since` on is counted, and `before` (the result of a call at
    `since`, usage up to then) is decayed to `now` and added: the same result as counting every record
    from the start, since decay multiplies everything by the same factor, while the coordinator reads
    only the attempts that held GPUs since its last call (`Store.held_gpus(since)`)."""
    rate = math.log(2) / half_life
    carried = math.exp(-rate * max(0.0, now - since)) if since is not None else 0.0
    usage = {owner: used * carried for owner, used in (before or {}).items()}
    for record in held:
        start = record.started_at if since is None else max(record.started_at, since)
        end = now if record.ended_at is None else min(record.ended_at, now)
        if end <= start or record.gpus <= 0:
            continue
        # The integral of gpus * 2^(-(now - t)/half_life) dt over [start, end].
        weight = (math.exp(-rate * (now - end)) - math.exp(-rate * (now - start))) / rate
        usage[record.owner] = usage.get(record.owner, 0.0) + record.gpus * weight
    return usage


class Ledger:
    """Decayed usage and fair shares as of the last rescoring, carried to the next so that each
    reads only the attempts that held GPUs since (`decayed_usage` continues an earlier result).
    The caller decides when to rescore; every pending job's score is as of `scored_at`, so that
    scores compare at one instant."""

    def __init__(self, policy: Policy, horizon: float) -> None:
        """`horizon`: half-lives of history read the first time."""
        self.policy = policy
        self.horizon = horizon
        self.usage: dict[str, float] = {}  # each owner's decayed GPU-seconds as of `usage_at`
        self.usage_at: float | None = None
        self.shares: dict[str, float] = {}  # each owner's fair-share factor
        self.scored_at = -math.inf

    def since(self, now: float) -> float:
        """Where the records the next rescoring reads begin."""
        return self.usage_at if self.usage_at is not None else now - self.horizon * self.policy.half_life

    def rescore(self, held: Iterable[Held], people: Collection[str], now: float) -> None:
        """Continue the usage with `held` (the attempts since `since(now)`); `people`: who waits."""
        self.usage = decayed_usage(held, now, self.policy.half_life, self.since(now), self.usage)
        self.usage_at = self.scored_at = now
        self.shares = fair_shares(self.usage, people)
