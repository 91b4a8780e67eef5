"""The trough-filling decision: one pure function from a snapshot to desired workers and stops.

Order of business, each step bounded by the previous one:
1. The trough: capacity - online in use - online pending - headroom (- more under pressure).
   A stale or missing signal replaces it by the floor (Yield) or by what batch holds (Hold).
   Running workers may keep what the pool lends of its headroom (none start into it).
2. The budget: the trough, except that growth waits until the trough has lasted the scale-up
   delay (the minimum over that window); shrinking is never delayed.
3. Allocation, class by class in strict priority order: minimum workers, then workers that
   jobs with a deadline at risk need, then weighted fair share between namespaces (quota
   weights) and equal shares between a namespace's jobs, in whole workers; quotas always hold.
4. Victims for jobs above their allocation: cheapest first (not ready, least unsaved work,
   most recently started). They drain, unless online needs their GPUs now: then they yield.
5. Starts for jobs below it, only onto GPUs nobody holds (draining workers still do) and only
   when the forecast trough outlasts the job's cold start plus the minimum useful time.
"""

import heapq
import math
from collections import defaultdict

from troughfill.api.batchpool import StalePolicy
from troughfill.planner.fairshare import fill_levels
from troughfill.planner.model import (
    JobPlan,
    JobState,
    Limit,
    Plan,
    PlannerMemory,
    PoolPolicy,
    SignalState,
    Snapshot,
    Stop,
    StopMode,
    WorkerState,
)

_EPSILON = 1e-9


def signal_state(snapshot: Snapshot) -> SignalState:
    online = snapshot.online
    if online.gpus_in_use is None or online.observed_at is None:
        return SignalState.MISSING
    if snapshot.now - online.observed_at > snapshot.pool.max_staleness_seconds:
        return SignalState.STALE
    return SignalState.FRESH


def whole_gpus(value: float) -> int:
    """GPUs are whole: 3.2 GPUs in use occupy 4 (tolerating float noise)."""
    return max(0, math.ceil(value - _EPSILON))


def trough_gpus(snapshot: Snapshot, state: SignalState, holding: int) -> int:
    pool, online = snapshot.pool, snapshot.online
    free_of_pending = pool.capacity_gpus - whole_gpus(online.pending_gpus) - pool.headroom_gpus
    if state is SignalState.FRESH:
        assert online.gpus_in_use is not None
        trough = free_of_pending - whole_gpus(online.gpus_in_use)
        if online.pressure:
            trough -= pool.pressure_release_gpus
    elif pool.on_stale is StalePolicy.HOLD:
        trough = min(holding, free_of_pending)
    else:
        trough = min(pool.floor_gpus, free_of_pending)
    return max(0, trough)


def lendable_gpus(snapshot: Snapshot, state: SignalState, trough: int) -> int:
    """What batch may keep: the trough plus the headroom GPUs the pool lends to running workers.

    Lent only on a fresh signal, while online has no pending pods and no pressure, and only
    while the forecast (when there is one) predicts no rise over the minimum useful time: a
    rise the forecast sees coming would take the lent GPUs back from under running workers."""
    pool, online = snapshot.pool, snapshot.online
    if (
        pool.headroom_lend_gpus <= 0
        or state is not SignalState.FRESH
        or online.pressure
        or whole_gpus(online.pending_gpus) > 0
    ):
        return trough
    assert online.gpus_in_use is not None
    if snapshot.forecast is not None:
        peak = snapshot.forecast.peak(snapshot.now, snapshot.now + pool.min_useful_seconds)
        if peak is not None and forecast_gpus(peak) > whole_gpus(online.gpus_in_use):
            return trough
    free = pool.capacity_gpus - whole_gpus(online.gpus_in_use)
    return max(trough, free - (pool.headroom_gpus - min(pool.headroom_lend_gpus, pool.headroom_gpus)))


def remember(
    memory: PlannerMemory, now: float, state: SignalState, trough: int, delay: float
) -> PlannerMemory:
    """Slide the scale-up window: keep samples of the last `delay` seconds as a monotonic queue."""
    if state is not SignalState.FRESH:
        return PlannerMemory()
    fresh_since = memory.fresh_since if memory.fresh_since is not None else now
    kept = [(at, budget) for at, budget in memory.budgets if at >= now - delay and budget < trough]
    kept.append((now, trough))
    return PlannerMemory(fresh_since=fresh_since, budgets=tuple(kept))


def growth_cap(memory: PlannerMemory, now: float, delay: float) -> int | None:
    """The lowest trough of the scale-up window; None while the signal has not been fresh that long."""
    if memory.fresh_since is None or now - memory.fresh_since < delay or not memory.budgets:
        return None
    return memory.budgets[0][1]


def victim_order(worker: WorkerState) -> tuple[bool, int, float, str]:
    """Which of one job's workers to stop first: not ready yet, least unsaved work, most recently
    started. Unsaved work is what the worker says of itself (its heartbeat), so it orders only
    its own job's workers; between jobs, `yield_order` decides."""
    return (worker.ready, worker.unsaved_tokens, -worker.started_at, worker.name)


def yield_order(job: JobState, worker: WorkerState) -> tuple[int, bool, float, str, str]:
    """Which victim yields first across jobs: lowest priority, not ready yet, most recently
    started. Only what the operator itself knows (the priority it admitted, the pod's readiness
    and creation time): a job's workers report their unsaved work themselves, and a tenant
    reporting more than it has must not put another tenant's workers ahead of its own."""
    return (job.priority, worker.ready, -worker.started_at, job.key, worker.name)


class _Allocation:
    """Whole workers per job, class by class; mutable scratch space of one planning cycle."""

    def __init__(self, pool: PoolPolicy, budget: int, now: float, active: dict[str, int]) -> None:
        self.pool = pool
        self.now = now
        self.active = active
        self.weights: dict[str, int] = {}
        self.budget_left = budget
        self.quota_left: dict[str, int] = {}
        self.workers: dict[str, int] = {}
        self.caps: dict[str, int] = {}
        self.at_risk: set[str] = set()

    def quota(self, namespace: str) -> int:
        if namespace not in self.quota_left:
            self.quota_left[namespace] = self.pool.quota(namespace).max_gpus
        return self.quota_left[namespace]

    def weight(self, namespace: str) -> int:
        if namespace not in self.weights:
            self.weights[namespace] = self.pool.quota(namespace).weight
        return self.weights[namespace]

    def give(self, job: JobState, up_to: int) -> None:
        """Raise the job's workers towards `up_to` as far as budget, quota and cap allow."""
        have = self.workers[job.key]
        more = min(up_to, self.caps[job.key]) - have
        if more <= 0:
            return
        more = min(more, min(self.budget_left, self.quota(job.namespace)) // job.gpus_per_worker)
        if more:
            self.workers[job.key] = have + more
            self.budget_left -= more * job.gpus_per_worker
            self.quota_left[job.namespace] -= more * job.gpus_per_worker

    def allocate_class(self, jobs: list[JobState]) -> None:
        for job in jobs:
            self.workers[job.key] = 0
            self.caps[job.key] = job.worker_cap()
        for job in jobs:
            self.give(job, job.min_workers)
        by_namespace: dict[str, list[JobState]] = defaultdict(list)
        for job in jobs:
            by_namespace[job.namespace].append(job)
        needs = {job.key: job.workers_for_deadline(self.now) for job in jobs}
        fair: dict[str, float] | None = None
        if any(needs.values()):
            # At risk: its fair share, even rounded up, is below the workers its deadline needs.
            # Those get their needs first (earliest deadline first), the rest is shared as
            # usual. Judged against fair share, not against the workers it has now, or a job
            # would be favoured, catch up, lose the favour and fall behind again, cycle after cycle.
            fair = self.fair_targets(by_namespace)
            self.at_risk.update(
                j.key
                for j in jobs
                if needs[j.key] > self.workers[j.key]
                and needs[j.key] > math.ceil(fair[j.key] / j.gpus_per_worker - _EPSILON)
            )
            risky = sorted(
                (j for j in jobs if j.key in self.at_risk), key=lambda j: (j.deadline or 0.0, j.key)
            )
            for job in risky:
                self.give(job, needs[job.key])
            if risky:
                fair = None  # the favoured needs changed the floors: share anew
        self.share(by_namespace, fair)

    def fair_targets(self, by_namespace: dict[str, list[JobState]]) -> dict[str, float]:
        """Each job's (and namespace's) weighted max-min fair share in GPUs, continuous."""
        namespaces = sorted(by_namespace)
        floors, caps, weights = [], [], []
        for namespace in namespaces:
            group = by_namespace[namespace]
            have = sum(self.workers[j.key] * j.gpus_per_worker for j in group)
            wanted = sum((self.caps[j.key] - self.workers[j.key]) * j.gpus_per_worker for j in group)
            floors.append(float(have))
            caps.append(float(have + min(self.quota(namespace), wanted)))
            weights.append(float(self.weight(namespace)))
        targets: dict[str, float] = {}
        for namespace, target in zip(
            namespaces, fill_levels(floors, caps, weights, sum(floors) + self.budget_left), strict=True
        ):
            group = by_namespace[namespace]
            targets[namespace] = target  # namespaces and job keys ("ns/name") never collide
            job_targets = fill_levels(
                [float(self.workers[j.key] * j.gpus_per_worker) for j in group],
                [float(self.caps[j.key] * j.gpus_per_worker) for j in group],
                [1.0] * len(group),
                target,
            )
            targets.update((job.key, t) for job, t in zip(group, job_targets, strict=True))
        return targets

    def share(self, by_namespace: dict[str, list[JobState]], targets: dict[str, float] | None = None) -> None:
        """Weighted fair share of what is left between namespaces, equal between their jobs."""
        targets = targets if targets is not None else self.fair_targets(by_namespace)
        for group in by_namespace.values():
            for job in group:
                self.give(job, math.floor(targets[job.key] / job.gpus_per_worker + _EPSILON))
        self.hand_out_leftovers(by_namespace, targets)

    def hand_out_leftovers(self, by_namespace: dict[str, list[JobState]], targets: dict[str, float]) -> None:
        """Whole workers lost to rounding go one at a time to the job furthest below its share.

        A job already running one worker more than its rounded-down share keeps it first:
        otherwise rounding would move a worker between jobs whenever the trough moves a little,
        and every such move costs a cold start. The bonus is one worker at most per job, and
        only while its namespace is still below its own fair share."""
        namespace_gpus = {
            ns: sum(self.workers[j.key] * j.gpus_per_worker for j in group)
            for ns, group in by_namespace.items()
        }
        floors = {j.key: self.workers[j.key] for group in by_namespace.values() for j in group}

        def key(job: JobState) -> tuple[bool, float, int, int, str]:
            keeps_running = (
                self.workers[job.key] == floors[job.key] < self.active[job.key]
                and namespace_gpus[job.namespace] < targets[job.namespace] - _EPSILON
            )
            return (
                not keeps_running,
                namespace_gpus[job.namespace] / self.weight(job.namespace),
                self.workers[job.key],
                -self.active[job.key],
                job.key,
            )

        jobs = {j.key: j for group in by_namespace.values() for j in group}
        heap = [(key(j), j.key) for j in jobs.values() if self.workers[j.key] < self.caps[j.key]]
        heapq.heapify(heap)
        while heap and self.budget_left > 0:
            popped, job_key = heapq.heappop(heap)
            job = jobs[job_key]
            current = key(job)
            if current != popped:
                heapq.heappush(heap, (current, job_key))
                continue
            before = self.workers[job_key]
            self.give(job, before + 1)
            if self.workers[job_key] == before:
                continue  # does not fit (worker size, quota): it takes nothing more this cycle
            namespace_gpus[job.namespace] += job.gpus_per_worker
            if self.workers[job_key] < self.caps[job_key]:
                heapq.heappush(heap, (key(job), job_key))


def plan(snapshot: Snapshot, memory: PlannerMemory | None = None) -> Plan:
    memory = memory or PlannerMemory()
    now, pool = snapshot.now, snapshot.pool
    jobs = sorted(snapshot.jobs, key=lambda j: (-j.priority, j.key))

    active = {j.key: j.active_workers for j in jobs}
    active_gpus = sum(active[j.key] * j.gpus_per_worker for j in jobs)
    stopping: list[tuple[JobState, WorkerState]] = [
        (j, w) for j in jobs for w in j.workers if w.stopping is not None
    ]
    state = signal_state(snapshot)
    trough = trough_gpus(snapshot, state, active_gpus + sum(j.gpus_per_worker for j, _ in stopping))
    keep = lendable_gpus(snapshot, state, trough)
    memory = remember(memory, now, state, trough, pool.scale_up_delay_seconds)
    stable = growth_cap(memory, now, pool.scale_up_delay_seconds)
    # Workers already running stay up to what the pool lets batch keep; growth waits for the
    # trough to last the scale-up delay and never goes beyond the trough.
    budget = max(min(active_gpus, keep), min(trough, stable if stable is not None else 0))

    allocation = _Allocation(pool, budget, now, active)
    classes: dict[int, list[JobState]] = defaultdict(list)
    for job in jobs:
        classes[job.priority].append(job)
    limits: dict[str, Limit] = {}
    granted_higher = 0  # workers given to classes above the current one
    for priority in sorted(classes, reverse=True):
        members = classes[priority]
        allocation.allocate_class(members)
        granted_here = sum(allocation.workers[j.key] for j in members)
        for job in members:
            limits[job.key] = _limit(
                job,
                allocation,
                state=state,
                budget=budget,
                trough=trough,
                higher_took=granted_higher > 0,
                others_took=granted_here - allocation.workers[job.key] > 0,
            )
        granted_higher += granted_here

    ordered_stops, kept_gpus, draining_gpus, yielding_gpus = _choose_stops(jobs, allocation, stopping, keep)
    stops: dict[str, list[Stop]] = defaultdict(list)
    for stop in ordered_stops:
        stops[stop.job].append(stop)
    free = trough - kept_gpus - draining_gpus - yielding_gpus
    starts, running_total = _choose_starts(snapshot, jobs, allocation, limits, free=free, kept_gpus=kept_gpus)

    plans = {
        job.key: JobPlan(
            key=job.key,
            desired_workers=allocation.workers[job.key],
            starts=starts[job.key],
            stops=tuple(stops.get(job.key, ())),
            at_risk=job.key in allocation.at_risk,
            limit=limits[job.key],
        )
        for job in jobs
    }
    return Plan(
        now=now,
        signal=state,
        trough_gpus=trough,
        keep_gpus=keep,
        budget_gpus=budget,
        batch_gpus=running_total + draining_gpus,
        jobs=plans,
        stops=tuple(ordered_stops),
        memory=memory,
    )


def _choose_stops(
    jobs: list[JobState],
    allocation: _Allocation,
    stopping: list[tuple[JobState, WorkerState]],
    keep: int,
) -> tuple[list[Stop], int, int, int]:
    """Victims of jobs above their allocation, urgent (yield) ones first; they yield while batch
    holds more than it may keep. Also returns GPUs kept, still draining and yielding."""
    drains: list[tuple[JobState, WorkerState]] = []
    kept_gpus = 0
    for job in jobs:
        target = allocation.workers[job.key]
        running_count = allocation.active[job.key]
        kept_gpus += min(target, running_count) * job.gpus_per_worker
        if running_count > target:
            running = [w for w in job.workers if w.stopping is None]
            victims = heapq.nsmallest(running_count - target, running, key=victim_order)
            drains += [(job, w) for w in victims]
    drains += [(j, w) for j, w in stopping if w.stopping is StopMode.DRAIN]
    yielding_gpus = sum(j.gpus_per_worker for j, w in stopping if w.stopping is StopMode.YIELD)
    draining_gpus = sum(j.gpus_per_worker for j, _ in drains)
    excess = kept_gpus + draining_gpus - keep
    urgent: list[Stop] = []
    gentle: list[Stop] = []
    if excess > 0:
        # Online needs the GPUs now: lowest priority, cheapest first, yield instead of draining
        # (a worker already draining is told to yield instead).
        drains.sort(key=lambda jw: yield_order(*jw))
    for job, worker in drains:
        if excess > 0:
            excess -= job.gpus_per_worker
            draining_gpus -= job.gpus_per_worker
            yielding_gpus += job.gpus_per_worker
            urgent.append(Stop(job.key, worker.name, StopMode.YIELD))
        elif worker.stopping is None:
            gentle.append(Stop(job.key, worker.name, StopMode.DRAIN))
    return urgent + gentle, kept_gpus, draining_gpus, yielding_gpus


def _choose_starts(
    snapshot: Snapshot,
    jobs: list[JobState],
    allocation: _Allocation,
    limits: dict[str, Limit],
    *,
    free: int,
    kept_gpus: int,
) -> tuple[dict[str, int], int]:
    """New workers onto GPUs nobody holds, for troughs forecast to last long enough."""
    running_total = kept_gpus
    starts: dict[str, int] = {}
    for job in jobs:
        want = allocation.workers[job.key] - allocation.active[job.key]
        if want <= 0:
            starts[job.key] = 0
            continue
        allowed = free // job.gpus_per_worker
        lasting = _forecast_room(snapshot, job) - running_total
        if lasting // job.gpus_per_worker < min(want, allowed):
            limits[job.key] = Limit.TROUGH_TOO_SHORT
            allowed = max(0, lasting // job.gpus_per_worker)
        elif allowed < want:
            limits[job.key] = Limit.WAITING_FOR_DRAIN
        count = max(0, min(want, allowed))
        starts[job.key] = count
        free -= count * job.gpus_per_worker
        running_total += count * job.gpus_per_worker
    return starts, running_total


def _forecast_room(snapshot: Snapshot, job: JobState) -> int:
    """GPUs batch may hold through the job's cold start plus the minimum useful time, as forecast."""
    pool = snapshot.pool
    if snapshot.forecast is None:
        return pool.capacity_gpus
    horizon = job.cold_start_seconds + pool.min_useful_seconds
    peak = snapshot.forecast.peak(snapshot.now, snapshot.now + horizon)
    if peak is None:
        return pool.capacity_gpus
    # A forecast is an estimate, not a count of GPUs in use: a predicted rise of a fraction of
    # a GPU is noise, so it is rounded rather than rounded up.
    return pool.capacity_gpus - forecast_gpus(peak) - pool.headroom_gpus


def forecast_gpus(value: float) -> int:
    return max(0, math.floor(value + 0.5))


def _limit(
    job: JobState,
    allocation: _Allocation,
    *,
    state: SignalState,
    budget: int,
    trough: int,
    higher_took: bool,
    others_took: bool,
) -> Limit:
    if allocation.workers[job.key] >= allocation.caps[job.key]:
        return Limit.NONE
    if state is not SignalState.FRESH:
        return Limit.STALE_SIGNAL
    if allocation.quota(job.namespace) < job.gpus_per_worker:
        return Limit.QUOTA
    if budget < trough:
        return Limit.SCALE_UP_DELAY
    if higher_took:
        return Limit.PRIORITY
    return Limit.FAIR_SHARE if others_took else Limit.NO_TROUGH
