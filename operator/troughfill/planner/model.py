"""What the planner sees and what it decides: plain frozen values, no I/O, no clock of its own.

Times are seconds on one monotonic-enough axis chosen by the caller (the operator passes wall
time, the simulator its own clock); the planner only ever subtracts them.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

from troughfill.api.batchpool import BatchPoolSpec, StalePolicy
from troughfill.api.types import parse_duration


class StopMode(StrEnum):
    DRAIN = "drain"
    """Finish in-flight requests within the grace period, then exit: nothing is redone."""
    YIELD = "yield"
    """Checkpoint partial generations and exit at once: online serving needs the GPUs now."""


class SignalState(StrEnum):
    FRESH = "Fresh"
    STALE = "Stale"
    MISSING = "Missing"


class Limit(StrEnum):
    """Why a job has fewer workers than it could use (reported in its status)."""

    NONE = "None"
    NO_TROUGH = "NoTrough"
    PRIORITY = "Priority"
    """Jobs of a higher priority class took the trough."""
    FAIR_SHARE = "FairShare"
    """Jobs of the same class share the trough."""
    QUOTA = "Quota"
    SCALE_UP_DELAY = "ScaleUpDelay"
    TROUGH_TOO_SHORT = "TroughTooShort"
    STALE_SIGNAL = "StaleSignal"
    WAITING_FOR_DRAIN = "WaitingForDrain"
    """Its GPUs are still held by workers finishing their in-flight requests."""


@dataclass(frozen=True, slots=True)
class WorkerState:
    name: str
    started_at: float
    ready: bool = True
    unsaved_tokens: int = 0
    """Tokens generated since the worker's last checkpoint: what a kill would throw away."""
    stopping: StopMode | None = None
    """Set once the worker has been told to stop; it still holds its GPUs until it exits."""


@dataclass(frozen=True, slots=True)
class JobState:
    key: str
    """namespace/name: unique, and the last tie-break everywhere."""
    namespace: str
    priority: int
    gpus_per_worker: int = 1
    min_workers: int = 0
    max_workers: int | None = None
    remaining_requests: int = 0
    """Requests not done yet (in-flight ones included); 0 means the job needs no workers."""
    remaining_tokens: float = 0.0
    """Estimated tokens still to generate, for the deadline check."""
    worker_tokens_per_second: float = 0.0
    """Estimated throughput of one ready worker; 0 when unknown (no deadline check then)."""
    deadline: float | None = None
    cold_start_seconds: float = 60.0
    workers: tuple[WorkerState, ...] = ()

    @property
    def active_workers(self) -> int:
        return sum(1 for w in self.workers if w.stopping is None)

    def worker_cap(self) -> int:
        """Workers this job could use at most (ignoring trough and quota)."""
        if self.remaining_requests <= 0:
            return 0
        cap = self.remaining_requests
        if self.max_workers is not None:
            cap = min(cap, self.max_workers)
        return cap

    def workers_for_deadline(self, now: float) -> int:
        """Workers that would finish the remaining tokens by the deadline (0: no deadline or no estimate)."""
        if self.deadline is None or self.worker_tokens_per_second <= 0 or self.remaining_tokens <= 0:
            return 0
        time_left = self.deadline - now - self.cold_start_seconds
        if time_left <= 0:
            return self.worker_cap()
        return math.ceil(self.remaining_tokens / (self.worker_tokens_per_second * time_left))


@dataclass(frozen=True, slots=True)
class Quota:
    max_gpus: int
    weight: int = 1


@dataclass(frozen=True, slots=True)
class PoolPolicy:
    capacity_gpus: int
    headroom_gpus: int = 1
    headroom_lend_gpus: int = 0
    """Of the headroom, GPUs that workers already running may keep while online moves into it
    (none starts there): online still finds headroom - lend GPUs free at once."""
    max_staleness_seconds: float = 30.0
    on_stale: StalePolicy = StalePolicy.YIELD
    floor_gpus: int = 0
    scale_up_delay_seconds: float = 60.0
    min_useful_seconds: float = 300.0
    pressure_release_gpus: int = 1
    """Extra GPUs left free while a pressure signal fires (online is queueing: it needs room now)."""
    quotas: Mapping[str, Quota] = field(default_factory=dict)
    default_quota: Quota | None = None
    """For namespaces `quotas` does not name; without it such namespaces get nothing."""

    def quota(self, namespace: str) -> Quota:
        return self.quotas.get(namespace) or self.default_quota or Quota(max_gpus=0)

    @classmethod
    def from_spec(cls, spec: BatchPoolSpec, capacity_gpus: int) -> "PoolPolicy":
        default = spec.default_quota
        return cls(
            capacity_gpus=capacity_gpus,
            headroom_gpus=spec.headroom_gpus,
            headroom_lend_gpus=spec.headroom_lend_gpus,
            max_staleness_seconds=parse_duration(spec.signal.max_staleness).total_seconds(),
            on_stale=spec.signal.on_stale,
            floor_gpus=spec.signal.floor_gpus,
            scale_up_delay_seconds=parse_duration(spec.scale_up_delay).total_seconds(),
            min_useful_seconds=parse_duration(spec.min_useful_time).total_seconds(),
            pressure_release_gpus=max(1, spec.headroom_gpus),
            quotas={q.namespace: Quota(q.max_gpus, q.weight) for q in spec.quotas},
            default_quota=Quota(default.max_gpus, default.weight) if default else None,
        )


@dataclass(frozen=True, slots=True)
class OnlineSignal:
    gpus_in_use: float | None
    """GPUs online serving holds, from Prometheus; None when the query gave nothing."""
    observed_at: float | None = None
    """When that value was read successfully."""
    pending_gpus: float = 0.0
    """GPUs requested by online pods the scheduler has not placed (from the cluster itself)."""
    pressure: bool = False
    """A pressure query (queue length, KV-cache use) is above its threshold."""


@dataclass(frozen=True, slots=True)
class Forecast:
    """Predicted online GPUs at future times, sorted by time (e.g. the same hour yesterday)."""

    points: tuple[tuple[float, float], ...]

    def peak(self, start: float, end: float) -> float | None:
        """The highest predicted online demand in [start, end]; None when no point falls there."""
        values = [gpus for at, gpus in self.points if start <= at <= end]
        return max(values) if values else None


@dataclass(frozen=True, slots=True)
class Snapshot:
    now: float
    pool: PoolPolicy
    online: OnlineSignal
    jobs: tuple[JobState, ...]
    forecast: Forecast | None = None


@dataclass(frozen=True, slots=True)
class PlannerMemory:
    """What the planner carries from one cycle to the next (the caller keeps it, the planner stays pure)."""

    fresh_since: float | None = None
    """Start of the current unbroken run of fresh signals."""
    budgets: tuple[tuple[float, int], ...] = ()
    """(time, budget) samples of the scale-up window, increasing budgets: the first is the minimum."""


class Stop(NamedTuple):
    """(A tuple: plans for thousands of jobs are built every cycle, and tuples build fastest.)"""

    job: str
    worker: str
    mode: StopMode


class JobPlan(NamedTuple):
    key: str
    desired_workers: int
    """Workers the job should run (not counting those stopping)."""
    starts: int
    stops: tuple[Stop, ...]
    at_risk: bool
    """The deadline is missed at the current pace (the job was favoured within its class)."""
    limit: Limit


@dataclass(frozen=True, slots=True)
class Plan:
    now: float
    signal: SignalState
    trough_gpus: int
    """capacity - online - pending - headroom right now (0 at least): what batch may grow into."""
    keep_gpus: int
    """What batch may keep: the trough plus what the pool lends of its headroom to running workers."""
    budget_gpus: int
    """What the plan let batch hold: the trough, held back by the scale-up delay and staleness."""
    batch_gpus: int
    """GPUs batch holds once the plan is carried out (running, starting and still draining)."""
    jobs: Mapping[str, JobPlan]
    stops: tuple[Stop, ...]
    """Every stop, the urgent (yield) ones first."""
    memory: PlannerMemory

    @property
    def starts(self) -> int:
        return sum(p.starts for p in self.jobs.values())
