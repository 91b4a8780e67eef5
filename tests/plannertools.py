"""Builders for planner snapshots: short names for the cases tables and properties need."""

from dataclasses import replace

from troughfill.planner import (
    JobState,
    OnlineSignal,
    Plan,
    PoolPolicy,
    Quota,
    Snapshot,
    StopMode,
    WorkerState,
)

NOW = 100_000.0


def pool(capacity: int = 16, **overrides: object) -> PoolPolicy:
    base = PoolPolicy(
        capacity_gpus=capacity,
        headroom_gpus=1,
        scale_up_delay_seconds=0.0,
        min_useful_seconds=300.0,
        default_quota=Quota(max_gpus=1_000_000),
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def online(gpus: float = 0.0, age: float = 0.0, **overrides: object) -> OnlineSignal:
    return replace(OnlineSignal(gpus_in_use=gpus, observed_at=NOW - age), **overrides)  # type: ignore[arg-type]


def workers(
    count: int, *, ready: bool = True, started_at: float = NOW - 3600, prefix: str = "w", unsaved: int = 0
) -> tuple[WorkerState, ...]:
    return tuple(
        WorkerState(f"{prefix}{i}", started_at=started_at + i, ready=ready, unsaved_tokens=unsaved)
        for i in range(count)
    )


def job(
    key: str = "team-a/job", *, priority: int = 0, remaining: int = 1000, **overrides: object
) -> JobState:
    namespace = key.split("/", 1)[0]
    base = JobState(key=key, namespace=namespace, priority=priority, remaining_requests=remaining)
    return replace(base, **overrides)  # type: ignore[arg-type]


def snapshot(
    *jobs: JobState, pool_policy: PoolPolicy | None = None, signal: OnlineSignal | None = None
) -> Snapshot:
    return Snapshot(now=NOW, pool=pool_policy or pool(), online=signal or online(), jobs=jobs)


def at(moment: Snapshot, seconds: float) -> Snapshot:
    """The same snapshot `seconds` after NOW, with a signal read just then."""
    return replace(moment, now=NOW + seconds, online=replace(moment.online, observed_at=NOW + seconds))


def desired(plan: Plan) -> dict[str, int]:
    return {key: p.desired_workers for key, p in plan.jobs.items()}


def stop_modes(plan: Plan) -> dict[str, StopMode]:
    return {stop.worker: stop.mode for stop in plan.stops}
