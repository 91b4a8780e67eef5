"""A GPU pool, second by second: online demand, batch workers, Kubernetes preemption, accounting.

What is modelled (each a parameter of `ClusterParams`):
- Online serving takes the GPUs it wants from whatever is free. When batch holds GPUs online
  needs, online pods go pending and the kube-scheduler preempts batch pods (lowest priority,
  newest first) after `preemption_seconds`; a victim frees its GPUs after its stop time. Every
  second online wants a GPU batch still holds is displaced online GPU-time.
- A batch worker is placed once enough GPUs are free (online is served first), is
  productive after `cold_start_seconds`, and produces `tokens_per_gpu_second` per GPU.
- Stopping: drain keeps producing for `drain_seconds` then exits, losing nothing; yield and
  preemption exit after `yield_seconds`, losing the in-flight work since the last checkpoint
  (a policy without partial resume loses each in-flight request's whole progress).
- Policies see online demand only through Prometheus: the value of the last scrape.

Jobs progress as fluids (tokens), so thousands of requests cost nothing to simulate.
"""

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from troughfill.planner import StopMode

QUEUE = "queue"
"""Workers of queue-style policies pull from every job, highest priority first."""

SAMPLE_SECONDS = 600
"""Resolution of the time series kept for plots (10-minute means)."""


def queue_order(job: "SimJob") -> tuple[int, float, str]:
    """The order a shared queue serves jobs in: priority, then earliest deadline."""
    return (-job.priority, job.deadline if job.deadline is not None else math.inf, job.key)


class WindowMeans:
    """Means of consecutive windows of per-second values, kept as they come."""

    def __init__(self, window: int = SAMPLE_SECONDS) -> None:
        self.window = window
        self.means: list[float] = []
        self._sum = 0.0
        self._count = 0

    def add(self, value: float) -> None:
        self._sum += value
        self._count += 1
        if self._count == self.window:
            self.means.append(self._sum / self.window)
            self._sum, self._count = 0.0, 0


@dataclass(frozen=True)
class ClusterParams:
    capacity_gpus: int = 64
    headroom_gpus: int = 2
    tokens_per_gpu_second: float = 2_500.0
    cold_start_seconds: int = 60
    yield_seconds: int = 2
    drain_seconds: int = 20
    preemption_seconds: int = 1
    scrape_interval_seconds: int = 15
    in_flight_per_worker: int = 64
    checkpoint_tokens: int = 32
    mean_output_tokens: int = 250
    gpu_hourly_cost_usd: float = 2.5


@dataclass
class SimJob:
    key: str
    namespace: str
    priority: int
    tokens: float
    """Tokens to generate (math.inf for a standing backlog)."""
    arrival: int = 0
    deadline: int | None = None
    gpus_per_worker: int = 1
    done_tokens: float = 0.0
    finished_at: int | None = None

    @property
    def remaining_tokens(self) -> float:
        return max(0.0, self.tokens - self.done_tokens)

    def active(self, now: int) -> bool:
        return self.arrival <= now and self.finished_at is None


@dataclass
class SimWorker:
    name: str
    job: str
    """A job key, or QUEUE."""
    gpus: int
    priority: int
    created_at: int
    placed_at: int | None = None
    ready_at: int | None = None
    stopping: StopMode | None = None
    exits_at: int | None = None
    preempted: bool = False
    counted: bool = False
    """Counted among the productive GPUs (ready, and not yielding)."""

    @property
    def placed(self) -> bool:
        return self.placed_at is not None


@dataclass(frozen=True)
class ClusterView:
    """What a policy may look at: Prometheus' last scrape of online demand, the cluster's
    pending online pods, and its own jobs and workers."""

    now: int
    online_gpus_observed: int
    pending_online_gpus: int
    jobs: tuple[SimJob, ...]
    workers: tuple[SimWorker, ...]


@dataclass
class Actions:
    starts: dict[str, int] = field(default_factory=dict)
    stops: list[tuple[str, StopMode]] = field(default_factory=list)


class Policy(Protocol):
    name: str
    interval_seconds: int
    resumes_partials: bool

    def decide(self, view: ClusterView) -> Actions: ...


@dataclass
class Totals:
    seconds: int = 0
    online_demand_gpu_seconds: float = 0.0
    online_over_capacity_gpu_seconds: float = 0.0
    online_displaced_gpu_seconds: float = 0.0
    online_served_gpu_seconds: float = 0.0
    batch_held_gpu_seconds: float = 0.0
    batch_productive_gpu_seconds: float = 0.0
    batch_in_trough_gpu_seconds: float = 0.0
    """Productive batch GPU-time within capacity - online - headroom: the harvest that counts."""
    headroom_intrusion_gpu_seconds: float = 0.0
    """Batch GPU-time held inside the headroom online bursts are owed."""
    tokens_generated: float = 0.0
    wasted_tokens: float = 0.0
    preemptions: int = 0
    yields: int = 0
    drains: int = 0
    starts: int = 0


class Cluster:
    def __init__(
        self,
        params: ClusterParams,
        demand: list[int],
        jobs: list[SimJob],
        policy: Policy,
    ) -> None:
        self.params = params
        self.demand = demand
        self.jobs = {job.key: job for job in jobs}
        self.queue_order = sorted(jobs, key=queue_order)
        self.policy = policy
        self.workers: dict[str, SimWorker] = {}
        self.pending: list[str] = []
        self.events: list[tuple[int, int, str]] = []  # (time, 0 ready / 1 exit, worker)
        self.productive: dict[str, int] = {}
        self.totals = Totals()
        self.samples = WindowMeans()
        self._serial = 0
        self.held = 0

    # --- mechanics ---------------------------------------------------------------------------

    def stop_seconds(self, mode: StopMode) -> int:
        return self.params.drain_seconds if mode is StopMode.DRAIN else self.params.yield_seconds

    def waste_per_stop(self) -> float:
        """In-flight work a yield or preemption throws away."""
        per_request = (
            self.params.checkpoint_tokens / 2
            if self.policy.resumes_partials
            else self.params.mean_output_tokens / 2
        )
        return self.params.in_flight_per_worker * per_request

    def stop(self, worker: SimWorker, mode: StopMode, now: int, delay: int = 0) -> None:
        if worker.stopping is not None and not (worker.stopping is StopMode.DRAIN and mode is StopMode.YIELD):
            return
        if self.discard_unplaced(worker):
            return
        worker.stopping = mode
        worker.exits_at = now + delay + self.stop_seconds(mode)
        heapq.heappush(self.events, (worker.exits_at, 1, worker.name))
        if mode is StopMode.YIELD:
            self.uncount(worker)
        if mode is StopMode.YIELD and worker.ready_at is not None and worker.ready_at <= now:
            lost = self.waste_per_stop()
            self.totals.wasted_tokens += lost
            self.unproduce(worker, lost)
        if mode is StopMode.DRAIN:
            self.totals.drains += 1
        elif not worker.preempted:
            self.totals.yields += 1

    def unproduce(self, worker: SimWorker, tokens: float) -> None:
        job = self.jobs.get(worker.job)
        if job is not None and job.finished_at is None:
            job.done_tokens = max(0.0, job.done_tokens - tokens)

    def start(self, job_key: str, gpus: int, priority: int, now: int) -> None:
        self._serial += 1
        worker = SimWorker(f"w{self._serial}", job_key, gpus, priority, created_at=now)
        self.workers[worker.name] = worker
        self.pending.append(worker.name)
        self.totals.starts += 1

    def discard_unplaced(self, worker: SimWorker) -> bool:
        """A worker still waiting for GPUs just disappears; True if it was one."""
        if worker.placed:
            return False
        self.pending.remove(worker.name)
        del self.workers[worker.name]
        return True

    def retire(self, worker: SimWorker, now: int) -> None:
        """Out of requests: the worker exits on its own (burst mode) with nothing in flight."""
        if self.discard_unplaced(worker):
            return
        self.uncount(worker)
        worker.stopping = StopMode.DRAIN
        worker.exits_at = now + 1
        heapq.heappush(self.events, (worker.exits_at, 1, worker.name))

    def count(self, worker: SimWorker) -> None:
        if not worker.counted:
            worker.counted = True
            self.productive[worker.job] = self.productive.get(worker.job, 0) + worker.gpus

    def uncount(self, worker: SimWorker) -> None:
        if worker.counted:
            worker.counted = False
            self.productive[worker.job] -= worker.gpus

    def handle_events(self, now: int) -> None:
        while self.events and self.events[0][0] <= now:
            _, kind, name = heapq.heappop(self.events)
            worker = self.workers.get(name)
            if worker is None:
                continue
            if kind == 0:
                if worker.stopping in (None, StopMode.DRAIN):
                    self.count(worker)
            elif worker.exits_at is not None and worker.exits_at <= now:
                self.uncount(worker)
                self.held -= worker.gpus
                del self.workers[name]

    def preempt_for_online(self, online: int, now: int) -> None:
        """The kube-scheduler makes room for pending online pods by evicting batch pods."""
        shortfall = online - (self.params.capacity_gpus - self.held)
        if shortfall <= 0:
            return
        self.totals.online_displaced_gpu_seconds += shortfall
        leaving = sum(w.gpus for w in self.workers.values() if w.placed and w.stopping is StopMode.YIELD)
        need = shortfall - leaving
        if need <= 0:
            return
        candidates = sorted(
            (w for w in self.workers.values() if w.placed and w.stopping is not StopMode.YIELD),
            key=lambda w: (w.priority, -(w.placed_at or 0), w.name),
        )
        for victim in candidates:
            if need <= 0:
                break
            victim.preempted = True
            self.totals.preemptions += 1
            self.stop(victim, StopMode.YIELD, now, delay=self.params.preemption_seconds)
            need -= victim.gpus

    def place_pending(self, online: int, now: int) -> None:
        free = self.params.capacity_gpus - online - self.held
        placed: list[str] = []
        for name in self.pending:
            worker = self.workers[name]
            if worker.gpus <= free:
                free -= worker.gpus
                self.held += worker.gpus
                worker.placed_at = now
                worker.ready_at = now + self.params.cold_start_seconds
                heapq.heappush(self.events, (worker.ready_at, 0, name))
                placed.append(name)
        if placed:
            done = set(placed)
            self.pending = [n for n in self.pending if n not in done]

    def produce(self, now: int) -> int:
        rate = self.params.tokens_per_gpu_second
        productive_gpus = 0
        queue_tokens = 0.0
        for key, gpus in list(self.productive.items()):
            if not gpus:
                continue
            productive_gpus += gpus
            if key == QUEUE:
                queue_tokens = gpus * rate
                continue
            job = self.jobs.get(key)
            if job is not None and job.active(now):
                self.credit(job, gpus * rate, now)
        self.totals.batch_productive_gpu_seconds += productive_gpus
        if queue_tokens:
            for job in self.queue_order:
                if not job.active(now):
                    continue
                queue_tokens -= self.credit(job, queue_tokens, now)
                if queue_tokens <= 0:
                    break
        return productive_gpus

    def credit(self, job: SimJob, tokens: float, now: int) -> float:
        used = min(tokens, job.remaining_tokens)
        job.done_tokens += used
        self.totals.tokens_generated += used
        if job.remaining_tokens <= 0:
            job.finished_at = now
            for worker in list(self.workers.values()):
                if worker.job == job.key:
                    self.retire(worker, now)
        return used

    # --- the loop ----------------------------------------------------------------------------

    def view(self, now: int, online_pending: int) -> ClusterView:
        scrape = self.params.scrape_interval_seconds
        last_scrape = max(0, now - now % scrape)
        return ClusterView(
            now=now,
            online_gpus_observed=min(self.demand[last_scrape], self.params.capacity_gpus),
            pending_online_gpus=online_pending,
            jobs=tuple(j for j in self.jobs.values() if j.active(now)),
            workers=tuple(self.workers.values()),
        )

    def apply(self, actions: Actions, now: int) -> None:
        for worker_name, mode in actions.stops:
            worker = self.workers.get(worker_name)
            if worker is not None:
                self.stop(worker, mode, now)
        for job_key, count in actions.starts.items():
            job = self.jobs.get(job_key)
            gpus = job.gpus_per_worker if job else 1
            priority = job.priority if job else 0
            for _ in range(count):
                self.start(job_key, gpus, priority, now)

    def run(self, progress: Callable[[int], None] | None = None) -> Totals:
        capacity = self.params.capacity_gpus
        interval = self.policy.interval_seconds
        for now, wanted in enumerate(self.demand):
            self.handle_events(now)
            online = min(wanted, capacity)
            self.totals.online_demand_gpu_seconds += online
            self.totals.online_over_capacity_gpu_seconds += wanted - online
            self.preempt_for_online(online, now)
            served = min(online, capacity - self.held)
            self.totals.online_served_gpu_seconds += served
            self.place_pending(served, now)
            productive = self.produce(now)
            trough = max(0, capacity - online - self.params.headroom_gpus)
            self.totals.batch_in_trough_gpu_seconds += min(productive, trough)
            self.totals.headroom_intrusion_gpu_seconds += max(0, self.held - trough)
            if now % interval == 0:
                self.apply(self.policy.decide(self.view(now, online - served)), now)
            self.totals.batch_held_gpu_seconds += self.held
            self.samples.add(self.held)
            if progress is not None and now % 86_400 == 0:
                progress(now)
        self.totals.seconds = len(self.demand)
        return self.totals
