"""Accounting: GPU time, waits and energy per user and per job, as `gpudeck usage` and the
dashboard's people view show them (like Slurm's `sreport` and `sshare`).

GPU time comes from the store's record of what each attempt held (`Store.held_gpus`: its GPU
count, when it started and when it gave the GPUs back), clipped to the window asked for: an attempt
running across `since` counts only from `since`, so the figures of two adjacent windows add up to
those of the window they make. `usage_view` is a pure function of those records, the job rows and
the energy figures, tested without sockets.

Energy: agents report each GPU's cumulative energy counter (NVML's, or a simulated one) with their
telemetry. `EnergyMeter` charges the growth of a counter between two reports to the attempt that
holds that GPU, in memory, and writes the sums to the store at a bounded rate (as `TrafficBook`
does for traffic). An attempt only partly inside the window is charged the same fraction of its
energy as of its GPU time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gpudeck.coordinator.store import HeldGpus, JobRow, Store
from gpudeck.protocol.payloads import MAX_USAGE_JOBS, GpuReading, JobUsage, UsageView, UserUsage

PERSIST_EVERY = 5.0
Energy = dict[tuple[int, int], tuple[int, bool]]  # (job, attempt) -> (millijoules, any of it simulated)


class EnergyMeter:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._unwritten: dict[tuple[int, int], tuple[int, bool]] = {}
        self._persisted_at = 0.0

    def record(self, before: list[GpuReading], after: list[GpuReading], held: dict[int, tuple[int, int]],
               simulated: bool) -> None:
        """Charge what each held GPU's counter grew by between two reports of one node; `held` maps
        a GPU index to the (job, attempt) holding it. A counter that went back (the driver or the
        simulated agent restarted) charges nothing for that interval."""
        previous = {gpu.index: gpu.energy_mj for gpu in before}
        for gpu in after:
            key, old = held.get(gpu.index), previous.get(gpu.index)
            if key is None or gpu.energy_mj is None or old is None or gpu.energy_mj < old:
                continue
            millijoules, was_simulated = self._unwritten.get(key, (0, False))
            self._unwritten[key] = (millijoules + gpu.energy_mj - old, was_simulated or simulated)

    def persist(self, now: float) -> None:
        """Write what was charged, at most once every PERSIST_EVERY seconds."""
        if self._unwritten and now - self._persisted_at >= PERSIST_EVERY:
            self.flush()
            self._persisted_at = now

    def flush(self) -> None:
        """Write what was charged now (the coordinator stops)."""
        if not self._unwritten:
            return
        self.store.add_energy([(job, attempt, mj, sim) for (job, attempt), (mj, sim) in self._unwritten.items()])
        self._unwritten = {}

    def energy(self, job_ids: list[int]) -> Energy:
        """What these jobs' attempts used, written or not."""
        found = self.store.energy(job_ids)
        wanted = set(job_ids)
        for key, (millijoules, simulated) in self._unwritten.items():
            if key[0] in wanted:
                stored, was_simulated = found.get(key, (0, False))
                found[key] = (stored + millijoules, was_simulated or simulated)
        return found


@dataclass
class _Tally:
    """One job's figures within the window, as they are summed."""

    gpus: int = 0
    attempts: int = 0
    seconds: list[float] = field(default_factory=list)
    first_start: float | None = None  # its first attempt's start, when inside the window
    joules: list[float] = field(default_factory=list)
    simulated: bool = False


def usage_view(held: list[HeldGpus], jobs: dict[int, JobRow], energy: Energy, since: float | None, now: float,
               user: str | None = None, until: float | None = None) -> UsageView:
    """The figures from `since` (None: ever) to `until` (default `now`, the time `held` was read at,
    up to which open attempts count and their energy was measured); only `user`'s jobs when given,
    each user's share still of the whole cluster's GPU time."""
    end = now if until is None else until
    tallies = _tallies(held, energy, since, now, end)
    rows = {job_id: _job_usage(job_id, jobs.get(job_id), tally) for job_id, tally in tallies.items()}
    total = math.fsum(row.gpu_seconds for row in rows.values())
    users = [_user_usage(name, [r for r in rows.values() if r.owner == name], total)
             for name in sorted({row.owner for row in rows.values()})]
    if user is not None:
        rows = {job_id: row for job_id, row in rows.items() if row.owner == user}
        users = [row for row in users if row.user == user]
    chosen = sorted(rows.values(), key=lambda row: (-row.gpu_seconds, row.id))
    seconds = math.fsum(row.gpu_seconds for row in chosen)
    joules = [row.energy_j for row in chosen if row.energy_j is not None]
    return UsageView(since=since, until=end, user=user, jobs=len(chosen), gpu_seconds=seconds,
                     gpu_hours=seconds / 3600, mean_wait_s=_mean([row.wait_s for row in chosen]),
                     energy_j=math.fsum(joules) if joules else None,
                     energy_simulated=any(row.energy_simulated for row in chosen),
                     users=sorted(users, key=lambda row: (-row.gpu_seconds, row.user)),
                     by_job=chosen[:MAX_USAGE_JOBS], jobs_left_out=max(0, len(chosen) - MAX_USAGE_JOBS))


def _tallies(held: list[HeldGpus], energy: Energy, since: float | None, now: float, end: float) -> dict[int, _Tally]:
    """Each job's attempts that held GPUs within [since, end]."""
    tallies: dict[int, _Tally] = {}
    for attempt in held:
        ended = now if attempt.ended_at is None else attempt.ended_at
        if attempt.started_at > end or (since is not None and ended < since):
            continue
        tally = tallies.setdefault(attempt.job, _Tally())
        inside = attempt.gpu_seconds(end, since)
        tally.gpus = max(tally.gpus, attempt.gpus)
        tally.attempts += 1
        tally.seconds.append(inside)
        if attempt.attempt == 1 and (since is None or attempt.started_at >= since):
            tally.first_start = attempt.started_at
        used = energy.get((attempt.job, attempt.attempt))
        if used is not None:
            whole = attempt.gpu_seconds(now)
            # An attempt of no length belongs to the window (since, end] its instant is in, so that
            # windows that split a span share its energy without counting it twice.
            instant = (since is None or attempt.started_at > since) and attempt.started_at <= end
            tally.joules.append(used[0] / 1000 * (inside / whole if whole > 0 else float(instant)))
            tally.simulated |= used[1]
    return tallies


def _job_usage(job_id: int, row: JobRow | None, tally: _Tally) -> JobUsage:
    seconds = math.fsum(tally.seconds)
    wait = tally.first_start - row.submitted_at if tally.first_start is not None and row is not None else None
    return JobUsage(id=job_id, name=row.spec.name if row else "", owner=row.owner if row else "",
                    state=row.state.value if row else "", gpus=tally.gpus, attempts=tally.attempts,
                    gpu_seconds=seconds, gpu_hours=seconds / 3600, wait_s=wait,
                    energy_j=math.fsum(tally.joules) if tally.joules else None, energy_simulated=tally.simulated)


def _user_usage(name: str, rows: list[JobUsage], total: float) -> UserUsage:
    seconds = math.fsum(row.gpu_seconds for row in rows)
    joules = [row.energy_j for row in rows if row.energy_j is not None]
    return UserUsage(user=name, jobs=len(rows), gpu_seconds=seconds, gpu_hours=seconds / 3600,
                     share=seconds / total if total > 0 else 0.0, mean_wait_s=_mean([row.wait_s for row in rows]),
                     energy_j=math.fsum(joules) if joules else None,
                     energy_simulated=any(row.energy_simulated for row in rows))


def _mean(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return math.fsum(known) / len(known) if known else None
