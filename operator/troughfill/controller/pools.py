"""One planning cycle of a BatchPool: observe the cluster, Prometheus and the ledger, plan, act.

Observe: the pool's GPUs (a fixed count or its nodes' allocatable GPUs), online demand (the
pool's Prometheus queries, plus GPUs of online pods still pending), every admitted job on the
pool with its remaining work (ledger) and its worker pods. Plan: the pure planner. Act: tell
each victim how to stop (drain or yield, through the ledger), delete its pod (the worker
gets SIGTERM and reads that), and create the workers the plan starts. No Kopf here.
"""

import asyncio
import json
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pydantic
from kubernetes.client.exceptions import ApiException
from redis.asyncio import Redis

from troughfill import constants, metrics
from troughfill.api.admission import Admission, admit
from troughfill.api.batchinference import BatchInference, Phase
from troughfill.api.batchpool import BatchPool, BatchPoolStatus
from troughfill.api.conditions import ConditionStatus, PoolConditionType, Reason, is_true, set_condition
from troughfill.api.modeltemplate import ModelTemplate
from troughfill.api.types import LabelSelector, parse_duration
from troughfill.kube.adapter import KubeWorkers
from troughfill.kube.workerpod import WorkerEnvironment, deletion_cost, worker_pod
from troughfill.ledger import JobKeys, JobLedger
from troughfill.planner import (
    JobState,
    Limit,
    OnlineSignal,
    Plan,
    PlannerMemory,
    PoolPolicy,
    SignalState,
    Snapshot,
    StopMode,
    WorkerState,
    plan,
)
from troughfill.signals import SignalSource

ACTIVE_PHASES = frozenset({Phase.VALIDATING, Phase.IN_PROGRESS})
CRASH_LOOP_FAILURES = 3
"""Worker pods of one job that may fail within CRASH_LOOP_SECONDS before it gets no more for a while."""
CRASH_LOOP_SECONDS = 300.0
PRIORITY_CLASS_RECHECK_SECONDS = 30.0
DELETION_COST_MIN_SECONDS = 30.0
"""A serving worker's pod-deletion-cost is patched at most this often (unsaved tokens move
every second); becoming ready is written at once."""


@dataclass(frozen=True)
class WorkerView:
    """What the job's own status reports about its workers (read by the job's reconcile)."""

    desired: int
    ready: int
    limit: Limit
    at_risk: bool
    crash_loop: str | None = None
    """Why no worker is started right now, when its workers keep failing."""


@dataclass
class Cycle:
    plan: Plan
    online: OnlineSignal
    capacity_gpus: int
    created: list[str] = field(default_factory=list)
    stopped: list[tuple[str, StopMode]] = field(default_factory=list)
    jobs: int = 0
    missing_priority_classes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    """Workers the API server refused to create (missing PriorityClass, quota, ...), with why."""


@dataclass
class _Job:
    job: BatchInference
    template: ModelTemplate
    ledger: JobLedger
    pods: list[Any]

    @property
    def key(self) -> str:
        """namespace/name, as the planner names jobs."""
        return f"{self.job.metadata.namespace}/{self.job.metadata.name}"


def selector_string(selector: LabelSelector) -> str:
    """A LabelSelector in the API's query syntax ("" selects nothing here: no online pods)."""
    terms = [f"{k}={v}" for k, v in sorted(selector.match_labels.items())]
    for expression in selector.match_expressions:
        values = ",".join(expression.values)
        terms.append(
            {
                "In": f"{expression.key} in ({values})",
                "NotIn": f"{expression.key} notin ({values})",
                "Exists": expression.key,
                "DoesNotExist": f"!{expression.key}",
            }[expression.operator]
        )
    return ",".join(terms)


def _api_message(error: ApiException) -> str:
    try:
        return str(json.loads(error.body)["message"])[:500]
    except (TypeError, ValueError, KeyError):
        return f"{error.status} {error.reason}"


def _epoch(value: datetime | None) -> float:
    return value.timestamp() if value else time.time()


def _ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))


def _ready_workers(pods: list[Any]) -> int:
    """Workers serving: Ready and not being stopped."""
    return sum(1 for pod in pods if _ready(pod) and not pod.metadata.deletion_timestamp)


class PoolController:
    def __init__(
        self,
        cluster: KubeWorkers,
        signals: SignalSource,
        redis: Redis,
        environment: WorkerEnvironment,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cluster = cluster
        self.signals = signals
        self.redis = redis
        self.environment = environment
        self.clock = clock
        self.memory: dict[str, PlannerMemory] = {}
        self.views: dict[str, WorkerView] = {}
        """Job uid -> its workers as of the last cycle of its pool."""
        self.failures: dict[str, list[float]] = {}
        """Job uid -> when its recent worker pods failed."""
        self.stopping: dict[str, tuple[str, float, StopMode]] = {}
        """Pod (namespace/name) -> (pool, when the plan stopped it, how), until it is gone."""
        self.gpu_seconds: dict[str, float] = {}
        """Job uid -> GPU-seconds its ready workers held and its status has not counted yet."""
        self.last_cycle: dict[str, float] = {}
        self.cost_patched: dict[str, float] = {}
        """Pod (pool/namespace/name) -> when its pod-deletion-cost was last patched."""
        self.classes_checked: dict[str, tuple[float, list[str]]] = {}
        """Pool -> (when, the PriorityClasses it names that do not exist)."""

    def forget(self, pool: str) -> None:
        """Drop what is remembered of a deleted pool."""
        for table in (self.memory, self.last_cycle, self.classes_checked):
            table.pop(pool, None)
        for key in [k for k, (owner, _, _) in self.stopping.items() if owner == pool]:
            del self.stopping[key]

    async def _missing_priority_classes(self, pool: BatchPool) -> list[str]:
        name, now = pool.metadata.name, self.clock()
        checked = self.classes_checked.get(name)
        if checked is None or now - checked[0] >= PRIORITY_CLASS_RECHECK_SECONDS:
            names = sorted(
                {pool.spec.default_priority_class_name}
                | {c for quota in pool.spec.quotas for c in quota.allowed_priority_classes}
            )
            checked = (now, await asyncio.to_thread(self.cluster.missing_priority_classes, names))
            self.classes_checked[name] = checked
        return checked[1]

    async def _capacity(self, pool: BatchPool) -> int:
        gpus = pool.spec.gpus
        if gpus.count is not None:
            return gpus.count
        return await asyncio.to_thread(self.cluster.node_gpus, dict(gpus.node_selector), gpus.resource_name)

    async def _online(self, pool: BatchPool) -> OnlineSignal:
        online = pool.spec.online
        placed, pending = await asyncio.to_thread(
            self.cluster.online_gpus,
            selector_string(online.selector),
            list(online.namespaces),
            pool.spec.gpus.resource_name,
        )
        if online.gpus_in_use_query is None and not online.pressure:
            # No Prometheus query: the online pods' own GPU requests are the demand (read just now).
            return OnlineSignal(gpus_in_use=placed, observed_at=self.clock(), pending_gpus=pending)
        reading = await asyncio.to_thread(self.signals.read, pool.metadata.name, online)
        return reading.online_signal(pending_gpus=pending)

    async def _jobs(self, pool: BatchPool) -> list[_Job]:
        templates: dict[str, ModelTemplate | None] = {}
        pods_by_job: dict[str, list[Any]] = {}
        pods = await asyncio.to_thread(self.cluster.worker_pods, pool.metadata.name)
        present = {f"{p.metadata.namespace}/{p.metadata.name}" for p in pods}
        for key in [k for k in self.cost_patched if k.startswith(f"{pool.metadata.name}/")]:
            if key.split("/", 1)[1] not in present:
                del self.cost_patched[key]
        for key, (pool_name, decided, mode) in list(self.stopping.items()):
            if pool_name == pool.metadata.name and key not in present:
                metrics.YIELD_LATENCY.labels(pool_name, mode.value.lower()).observe(self.clock() - decided)
                del self.stopping[key]
        for pod in pods:
            uid = pod.metadata.labels.get(constants.LABEL_JOB_UID, "")
            if pod.status.phase in {"Succeeded", "Failed"}:
                # Finished workers are removed (and replaced if the plan wants); failures are counted.
                if pod.status.phase == "Failed" and not pod.metadata.deletion_timestamp:
                    self.failures.setdefault(uid, []).append(self.clock())
                await asyncio.to_thread(self.cluster.delete_pod, pod.metadata.namespace, pod.metadata.name)
                continue
            pods_by_job.setdefault(uid, []).append(pod)
        found: list[_Job] = []
        for raw in await asyncio.to_thread(self.cluster.jobs):
            try:
                job = BatchInference.model_validate(raw)
            except pydantic.ValidationError:
                continue
            status = job.status
            if (
                status is None
                or status.phase not in ACTIVE_PHASES
                or not is_true(status.conditions, "Admitted")
            ):
                continue
            name = job.spec.template_ref
            if name not in templates:
                templates[name] = await asyncio.to_thread(self.cluster.template, name)
            template = templates[name]
            if template is None or template.spec.pool_ref != pool.metadata.name:
                continue
            meta = job.metadata
            ledger = JobLedger(self.redis, JobKeys(meta.namespace or "default", meta.name, meta.uid or ""))
            found.append(_Job(job, template, ledger, pods_by_job.pop(meta.uid or "", [])))
        # Workers of jobs no longer active here (finished, expired, suspended out, deleted): stop them.
        for pods in pods_by_job.values():
            for pod in pods:
                if not pod.metadata.deletion_timestamp:
                    await asyncio.to_thread(
                        self.cluster.delete_pod, pod.metadata.namespace, pod.metadata.name
                    )
        return found

    def _crash_loop(self, uid: str) -> str | None:
        now = self.clock()
        recent = [t for t in self.failures.get(uid, []) if now - t < CRASH_LOOP_SECONDS]
        self.failures[uid] = recent
        if len(recent) < CRASH_LOOP_FAILURES:
            return None
        return (
            f"{len(recent)} worker pods failed in the last {CRASH_LOOP_SECONDS:.0f}s; "
            f"no new worker until {CRASH_LOOP_SECONDS:.0f}s after the last failure"
        )

    async def _job_state(self, entry: _Job, priority: int, pool: BatchPool, elapsed: float) -> JobState:
        job, template = entry.job, entry.template
        progress = await entry.ledger.progress()
        ready = _ready_workers(entry.pods)
        uid, labels = job.metadata.uid or "", (job.metadata.namespace or "default", job.metadata.name)
        held = ready * template.spec.gpus_per_worker
        self.gpu_seconds[uid] = self.gpu_seconds.get(uid, 0.0) + held * elapsed
        metrics.JOB_GPUS.labels(*labels).set(held)
        for state, value in (
            ("total", progress.total),
            ("completed", progress.completed),
            ("failed", progress.failed),
        ):
            metrics.JOB_REQUESTS.labels(*labels, state).set(value)
        metrics.JOB_TOKENS.labels(*labels, "prompt").set(progress.prompt_tokens)
        metrics.JOB_TOKENS.labels(*labels, "completion").set(progress.completion_tokens)
        if progress.completion_tokens:
            counted = (job.status.gpu_seconds if job.status else 0.0) + self.gpu_seconds[uid]
            dollars = float(pool.spec.gpu_hourly_cost) * counted / 3600
            metrics.JOB_COST.labels(*labels).set(dollars / (progress.completion_tokens / 1e6))
        stopped = job.spec.suspend or progress.refused or not progress.indexed
        remaining = 0 if stopped else progress.total - progress.finished
        if self._crash_loop(job.metadata.uid or ""):
            remaining = 0  # running workers drain; none is started until the failures age out
        live = [pod for pod in entry.pods if pod.status.phase not in {"Succeeded", "Failed"}]
        beats = await asyncio.gather(*(entry.ledger.last_heartbeat(pod.metadata.name) for pod in live))
        workers = tuple(
            WorkerState(
                name=pod.metadata.name,
                started_at=_epoch(pod.metadata.creation_timestamp),
                ready=_ready(pod),
                unsaved_tokens=int((beat or {}).get("unsaved_tokens", 0)),
                stopping=StopMode.DRAIN if pod.metadata.deletion_timestamp else None,
            )
            for pod, beat in zip(live, beats, strict=True)
        )
        window = parse_duration(job.spec.completion_window).total_seconds()
        created = _epoch(job.metadata.creationTimestamp)
        tokens_per_second = float(template.spec.tokens_per_second or 0)
        average = progress.completion_tokens / progress.finished if progress.finished else 0.0
        return JobState(
            key=entry.key,
            namespace=job.metadata.namespace or "default",
            priority=priority,
            gpus_per_worker=template.spec.gpus_per_worker,
            min_workers=job.spec.min_workers,
            max_workers=job.spec.max_workers,
            remaining_requests=max(0, remaining),
            remaining_tokens=average * max(0, remaining),
            worker_tokens_per_second=tokens_per_second,
            deadline=created + window,
            cold_start_seconds=float(template.spec.cold_start_seconds),
            workers=workers,
        )

    async def cycle(self, pool: BatchPool) -> Cycle:
        name = pool.metadata.name
        now = self.clock()
        elapsed = now - self.last_cycle.get(name, now)
        self.last_cycle[name] = now
        capacity = await self._capacity(pool)
        entries = await self._jobs(pool)
        priorities: dict[str, int] = {}
        states: list[JobState] = []
        admissions: dict[str, Admission] = {}
        for entry in entries:
            admission = admissions[entry.key] = admit(entry.job, entry.template, pool)
            klass = admission.priority_class_name or pool.spec.default_priority_class_name
            if klass not in priorities:
                priorities[klass] = await asyncio.to_thread(self.cluster.priority_value, klass)
            states.append(await self._job_state(entry, priorities[klass], pool, elapsed))
        online = await self._online(pool)  # read last: the freshest demand is what is acted on
        snapshot = Snapshot(
            now=self.clock(),
            pool=PoolPolicy.from_spec(pool.spec, capacity),
            online=online,
            jobs=tuple(states),
        )
        decided = plan(snapshot, self.memory.get(name))
        self.memory[name] = decided.memory
        metrics.CAPACITY.labels(name).set(capacity)
        metrics.ONLINE.labels(name).set(online.gpus_in_use or 0)
        metrics.TROUGH.labels(name).set(decided.trough_gpus)
        metrics.BATCH.labels(name).set(decided.batch_gpus)
        if online.observed_at is not None:
            metrics.STALENESS.labels(name).set(max(0.0, snapshot.now - online.observed_at))
        result = Cycle(decided, online, capacity, jobs=len(entries))
        by_key = {e.key: e for e in entries}
        for stop in decided.stops:
            entry = by_key[stop.job]
            pod = next((p for p in entry.pods if p.metadata.name == stop.worker), None)
            if pod is None or pod.metadata.deletion_timestamp:
                continue
            await entry.ledger.request_stop(stop.worker, stop.mode.value.lower())
            await asyncio.to_thread(self.cluster.delete_pod, pod.metadata.namespace, pod.metadata.name)
            self.stopping[f"{pod.metadata.namespace}/{pod.metadata.name}"] = (name, snapshot.now, stop.mode)
            metrics.DECISIONS.labels(name, stop.mode.value.lower()).inc()
            result.stopped.append((stop.worker, stop.mode))
        await self._mark_deletion_costs(entries, states, {worker for worker, _ in result.stopped})
        for key, job_plan in decided.jobs.items():
            entry = by_key[key]
            uid = entry.job.metadata.uid or ""
            self.views[uid] = WorkerView(
                desired=job_plan.desired_workers,
                ready=_ready_workers(entry.pods),
                limit=job_plan.limit,
                at_risk=job_plan.at_risk,
                crash_loop=self._crash_loop(uid),
            )
            for _ in range(job_plan.starts):
                pod_name = f"{entry.job.metadata.name[:40]}-w-{secrets.token_hex(3)}"
                manifest = worker_pod(
                    pod_name, entry.job, entry.template, pool, admissions[key], environment=self.environment
                )
                try:
                    await asyncio.to_thread(self.cluster.create_pod, manifest)
                except ApiException as error:
                    reason = _api_message(error)
                    result.failures.append(f"{key}: {reason}")
                    break  # the next start of this job would be refused the same way
                result.created.append(pod_name)
                metrics.DECISIONS.labels(name, "start").inc()
        # After acting: a recheck's API reads must not delay this cycle's stops.
        result.missing_priority_classes = await self._missing_priority_classes(pool)
        return result

    async def _mark_deletion_costs(
        self, entries: list[_Job], states: list[JobState], stopped: set[str]
    ) -> None:
        """Keep each serving worker's pod-deletion-cost in step with its unsaved progress."""
        for entry, state in zip(entries, states, strict=True):
            pods = {pod.metadata.name: pod for pod in entry.pods}
            for worker in state.workers:
                pod = pods.get(worker.name)
                if pod is None or pod.metadata.deletion_timestamp or worker.name in stopped:
                    continue
                cost = deletion_cost(worker.ready, worker.unsaved_tokens)
                current = (pod.metadata.annotations or {}).get(constants.ANNOTATION_POD_DELETION_COST)
                pool_name = pod.metadata.labels.get(constants.LABEL_POOL, "")
                key = f"{pool_name}/{pod.metadata.namespace}/{pod.metadata.name}"
                recent = self.clock() - self.cost_patched.get(key, -math.inf) < DELETION_COST_MIN_SECONDS
                if current != cost and (current == "0" or not recent):
                    self.cost_patched[key] = self.clock()
                    await asyncio.to_thread(
                        self.cluster.annotate_pod,
                        pod.metadata.namespace,
                        pod.metadata.name,
                        {constants.ANNOTATION_POD_DELETION_COST: cost},
                    )


def pool_status(pool: BatchPool, cycle: Cycle, now: datetime) -> BatchPoolStatus:
    status = pool.status.model_copy(deep=True) if pool.status else BatchPoolStatus()
    status.observed_generation = pool.metadata.generation
    status.capacity_gpus = cycle.capacity_gpus
    status.online_gpus = round(cycle.online.gpus_in_use or 0)
    status.batch_gpus = cycle.plan.batch_gpus
    status.trough_gpus = cycle.plan.trough_gpus
    status.active_jobs = cycle.jobs
    if cycle.online.observed_at is not None:
        status.last_signal_time = datetime.fromtimestamp(cycle.online.observed_at, UTC)
    fresh = cycle.plan.signal == SignalState.FRESH
    status.conditions = set_condition(
        status.conditions,
        PoolConditionType.SIGNAL_READY,
        status=ConditionStatus.TRUE if fresh else ConditionStatus.FALSE,
        reason=Reason.SIGNAL_FRESH if fresh else Reason.SIGNAL_STALE,
        message=f"online demand signal {cycle.plan.signal.value.lower()}",
        now=now,
        observed_generation=pool.metadata.generation,
    )
    missing = cycle.missing_priority_classes
    status.conditions = set_condition(
        status.conditions,
        PoolConditionType.PRIORITY_CLASSES_READY,
        status=ConditionStatus.FALSE if missing else ConditionStatus.TRUE,
        reason=Reason.PRIORITY_CLASS_MISSING if missing else Reason.PRIORITY_CLASSES_FOUND,
        message=(
            f"PriorityClass {', '.join(missing)} not found: workers of jobs using it cannot be created"
            if missing
            else "every PriorityClass the pool allows exists"
        ),
        now=now,
        observed_generation=pool.metadata.generation,
    )
    return status
