"""A BatchPool's planning cycle, as named phases (Kueue's `schedule()` is the model):

    observe   read the pool's GPUs, its jobs with their ledger progress and worker heartbeats,
              its worker pods and online demand (read last: the freshest is acted on)
    snapshot  a pure function of what was observed: the planner's Snapshot
    plan      the pure planner
    act       carry the plan out: finished and orphaned worker pods go, each victim is told
              how to stop (ledger) and its pod deleted, new workers are created, serving
              workers' pod-deletion-cost follows their unsaved progress
    record    what the cycle leaves behind: metrics, each job's WorkerView (its status reads
              it) and the GPU-seconds its workers held

What one pool remembers between cycles is one PoolState. The cluster is the Cluster Protocol
(controller.ports), so the cycle runs the same against the Kubernetes API or a fake. No Kopf here.
"""

import asyncio
import contextlib
import math
import secrets
import time
import zlib
from collections.abc import Callable, Mapping
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
from troughfill.api.conditions import ConditionStatus, PoolConditionType, Reason, set_condition
from troughfill.api.modeltemplate import ModelTemplate
from troughfill.api.types import LabelSelector, parse_duration
from troughfill.controller.jobs import WorkerView
from troughfill.controller.ports import Cluster, WorkerPod
from troughfill.controller.stores import GrantSecretMissingError, JobStores
from troughfill.kube.calls import api_message
from troughfill.kube.workerpod import WorkerEnvironment, deletion_cost, job_secret, worker_pod
from troughfill.ledger import Heartbeat, JobKeys, JobLedger, Progress, StopMode
from troughfill.ledger.credentials import LedgerKey
from troughfill.ledger.ledger import progress_of
from troughfill.planner import (
    ColdStarts,
    JobState,
    OnlineSignal,
    Plan,
    PlannerMemory,
    PoolPolicy,
    SignalState,
    Snapshot,
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
PROGRESS_RECHECK_CYCLES = 30
"""A job that can hardly have progressed (no worker pod, no lease) has its counts read every this
many cycles of its pool anyway (a thirtieth of them each cycle: once a minute at the default 2 s
cycle)."""
PARSED_JOBS_KEPT = 100_000
"""Parsed jobs remembered across cycles, at most (far more than a cluster holds live)."""


# --- what one pool remembers ------------------------------------------------------------------


@dataclass
class GpuSeconds:
    """GPU-seconds a job's serving workers held: what its status said when this operator first
    saw it, plus what this operator counted since. The status is set to the total (never added
    to), so a status write that is lost or retried counts nothing twice and loses nothing."""

    base: float
    counted: float = 0.0

    @property
    def total(self) -> float:
        return self.base + self.counted


@dataclass
class PoolState:
    """Everything the controller remembers of one pool between its cycles."""

    memory: PlannerMemory | None = None
    last_cycle: float | None = None
    stopping: dict[str, tuple[float, StopMode]] = field(default_factory=dict)
    """Pod (namespace/name) -> (when the plan stopped it, how), until the pod is gone."""
    cost_patched: dict[str, float] = field(default_factory=dict)
    """Pod (namespace/name) -> when its pod-deletion-cost was last patched."""
    classes_checked: tuple[float, list[str]] | None = None
    """(when, the PriorityClasses the pool names that do not exist)."""
    failures: dict[str, list[float]] = field(default_factory=dict)
    """Job uid -> when its recent worker pods failed."""
    views: dict[str, WorkerView] = field(default_factory=dict)
    """Job uid -> its workers as of the last cycle."""
    gpu_seconds: dict[str, GpuSeconds] = field(default_factory=dict)
    """Job uid -> the GPU-seconds its workers held."""
    metered: dict[str, tuple[int, Progress, float]] = field(default_factory=dict)
    """Job uid -> what its gauges were last set from (unchanged: not set again)."""
    job_states: dict[str, tuple[tuple[object, ...], JobState]] = field(default_factory=dict)
    """Job uid -> the planner's state of it and what that was built from (`snapshot`)."""
    alerting: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Job uid -> (namespace, name) of its at-risk and crash-loop gauges, removed when it leaves."""
    progress_tick: int = 0
    """This pool's cycles so far, for `_progresses`' turns: counted per pool, since with one
    count for all pools a pool cycling among n others sees only every n-th value, and a job
    whose turn is one of the others would never have its counts read again."""

    def crash_loop(self, uid: str, now: float) -> str | None:
        """Why the job gets no new worker now, when its workers keep failing."""
        recent = [t for t in self.failures.get(uid, []) if now - t < CRASH_LOOP_SECONDS]
        if len(recent) < CRASH_LOOP_FAILURES:
            return None
        return (
            f"{len(recent)} worker pods failed in the last {CRASH_LOOP_SECONDS:.0f}s; "
            f"no new worker until {CRASH_LOOP_SECONDS:.0f}s after the last failure"
        )


# --- what a cycle sees, decides and did --------------------------------------------------------


@dataclass(frozen=True)
class ObservedJob:
    job: BatchInference
    template: ModelTemplate
    admission: Admission
    priority: int
    ledger: JobLedger
    progress: Progress
    pods: tuple[WorkerPod, ...]
    """Its worker pods that have not finished."""
    beats: tuple[Heartbeat | None, ...]
    """Each pod's last heartbeat, in the order of `pods`."""
    key: str = field(init=False)
    """namespace/name, as the planner names jobs (from `job`, once: a cycle reads it often)."""
    uid: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", self.job.metadata.key)
        object.__setattr__(self, "uid", self.job.metadata.uid_text)

    @property
    def serving(self) -> int:
        return sum(1 for pod in self.pods if pod.serving)


@dataclass(frozen=True)
class Observation:
    now: float
    capacity: int
    online: OnlineSignal
    jobs: tuple[ObservedJob, ...]
    finished: tuple[WorkerPod, ...]
    """Worker pods that ended: removed (the plan replaces them if it wants)."""
    orphans: tuple[WorkerPod, ...]
    """Workers of jobs no longer active on this pool (finished, expired, suspended out, deleted)."""
    present: frozenset[str]
    """Every worker pod of the pool (namespace/name), finished or not."""
    signal_problem: str | None = None
    """Why this cycle's read of the online signal gave no value (the query's error)."""


@dataclass
class Cycle:
    """What one cycle decided and did (the handler reports it: status, Events, logs)."""

    plan: Plan
    online: OnlineSignal
    capacity_gpus: int
    created: list[str] = field(default_factory=list)
    stopped: list[tuple[str, StopMode]] = field(default_factory=list)
    jobs: int = 0
    missing_priority_classes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    """Workers the API server refused to create (missing PriorityClass, quota, ...), with why."""
    phase_seconds: dict[str, float] = field(default_factory=dict)
    """How long observing, planning and acting took (a slow cycle says which)."""
    signal_problem: str | None = None
    """Why the online signal read gave no value this cycle (SignalReady's message says it)."""
    freed: list[tuple[str, StopMode, float]] = field(default_factory=list)
    """Stopped workers (namespace/name) found gone this cycle: their GPUs are free, so many
    seconds after the cycle that decided to stop them."""


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


def _epoch(value: datetime | None, default: float) -> float:
    return value.timestamp() if value else default


def _active_job(raw: dict[str, Any]) -> BatchInference | None:
    """The job, if it is running (validating or in progress: its start admitted it once; each
    cycle admits it again, against the template and pool of now)."""
    try:
        job = BatchInference.model_validate(raw)
    except pydantic.ValidationError:
        return None  # its own handler reports it
    status = job.status
    if status is None or status.phase not in ACTIVE_PHASES:
        return None
    return job


# --- the pure step ------------------------------------------------------------------------------


def snapshot(
    pool: BatchPool,
    seen: Observation,
    crash_looping: frozenset[str],
    earlier: dict[str, tuple[tuple[object, ...], JobState]] | None = None,
    cold_starts: Mapping[str, float] | None = None,
) -> Snapshot:
    """The planner's view of what was observed (pure but for `earlier`: each job's state as
    built from the same inputs in an earlier cycle, reused rather than built again; a thousand
    waiting jobs otherwise cost a third of a cycle). A job whose workers keep failing asks for
    no work: its running workers drain, none is started until the failures age out.
    `cold_starts`: template name -> the cold start measured for its workers (ColdStarts); a
    template missing there is planned with its declared `coldStartSeconds`."""
    states = []
    for entry in seen.jobs:
        looping = entry.uid in crash_looping
        cold = (cold_starts or {}).get(entry.template.metadata.name)
        if earlier is None:
            states.append(_job_state(entry, looping, seen.now, cold))
            continue
        inputs = (*_job_state_inputs(entry, looping), cold)
        kept = earlier.get(entry.uid)
        if kept is None or kept[0] != inputs:
            kept = earlier[entry.uid] = (inputs, _job_state(entry, looping, seen.now, cold))
        states.append(kept[1])
    return Snapshot(
        now=seen.now,
        pool=PoolPolicy.from_spec(pool.spec, seen.capacity),
        online=seen.online,
        jobs=tuple(states),
    )


def _job_state_inputs(entry: ObservedJob, crash_looping: bool) -> tuple[object, ...]:
    """What `_job_state` reads: the job and template by version, the rest by value (`now` only
    matters to a job without a creation time, which a stored object always has)."""
    return (
        entry.job.metadata.resourceVersion or id(entry.job),
        entry.template.metadata.resourceVersion or id(entry.template),
        entry.admission.allowed,
        entry.priority,
        entry.progress,
        entry.pods,
        entry.beats,
        crash_looping,
    )


def _job_state(
    entry: ObservedJob, crash_looping: bool, now: float, cold_start: float | None = None
) -> JobState:
    job, template, progress = entry.job, entry.template, entry.progress
    stopped = (
        job.spec.suspend
        or job.spec.cancel
        or bool(progress.refused)
        or bool(progress.corrupt)  # it fails (jobs.refresh_status); its workers stop now
        or not progress.indexed
        or crash_looping
        or not entry.admission.allowed  # the template or pool changed since: no worker runs it now
    )
    remaining = 0 if stopped else max(0, progress.total - progress.finished)
    average = progress.completion_tokens / progress.finished if progress.finished else 0.0
    window = parse_duration(job.spec.completion_window).total_seconds()
    return JobState(
        key=entry.key,
        namespace=job.metadata.ns,
        priority=entry.priority,
        gpus_per_worker=template.spec.gpus_per_worker,
        min_workers=job.spec.min_workers,
        max_workers=job.spec.max_workers,
        remaining_requests=remaining,
        remaining_tokens=average * remaining,
        worker_tokens_per_second=float(template.spec.tokens_per_second or 0),
        deadline=_epoch(job.metadata.creationTimestamp, now) + window,
        cold_start_seconds=float(template.spec.cold_start_seconds) if cold_start is None else cold_start,
        workers=tuple(
            WorkerState(
                name=pod.name,
                started_at=pod.created_at,
                ready=pod.ready,
                unsaved_tokens=beat.unsaved_tokens if beat else 0,
                stopping=StopMode.DRAIN if pod.deleting else None,
            )
            for pod, beat in zip(entry.pods, entry.beats, strict=True)
        ),
    )


# --- the controller -----------------------------------------------------------------------------


class PoolController:
    def __init__(
        self,
        cluster: Cluster,
        signals: SignalSource,
        redis: Redis,
        environment: WorkerEnvironment,
        stores: JobStores,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cluster = cluster
        self.signals = signals
        self.redis = redis
        self.environment = environment
        self.stores = stores
        self.ledger_key = LedgerKey(redis)
        self.clock = clock
        self.pools: dict[str, PoolState] = {}
        self.secrets: set[str] = set()
        """Jobs (uid) whose workers' Secret this operator has made."""
        self._parsed: dict[str, tuple[str, BatchInference | None]] = {}
        """uid -> (resourceVersion, the job parsed if active) of the jobs cycles have read."""
        self._ledgers: dict[str, JobLedger] = {}
        """uid -> the job's ledger client (`_ledger`)."""
        self._progress: dict[str, tuple[str | None, Progress]] = {}
        """job uid -> (its resourceVersion then, its ledger counts) as cycles last read them."""
        self._admissions: dict[str, tuple[tuple[object, ...], Admission]] = {}
        """job uid -> (the generations it was admitted at, its admission)."""
        self.cold_starts = ColdStarts()
        """Each template's workers' measured starts (created -> Ready), for every pool."""

    async def cycle(self, pool: BatchPool) -> Cycle:
        state = self.pools.setdefault(pool.metadata.name, PoolState())
        marks = [time.perf_counter()]
        seen = await self.observe(pool, state)
        marks.append(time.perf_counter())
        self._note_failures(state, seen)
        crash_looping = frozenset(uid for uid in state.failures if state.crash_loop(uid, seen.now))
        cold_starts = self._learn_cold_starts(seen)
        decided = plan(snapshot(pool, seen, crash_looping, state.job_states, cold_starts), state.memory)
        state.memory = decided.memory
        marks.append(time.perf_counter())
        done = await self.act(pool, seen, decided, state)
        self.record(pool, seen, decided, done, state)
        marks.append(time.perf_counter())
        # Last: a recheck's API reads must not delay this cycle's stops.
        done.missing_priority_classes = await self._missing_priority_classes(pool, state)
        done.phase_seconds = {
            name: round(marks[k + 1] - marks[k], 4) for k, name in enumerate(("observe", "plan", "act"))
        }
        return done

    def workers_of(self, uid: str) -> WorkerView | None:
        """A job's workers as its pool's last cycle saw them (None: no pool has planned it)."""
        for state in self.pools.values():
            if uid in state.views:
                return state.views[uid]
        return None

    def _active(self, raw: dict[str, Any]) -> BatchInference | None:
        """`_active_job`, parsed once per version of the object (a cycle reads every job)."""
        meta = raw.get("metadata") or {}
        uid, version = str(meta.get("uid", "")), str(meta.get("resourceVersion", ""))
        cached = self._parsed.get(uid)
        if cached is not None and cached[0] == version and version:
            return cached[1]
        job = _active_job(raw)
        if len(self._parsed) > PARSED_JOBS_KEPT:
            self._parsed.clear()  # jobs deleted long ago; whatever is live is parsed again once
        self._parsed[uid] = (version, job)
        return job

    async def _progresses(
        self,
        matched: list[tuple[BatchInference, ModelTemplate, Admission, int, JobLedger]],
        with_pods: set[tuple[str, str]],
        state: PoolState,
    ) -> list[Progress]:
        """Each job's ledger counts, read in one round trip for the jobs whose counts can have
        moved: with worker pods (finished ones too) or leases, not yet indexed, changed since (a
        new resourceVersion), or in this pool's turn for it (one cycle in PROGRESS_RECHECK_CYCLES).
        A job with no worker pod and no lease at its last read can rarely have moved (a worker run
        by hand whose claims all came and went between two reads: its turn finds that), so a
        thousand waiting jobs cost a thirtieth of a thousand reads a cycle, not a thousand."""
        state.progress_tick += 1
        turn = state.progress_tick % PROGRESS_RECHECK_CYCLES
        wanted: list[JobLedger] = []
        for job, _, _, _, ledger in matched:
            uid = job.metadata.uid_text
            cached = self._progress.get(uid)
            if (
                cached is None
                or cached[0] != job.metadata.resourceVersion
                or cached[1].leases
                or not cached[1].indexed
                or (job.metadata.ns, uid) in with_pods
                or zlib.crc32(uid.encode()) % PROGRESS_RECHECK_CYCLES == turn
            ):
                wanted.append(ledger)
        fresh = dict(
            zip((one.keys.uid for one in wanted), await progress_of(self.redis, wanted), strict=True)
        )
        read: list[Progress] = []
        for job, *_ in matched:
            uid = job.metadata.uid_text
            if uid in fresh:
                self._progress[uid] = (job.metadata.resourceVersion, fresh[uid])
            read.append(self._progress[uid][1])
        if len(self._progress) > PARSED_JOBS_KEPT:
            self._progress = {
                job.metadata.uid_text: self._progress[job.metadata.uid_text] for job, *_ in matched
            }
        return read

    def _admission(self, job: BatchInference, template: ModelTemplate, pool: BatchPool) -> Admission:
        """`admit`, once per generation of the job, its template and its pool (their specs are
        all it reads)."""
        versions = [o.metadata.generation for o in (job, template, pool)]
        if None in versions:
            return admit(job, template, pool)
        key = (template.metadata.uid_text, pool.metadata.uid_text, *versions)
        cached = self._admissions.get(job.metadata.uid_text)
        if cached is not None and cached[0] == key:
            return cached[1]
        admission = admit(job, template, pool)
        if len(self._admissions) > PARSED_JOBS_KEPT:
            self._admissions.clear()
        self._admissions[job.metadata.uid_text] = (key, admission)
        return admission

    def _ledger(self, job: BatchInference) -> JobLedger:
        """The job's ledger client, made once (its keys follow from its uid, which never changes)."""
        uid = job.metadata.uid_text
        ledger = self._ledgers.get(uid)
        if ledger is None:
            if len(self._ledgers) > PARSED_JOBS_KEPT:
                self._ledgers.clear()
            ledger = self._ledgers[uid] = JobLedger(self.redis, JobKeys.of(job.metadata))
        return ledger

    def forget_pool(self, name: str) -> None:
        """Drop what is remembered of a deleted pool."""
        self.pools.pop(name, None)

    def forget_job(self, uid: str) -> None:
        self.secrets.discard(uid)
        self._parsed.pop(uid, None)
        self._admissions.pop(uid, None)
        self._progress.pop(uid, None)
        self._ledgers.pop(uid, None)
        for state in self.pools.values():
            for table in (state.views, state.gpu_seconds, state.failures, state.metered, state.job_states):
                table.pop(uid, None)

    # --- observe ------------------------------------------------------------------------------

    async def observe(self, pool: BatchPool, state: PoolState) -> Observation:
        capacity = await self._capacity(pool)
        pods = await asyncio.to_thread(self.cluster.worker_pods, pool.metadata.name)
        by_job: dict[tuple[str, str], list[WorkerPod]] = {}
        for pod in pods:
            if not pod.finished and pod.owner_uid:  # a pod no BatchInference owns is not ours
                by_job.setdefault((pod.namespace, pod.owner_uid), []).append(pod)
        templates: dict[str, ModelTemplate | None] = {}
        priorities: dict[str, int] = {}
        matched: list[tuple[BatchInference, ModelTemplate, Admission, int, JobLedger]] = []
        for raw in await asyncio.to_thread(self.cluster.jobs):
            job = self._active(raw)
            if job is None:
                continue
            name = job.spec.template_ref
            if name not in templates:
                templates[name] = await asyncio.to_thread(self.cluster.template, name)
            template = templates[name]
            if template is None or template.spec.pool_ref != pool.metadata.name:
                continue
            admission = self._admission(job, template, pool)
            klass = admission.priority_class_name or pool.spec.default_priority_class_name
            if klass not in priorities:
                priorities[klass] = await asyncio.to_thread(self.cluster.priority_value, klass)
            matched.append((job, template, admission, priorities[klass], self._ledger(job)))
        # A pod that finished since the last cycle is the worker that may have recorded the
        # job's last results on its way out: its job's counts are read too.
        with_pods = {(pod.namespace, pod.owner_uid) for pod in pods if pod.owner_uid}
        progresses = await self._progresses(matched, with_pods, state)
        jobs: list[ObservedJob] = []
        for (job, template, admission, priority, ledger), progress in zip(matched, progresses, strict=True):
            own = tuple(by_job.pop((job.metadata.ns, job.metadata.uid_text), []))
            beats = await asyncio.gather(*(ledger.last_heartbeat(pod.name) for pod in own)) if own else []
            jobs.append(ObservedJob(job, template, admission, priority, ledger, progress, own, tuple(beats)))
        # Read last: the freshest demand is what is acted on.
        online, signal_problem = await self._online(pool)
        return Observation(
            now=self.clock(),
            capacity=capacity,
            online=online,
            jobs=tuple(jobs),
            finished=tuple(pod for pod in pods if pod.finished and pod.owner_uid),
            orphans=tuple(pod for rest in by_job.values() for pod in rest if not pod.deleting),
            present=frozenset(pod.key for pod in pods),
            signal_problem=signal_problem,
        )

    def _learn_cold_starts(self, seen: Observation) -> dict[str, float]:
        """Count each worker's start once, when first seen Ready; return the estimate for each
        template with a job here (its declared figure until enough starts are measured)."""
        estimates: dict[str, float] = {}
        for entry in seen.jobs:
            template = entry.template.metadata.name
            for pod in entry.pods:
                if pod.ready_at is None or pod.deleting:
                    continue
                seconds = pod.ready_at - pod.created_at
                if self.cold_starts.observe(template, pod.key, seconds):
                    metrics.COLD_START.labels(template).observe(seconds)
            if template not in estimates:
                estimates[template] = self.cold_starts.estimate(
                    template, float(entry.template.spec.cold_start_seconds)
                )
                metrics.COLD_START_ESTIMATE.labels(template).set(estimates[template])
        return estimates

    def _note_failures(self, state: PoolState, seen: Observation) -> None:
        """A failed worker pod counts once: it is deleted this cycle (a pod already being
        deleted was stopped by us, not failed on its own). It counts against the job that owns
        it, in its own namespace: a pod elsewhere claiming the job's uid counts for nothing."""
        namespaces = {entry.uid: entry.job.metadata.ns for entry in seen.jobs} if seen.finished else {}
        for pod in seen.finished:
            if pod.phase == "Failed" and not pod.deleting and namespaces.get(pod.owner_uid) == pod.namespace:
                state.failures.setdefault(pod.owner_uid, []).append(seen.now)
        for uid, times in list(state.failures.items()):
            state.failures[uid] = [t for t in times if seen.now - t < CRASH_LOOP_SECONDS]

    async def _capacity(self, pool: BatchPool) -> int:
        gpus = pool.spec.gpus
        if gpus.count is not None:
            return gpus.count
        return await asyncio.to_thread(self.cluster.node_gpus, dict(gpus.node_selector), gpus.resource_name)

    async def _online(self, pool: BatchPool) -> tuple[OnlineSignal, str | None]:
        """The online demand, and why the read gave no value (None when it did)."""
        online = pool.spec.online
        placed, pending = await asyncio.to_thread(
            self.cluster.online_gpus,
            selector_string(online.selector),
            list(online.namespaces),
            pool.spec.gpus.resource_name,
        )
        if online.gpus_in_use_query is None and not online.pressure:
            # No Prometheus query: the online pods' own GPU requests are the demand (read just now).
            return OnlineSignal(gpus_in_use=placed, observed_at=self.clock(), pending_gpus=pending), None
        reading = await asyncio.to_thread(self.signals.read, pool.metadata.name, online)
        return reading.online_signal(pending_gpus=pending), reading.error

    async def _missing_priority_classes(self, pool: BatchPool, state: PoolState) -> list[str]:
        now = self.clock()
        if state.classes_checked is None or now - state.classes_checked[0] >= PRIORITY_CLASS_RECHECK_SECONDS:
            names = sorted(
                {pool.spec.default_priority_class_name}
                | {c for quota in pool.spec.quotas for c in quota.allowed_priority_classes}
            )
            state.classes_checked = (
                now,
                await asyncio.to_thread(self.cluster.missing_priority_classes, names),
            )
        return state.classes_checked[1]

    # --- act ----------------------------------------------------------------------------------

    async def act(self, pool: BatchPool, seen: Observation, decided: Plan, state: PoolState) -> Cycle:
        done = Cycle(
            decided, seen.online, seen.capacity, jobs=len(seen.jobs), signal_problem=seen.signal_problem
        )
        for pod in (*seen.finished, *seen.orphans):
            await asyncio.to_thread(self.cluster.delete_pod, pod.namespace, pod.name)
        by_key = {entry.key: entry for entry in seen.jobs}
        for stop in decided.stops:
            entry = by_key[stop.job]
            victim = next((p for p in entry.pods if p.name == stop.worker), None)
            if victim is None or victim.deleting:
                continue
            await entry.ledger.request_stop(stop.worker, stop.mode)  # read by the worker on SIGTERM
            await asyncio.to_thread(self.cluster.delete_pod, victim.namespace, victim.name)
            state.stopping[victim.key] = (seen.now, stop.mode)
            done.stopped.append((stop.worker, stop.mode))
        await self._mark_deletion_costs(seen, state, {worker for worker, _ in done.stopped})
        for key, job_plan in decided.jobs.items():
            entry = by_key[key]
            if job_plan.starts and not await self._job_secret(entry, done):
                continue
            for _ in range(job_plan.starts):
                name = f"{entry.job.metadata.name[:40]}-w-{secrets.token_hex(3)}"
                manifest = worker_pod(
                    name, entry.job, entry.template, pool, entry.admission, environment=self.environment
                )
                try:
                    await asyncio.to_thread(self.cluster.create_pod, manifest)
                except ApiException as error:
                    done.failures.append(f"{key}: {api_message(error)[:500]}")
                    break  # the next start of this job would be refused the same way
                done.created.append(name)
        return done

    async def _job_secret(self, entry: ObservedJob, done: Cycle) -> bool:
        """Make the job's workers' Secret before its first worker: its storage grant's
        credentials and its ledger token (ledger.credentials). False, with the reason among the
        cycle's failures, when it cannot be made."""
        if entry.uid in self.secrets:
            return True
        granted = entry.admission.storage
        try:
            data = await asyncio.to_thread(self.stores.credentials, granted.secret_name if granted else None)
            data = {**data, constants.SECRET_LEDGER_TOKEN: await self.ledger_key.token(entry.ledger.keys)}
            await asyncio.to_thread(self.cluster.create_secret, job_secret(entry.job, data))
        except GrantSecretMissingError as error:
            done.failures.append(f"{entry.key}: {error}")
            return False
        except ApiException as error:
            done.failures.append(f"{entry.key}: the workers' Secret: {api_message(error)[:500]}")
            return False
        self.secrets.add(entry.uid)
        return True

    async def _mark_deletion_costs(self, seen: Observation, state: PoolState, stopped: set[str]) -> None:
        """Keep each serving worker's pod-deletion-cost in step with its unsaved progress."""
        for entry in seen.jobs:
            for pod, beat in zip(entry.pods, entry.beats, strict=True):
                if pod.deleting or pod.name in stopped:
                    continue
                cost = deletion_cost(pod.ready, beat.unsaved_tokens if beat else 0)
                recent = self.clock() - state.cost_patched.get(pod.key, -math.inf) < DELETION_COST_MIN_SECONDS
                if pod.deletion_cost != cost and (pod.deletion_cost == "0" or not recent):
                    state.cost_patched[pod.key] = self.clock()
                    await asyncio.to_thread(
                        self.cluster.annotate_pod,
                        pod.namespace,
                        pod.name,
                        {constants.ANNOTATION_POD_DELETION_COST: cost},
                    )

    # --- record -------------------------------------------------------------------------------

    def record(
        self, pool: BatchPool, seen: Observation, decided: Plan, done: Cycle, state: PoolState
    ) -> None:
        name = pool.metadata.name
        first = state.last_cycle is None
        elapsed = seen.now - state.last_cycle if state.last_cycle is not None else 0.0
        state.last_cycle = seen.now
        for key in [k for k in state.cost_patched if k not in seen.present]:
            del state.cost_patched[key]
        if first:
            # Every series from zero, before its first event: a counter that first appears at 3
            # shows Prometheus no increase, and a rate() over it says nothing happened.
            for mode in StopMode:
                metrics.YIELD_LATENCY.labels(name, mode.value)
                metrics.DECISIONS.labels(name, mode.value)
            metrics.DECISIONS.labels(name, "start")
        for key, (decided_at, mode) in list(state.stopping.items()):
            if key not in seen.present:
                metrics.YIELD_LATENCY.labels(name, mode.value).observe(seen.now - decided_at)
                done.freed.append((key, mode, seen.now - decided_at))
                del state.stopping[key]
        metrics.CAPACITY.labels(name).set(seen.capacity)
        metrics.ONLINE.labels(name).set(seen.online.gpus_in_use or 0)
        metrics.TROUGH.labels(name).set(decided.trough_gpus)
        metrics.BATCH.labels(name).set(decided.batch_gpus)
        metrics.MAX_STALENESS.labels(name).set(parse_duration(pool.spec.signal.max_staleness).total_seconds())
        if seen.online.observed_at is not None:
            metrics.STALENESS.labels(name).set(max(0.0, seen.now - seen.online.observed_at))
        for _, mode in done.stopped:
            metrics.DECISIONS.labels(name, mode.value).inc()
        for _ in done.created:
            metrics.DECISIONS.labels(name, "start").inc()
        active = set()
        ready = 0
        for entry in seen.jobs:
            active.add(entry.uid)
            held = entry.serving * entry.template.spec.gpus_per_worker
            ready += held
            account = state.gpu_seconds.get(entry.uid)
            if account is None:
                base = entry.job.status.gpu_seconds if entry.job.status else 0.0
                account = state.gpu_seconds[entry.uid] = GpuSeconds(base=base)
            account.counted += held * elapsed
            metered = (held, entry.progress, account.total)
            if state.metered.get(entry.uid) != metered:  # a thousand waiting jobs: nothing to set
                self._job_metrics(pool, entry, held, account.total)
                state.metered[entry.uid] = metered
            job_plan = decided.jobs.get(entry.key)
            if job_plan is None:
                continue
            crash_loop = state.crash_loop(entry.uid, seen.now)
            labels = state.alerting[entry.uid] = (entry.job.metadata.ns, entry.job.metadata.name)
            metrics.JOB_AT_RISK.labels(*labels).set(1 if job_plan.at_risk else 0)
            metrics.JOB_CRASH_LOOP.labels(*labels).set(1 if crash_loop else 0)
            state.views[entry.uid] = WorkerView(
                desired=job_plan.desired_workers,
                ready=entry.serving,
                limit=job_plan.limit,
                at_risk=job_plan.at_risk,
                crash_loop=crash_loop,
                gpu_seconds=account.total,
                admission=entry.admission,
                progress=entry.progress,
            )
        metrics.READY.labels(name).set(ready)
        for uid in [uid for uid in state.alerting if uid not in active]:
            labels = state.alerting.pop(uid)  # an ended job's alerts must not go on firing
            for gauge in (metrics.JOB_AT_RISK, metrics.JOB_CRASH_LOOP):
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels)
        for table in (state.views, state.gpu_seconds, state.metered, state.job_states):
            for uid in [uid for uid in table if uid not in active]:
                del table[uid]  # the job ended, moved out or is gone: its status no longer asks

    @staticmethod
    def _job_metrics(pool: BatchPool, entry: ObservedJob, held: int, gpu_seconds: float) -> None:
        labels = (entry.job.metadata.ns, entry.job.metadata.name)
        progress = entry.progress
        metrics.JOB_GPUS.labels(*labels).set(held)
        for kind, value in (
            ("total", progress.total),
            ("completed", progress.completed),
            ("failed", progress.failed),
        ):
            metrics.JOB_REQUESTS.labels(*labels, kind).set(value)
        metrics.JOB_TOKENS.labels(*labels, "prompt").set(progress.prompt_tokens)
        metrics.JOB_TOKENS.labels(*labels, "completion").set(progress.completion_tokens)
        if progress.completion_tokens:
            dollars = float(pool.spec.gpu_hourly_cost) * gpu_seconds / 3600
            metrics.JOB_COST.labels(*labels).set(dollars / (progress.completion_tokens / 1e6))


def signal_message(cycle: Cycle) -> str:
    """SignalReady's message: the signal's state and, when the last read failed, why."""
    message = f"online demand signal {cycle.plan.signal.value.lower()}"
    if cycle.plan.signal != SignalState.FRESH and cycle.signal_problem:
        message += f": {cycle.signal_problem}"
    return message[: constants.CONDITION_MESSAGE_MAX]


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
        message=signal_message(cycle),
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
