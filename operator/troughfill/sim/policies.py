"""The policies the simulator compares. Only troughfill's calls the real planner; the others are
what a cluster admin would otherwise deploy."""

import math
from collections import deque
from dataclasses import dataclass, field

from troughfill.planner import (
    Forecast,
    JobState,
    OnlineSignal,
    PlannerMemory,
    PoolPolicy,
    Quota,
    Snapshot,
    StopMode,
    WorkerState,
    plan,
    seasonal_forecast,
)
from troughfill.sim.fleet import QUEUE, Actions, ClusterParams, ClusterView, SimWorker


@dataclass
class TroughfillPolicy:
    """The operator's reconcile loop: every `interval_seconds`, snapshot → planner → act."""

    params: ClusterParams
    pool: PoolPolicy
    interval_seconds: int = 2
    forecast_every_seconds: int = 60
    use_forecast: bool = False
    """The operator builds no forecast (its snapshot's is None); True measures what the planner
    would do with `seasonal_forecast` from its own minute-by-minute history."""
    name: str = "troughfill"
    resumes_partials: bool = True
    memory: PlannerMemory = field(default_factory=PlannerMemory)
    history: list[tuple[float, float]] = field(default_factory=list)
    forecast: Forecast | None = None
    _forecast_at: int = -1

    def observe_history(self, view: ClusterView) -> None:
        """The online query's past, as a Prometheus range query would give it (one point a minute)."""
        if view.now - self._forecast_at < self.forecast_every_seconds:
            return
        self._forecast_at = view.now
        self.history.append((float(view.now), float(view.online_gpus_observed)))
        if len(self.history) > 2 * 86_400 // self.forecast_every_seconds:
            del self.history[: len(self.history) // 2]
        if self.use_forecast:
            horizon = self.params.cold_start_seconds + self.pool.min_useful_seconds
            self.forecast = seasonal_forecast(
                self.history, now=float(view.now), horizon=horizon, step=float(self.forecast_every_seconds)
            )

    def decide(self, view: ClusterView) -> Actions:
        self.observe_history(view)
        by_job: dict[str, list[SimWorker]] = {}
        for worker in view.workers:
            by_job.setdefault(worker.job, []).append(worker)
        rate = self.params.tokens_per_gpu_second
        jobs = []
        for job in view.jobs:
            states = tuple(
                WorkerState(
                    name=w.name,
                    started_at=float(w.created_at),
                    ready=w.ready_at is not None and w.ready_at <= view.now,
                    # Tokens are not tracked per worker here: what a worker has not checkpointed
                    # cycles through [0, checkpoint_tokens) as it generates (7 tokens a second).
                    unsaved_tokens=(view.now - w.created_at) * 7 % self.params.checkpoint_tokens,
                    stopping=w.stopping,
                )
                for w in by_job.get(job.key, ())
            )
            remaining = job.remaining_tokens
            jobs.append(
                JobState(
                    key=job.key,
                    namespace=job.namespace,
                    priority=job.priority,
                    gpus_per_worker=job.gpus_per_worker,
                    remaining_requests=(
                        10**9
                        if math.isinf(remaining)
                        else math.ceil(remaining / self.params.mean_output_tokens)
                    ),
                    remaining_tokens=remaining,
                    worker_tokens_per_second=rate * job.gpus_per_worker,
                    deadline=float(job.deadline) if job.deadline is not None else None,
                    cold_start_seconds=float(self.params.cold_start_seconds),
                    workers=states,
                )
            )
        snapshot = Snapshot(
            now=float(view.now),
            pool=self.pool,
            online=OnlineSignal(
                gpus_in_use=float(view.online_gpus_observed),
                observed_at=float(view.now),
                pending_gpus=float(view.pending_online_gpus),
            ),
            jobs=tuple(jobs),
            forecast=self.forecast,
        )
        result = plan(snapshot, self.memory)
        self.memory = result.memory
        return Actions(
            starts={key: p.starts for key, p in result.jobs.items() if p.starts},
            stops=[(s.worker, s.mode) for s in result.stops],
        )


@dataclass
class KedaPolicy:
    """A KEDA ScaledObject on the Prometheus query `capacity - online - headroom` (one replica
    per idle GPU) driving an HPA with its defaults: KEDA polls every 30 s, the HPA syncs every
    15 s, scales up at once (at most max(100 %, 4 pods) per sync) and down only to the highest
    recommendation of the last 300 s. Workers pull from one queue, highest priority first; a
    pod removed or preempted loses its in-flight requests (no partial resume)."""

    params: ClusterParams
    polling_seconds: int = 30
    interval_seconds: int = 15
    stabilisation_seconds: int = 300
    name: str = "keda-hpa"
    resumes_partials: bool = False
    metric: int = 0
    _polled_at: int = -(10**9)
    recommendations: deque[tuple[int, int]] = field(default_factory=deque)

    def decide(self, view: ClusterView) -> Actions:
        if view.now - self._polled_at >= self.polling_seconds:
            self._polled_at = view.now
            self.metric = max(
                0, self.params.capacity_gpus - view.online_gpus_observed - self.params.headroom_gpus
            )
        desired = self.metric
        self.recommendations.append((view.now, desired))
        while self.recommendations and self.recommendations[0][0] < view.now - self.stabilisation_seconds:
            self.recommendations.popleft()
        live = [w for w in view.workers if w.stopping is None]
        current = len(live)
        if desired < current:
            desired = min(current, max(r for _, r in self.recommendations))
        else:
            desired = min(desired, max(2 * current, current + 4))
        actions = Actions()
        if desired > current:
            actions.starts[QUEUE] = desired - current
        elif desired < current:
            # the ReplicaSet removes unplaced, then not-ready, then the newest pods first
            victims = sorted(
                live,
                key=lambda w: (w.placed, w.ready_at is not None and w.ready_at <= view.now, -w.created_at),
            )[: current - desired]
            actions.stops = [(w.name, StopMode.YIELD) for w in victims]
        return actions


@dataclass
class StaticPolicy:
    """A fixed batch partition: capacity minus online's peak (known in hindsight) minus headroom."""

    gpus: int
    interval_seconds: int = 60
    name: str = "static"
    resumes_partials: bool = False

    def decide(self, view: ClusterView) -> Actions:
        live = sum(1 for w in view.workers if w.stopping is None)
        return Actions(starts={QUEUE: self.gpus - live} if live < self.gpus else {})


def pool_policy(
    params: ClusterParams,
    *,
    scale_up_delay: float,
    min_useful: float,
    weights: dict[str, int],
    headroom_lend: int = 0,
) -> PoolPolicy:
    return PoolPolicy(
        capacity_gpus=params.capacity_gpus,
        headroom_gpus=params.headroom_gpus,
        headroom_lend_gpus=headroom_lend,
        max_staleness_seconds=60.0,
        scale_up_delay_seconds=scale_up_delay,
        min_useful_seconds=min_useful,
        quotas={ns: Quota(max_gpus=params.capacity_gpus, weight=w) for ns, w in weights.items()},
    )
