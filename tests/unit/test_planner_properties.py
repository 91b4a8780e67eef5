"""The planner's invariants over random snapshots (hypothesis): whatever the jobs, quotas and
signals, these hold for every plan."""

from collections import defaultdict
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from tests.plannertools import NOW, at
from troughfill.api.batchpool import StalePolicy
from troughfill.planner import (
    Forecast,
    JobState,
    OnlineSignal,
    Plan,
    PlannerMemory,
    PoolPolicy,
    Quota,
    SignalState,
    Snapshot,
    StopMode,
    WorkerState,
    plan,
)
from troughfill.planner.plan import forecast_gpus, victim_order, whole_gpus

NAMESPACES = ("a", "b", "c")


@st.composite
def worker_states(draw: st.DrawFn, job_index: int) -> tuple[WorkerState, ...]:
    count = draw(st.integers(0, 6))
    return tuple(
        WorkerState(
            name=f"j{job_index}-w{i}",
            started_at=NOW - draw(st.integers(0, 7200)),
            ready=draw(st.booleans()),
            unsaved_tokens=draw(st.integers(0, 500)),
            stopping=draw(st.sampled_from([None, None, None, StopMode.DRAIN, StopMode.YIELD])),
        )
        for i in range(count)
    )


@st.composite
def job_states(draw: st.DrawFn, index: int, single_class: bool) -> JobState:
    namespace = draw(st.sampled_from(NAMESPACES))
    max_workers = draw(st.none() | st.integers(1, 12))
    return JobState(
        key=f"{namespace}/job{index}",
        namespace=namespace,
        priority=0 if single_class else draw(st.sampled_from([0, 10, 20])),
        gpus_per_worker=draw(st.sampled_from([1, 1, 2, 4])),
        min_workers=draw(st.integers(0, 3)) if max_workers is None else draw(st.integers(0, max_workers)),
        max_workers=max_workers,
        remaining_requests=draw(st.integers(0, 40)),
        remaining_tokens=draw(st.floats(0, 1e6)),
        worker_tokens_per_second=draw(st.sampled_from([0.0, 50.0, 500.0])),
        deadline=draw(st.none() | st.floats(NOW - 100, NOW + 86_400)),
        cold_start_seconds=draw(st.sampled_from([10.0, 60.0, 120.0])),
        workers=draw(worker_states(index)),
    )


@st.composite
def snapshots(draw: st.DrawFn, single_class: bool = False) -> Snapshot:
    capacity = draw(st.integers(0, 48))
    quotas = {
        ns: Quota(max_gpus=draw(st.integers(0, 40)), weight=draw(st.integers(1, 5)))
        for ns in NAMESPACES
        if draw(st.booleans())
    }
    default = draw(st.none() | st.builds(Quota, st.integers(0, 40), st.integers(1, 5)))
    headroom = draw(st.integers(0, 3))
    pool = PoolPolicy(
        capacity_gpus=capacity,
        headroom_gpus=headroom,
        headroom_lend_gpus=draw(st.integers(0, headroom)),
        max_staleness_seconds=30.0,
        on_stale=draw(st.sampled_from(list(StalePolicy))),
        floor_gpus=draw(st.integers(0, 8)),
        scale_up_delay_seconds=draw(st.sampled_from([0.0, 30.0, 60.0])),
        min_useful_seconds=draw(st.sampled_from([0.0, 300.0])),
        pressure_release_gpus=draw(st.integers(1, 2)),
        quotas=quotas,
        default_quota=default,
    )
    signal = OnlineSignal(
        gpus_in_use=draw(st.none() | st.floats(0, capacity + 4)),
        observed_at=NOW - draw(st.sampled_from([0.0, 5.0, 29.0, 31.0, 600.0])),
        pending_gpus=draw(st.sampled_from([0.0, 0.0, 1.0, 3.5])),
        pressure=draw(st.booleans()),
    )
    forecast = None
    if draw(st.booleans()):
        forecast = Forecast(
            points=tuple((NOW + 60.0 * i, draw(st.floats(0, capacity + 2))) for i in range(8))
        )
    jobs = tuple(draw(job_states(i, single_class)) for i in range(draw(st.integers(0, 7))))
    return Snapshot(now=NOW, pool=pool, online=signal, jobs=jobs, forecast=forecast)


def gpus_by_namespace(result: Plan, snapshot: Snapshot) -> dict[str, int]:
    totals: dict[str, int] = defaultdict(int)
    for job in snapshot.jobs:
        totals[job.namespace] += result.jobs[job.key].desired_workers * job.gpus_per_worker
    return totals


def held(snapshot: Snapshot) -> int:
    return sum(len(j.workers) * j.gpus_per_worker for j in snapshot.jobs)


@given(snapshots())
def test_batch_never_exceeds_capacity_minus_online_minus_headroom(snapshot: Snapshot) -> None:
    result = plan(snapshot)
    pool, online = snapshot.pool, snapshot.online
    desired = sum(result.jobs[j.key].desired_workers * j.gpus_per_worker for j in snapshot.jobs)
    assert desired <= result.budget_gpus <= result.keep_gpus
    assert result.trough_gpus <= result.keep_gpus
    assert result.batch_gpus <= result.keep_gpus
    if result.starts:
        # nobody starts into the headroom, lent or not
        assert result.batch_gpus <= result.trough_gpus
    if result.signal is SignalState.FRESH:
        assert online.gpus_in_use is not None
        assert result.trough_gpus <= max(
            0,
            pool.capacity_gpus
            - whole_gpus(online.gpus_in_use)
            - whole_gpus(online.pending_gpus)
            - pool.headroom_gpus,
        )
        # what is lent leaves online headroom - lend GPUs free at once
        assert result.keep_gpus <= max(
            result.trough_gpus,
            pool.capacity_gpus
            - whole_gpus(online.gpus_in_use)
            - (pool.headroom_gpus - pool.headroom_lend_gpus),
        )
    else:
        assert result.keep_gpus == result.trough_gpus
        if pool.on_stale is StalePolicy.YIELD:
            assert result.batch_gpus <= pool.floor_gpus
        else:
            assert result.batch_gpus <= held(snapshot)


@given(snapshots())
def test_quotas_and_worker_caps_are_never_exceeded(snapshot: Snapshot) -> None:
    result = plan(snapshot)
    for namespace, gpus in gpus_by_namespace(result, snapshot).items():
        assert gpus <= snapshot.pool.quota(namespace).max_gpus
    for job in snapshot.jobs:
        decided = result.jobs[job.key]
        assert 0 <= decided.desired_workers <= job.worker_cap()
        assert decided.starts <= max(0, decided.desired_workers - job.active_workers)


@given(snapshots())
def test_strict_priority_between_classes(snapshot: Snapshot) -> None:
    """A job short of workers could not get one more by taking every GPU of every lower class."""
    result = plan(snapshot)
    used = sum(result.jobs[j.key].desired_workers * j.gpus_per_worker for j in snapshot.jobs)
    left = result.budget_gpus - used
    by_namespace = gpus_by_namespace(result, snapshot)
    for high in snapshot.jobs:
        decided = result.jobs[high.key]
        if decided.desired_workers >= high.worker_cap():
            continue
        lower = [j for j in snapshot.jobs if j.priority < high.priority]
        lower_gpus = sum(result.jobs[j.key].desired_workers * j.gpus_per_worker for j in lower)
        lower_same_namespace = sum(
            result.jobs[j.key].desired_workers * j.gpus_per_worker
            for j in lower
            if j.namespace == high.namespace
        )
        quota_left = snapshot.pool.quota(high.namespace).max_gpus - by_namespace[high.namespace]
        assert min(left + lower_gpus, quota_left + lower_same_namespace) < high.gpus_per_worker


@given(snapshots(single_class=True))
def test_weighted_fair_share_within_a_class_up_to_one_worker(snapshot: Snapshot) -> None:
    """Within one class and without minimums or deadlines, a namespace short of workers is never
    behind another by more than one worker each, per weight."""
    snapshot = replace(
        snapshot,
        jobs=tuple(replace(j, min_workers=0, deadline=None, gpus_per_worker=1) for j in snapshot.jobs),
    )
    result = plan(snapshot)
    shares = gpus_by_namespace(result, snapshot)
    used = sum(shares.values())
    for short in {j.namespace for j in snapshot.jobs}:
        wanted = sum(j.worker_cap() for j in snapshot.jobs if j.namespace == short)
        quota = snapshot.pool.quota(short)
        if shares[short] >= min(wanted, quota.max_gpus) or result.budget_gpus > used:
            continue  # satisfied, or the trough was not the limit
        for other in shares:
            other_weight = snapshot.pool.quota(other).weight
            assert (shares[other] - 1) / other_weight <= (shares[short] + 1) / quota.weight


@given(snapshots())
def test_victims_are_never_dearer_than_the_workers_kept(snapshot: Snapshot) -> None:
    result = plan(snapshot)
    for job in snapshot.jobs:
        stopped = {s.worker for s in result.jobs[job.key].stops}
        victims = [w for w in job.workers if w.name in stopped and w.stopping is None]
        kept = [w for w in job.workers if w.name not in stopped and w.stopping is None]
        if victims and kept:
            assert max(victim_order(w) for w in victims) < min(victim_order(w) for w in kept)


@given(snapshots())
def test_yield_only_when_online_needs_the_gpus(snapshot: Snapshot) -> None:
    result = plan(snapshot)
    yielded = sum(
        j.gpus_per_worker for j in snapshot.jobs for s in result.jobs[j.key].stops if s.mode is StopMode.YIELD
    )
    if yielded:
        # without these yields batch would hold more than it may keep
        assert result.batch_gpus + yielded > result.keep_gpus
    for stop in result.stops:
        worker = next(w for j in snapshot.jobs for w in j.workers if w.name == stop.worker)
        assert worker.stopping is not StopMode.YIELD  # never told twice
        assert not (worker.stopping is StopMode.DRAIN and stop.mode is StopMode.DRAIN)


@given(snapshots())
def test_no_start_into_a_trough_forecast_to_close(snapshot: Snapshot) -> None:
    result = plan(snapshot)
    if snapshot.forecast is None:
        return
    kept = sum(
        min(result.jobs[j.key].desired_workers, j.active_workers) * j.gpus_per_worker for j in snapshot.jobs
    )
    added = 0
    for job in sorted(snapshot.jobs, key=lambda j: (-j.priority, j.key)):
        starts = result.jobs[job.key].starts
        if not starts:
            continue
        added += starts * job.gpus_per_worker
        horizon = job.cold_start_seconds + snapshot.pool.min_useful_seconds
        peak = snapshot.forecast.peak(NOW, NOW + horizon)
        if peak is not None:
            room = snapshot.pool.capacity_gpus - forecast_gpus(peak) - snapshot.pool.headroom_gpus
            assert kept + added <= room


@given(snapshots())
def test_deterministic_whatever_the_order_of_jobs_and_workers(snapshot: Snapshot) -> None:
    shuffled = replace(
        snapshot, jobs=tuple(replace(j, workers=tuple(reversed(j.workers))) for j in reversed(snapshot.jobs))
    )
    assert plan(snapshot) == plan(shuffled)


@given(
    st.lists(st.integers(0, 20), min_size=5, max_size=40),
    st.sampled_from([0.0, 20.0, 60.0]),
)
def test_scale_up_waits_for_the_delay_scale_down_is_immediate(online_series: list[int], delay: float) -> None:
    """Replay an online series every 10 s, the workers doing what the plan says at once."""
    pool = PoolPolicy(
        capacity_gpus=24, headroom_gpus=1, scale_up_delay_seconds=delay, default_quota=Quota(1000)
    )
    memory = PlannerMemory()
    running = 0
    troughs: list[tuple[float, int]] = []
    for step, online_gpus in enumerate(online_series):
        t = 10.0 * step
        snapshot = at(
            Snapshot(
                now=NOW,
                pool=pool,
                online=OnlineSignal(gpus_in_use=float(online_gpus), observed_at=NOW),
                jobs=(
                    JobState(
                        key="a/j",
                        namespace="a",
                        priority=0,
                        remaining_requests=1000,
                        workers=tuple(WorkerState(f"w{i}", started_at=NOW) for i in range(running)),
                    ),
                ),
            ),
            t,
        )
        result = plan(snapshot, memory)
        memory = result.memory
        trough = max(0, 24 - online_gpus - 1)
        troughs.append((t, trough))
        assert result.batch_gpus <= trough  # down: at once
        after = result.jobs["a/j"].desired_workers
        if after > running:
            # up: only as far as the trough has stayed for the whole delay
            window = [b for at_time, b in troughs if at_time >= t - delay]
            assert t >= delay
            assert after <= min(window)
        running = after
