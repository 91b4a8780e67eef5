"""A BatchInference's life as status: admission, indexing its input, progress, completion, deletion.

No Kopf here: the handlers look objects up, call these functions and write what they return
(the status, and Events to post). Each function is idempotent, so a handler retried after a
crash or an operator restart converges to the same status.
"""

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis

from troughfill import constants
from troughfill.api.admission import Admission
from troughfill.api.base import immutable_changes
from troughfill.api.batchinference import (
    BatchInference,
    BatchInferenceStatus,
    Phase,
    RequestCounts,
    TokenCounts,
    WorkerCounts,
    progress_text,
)
from troughfill.api.batchpool import BatchPool
from troughfill.api.conditions import (
    ConditionStatus,
    JobConditionType,
    Reason,
    TemplateConditionType,
    find_condition,
    is_true,
    set_condition,
)
from troughfill.api.modeltemplate import ModelTemplate, ModelTemplateStatus
from troughfill.api.storage import as_prefix
from troughfill.api.types import parse_duration
from troughfill.ledger import (
    TERMINAL,
    JobConfig,
    JobKeys,
    JobLedger,
    LedgerCorruptError,
    OutputClaims,
    Progress,
)
from troughfill.planner import Limit
from troughfill.results import (
    FinalReport,
    InputChangedError,
    InputTooLargeError,
    MergeError,
    clean_segments,
    finalize,
    index_input,
)
from troughfill.storage import ERROR_FILE, OUTPUT_FILE, ObjectStore, ReadError, StorageError, join


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post about the job."""

    reason: Reason
    message: str
    warning: bool = False


@dataclass
class StatusUpdate:
    status: BatchInferenceStatus
    events: list[Event] = field(default_factory=list)
    retry_in: float | None = None
    """Something failed that may pass: write this status, then try again in so many seconds."""


MERGED = frozenset({Phase.COMPLETED, Phase.EXPIRED, Phase.CANCELLED})
CANCELLABLE = frozenset({Phase.VALIDATING, Phase.IN_PROGRESS, Phase.CANCELLING})
"""Ended with the output merged: the segments are no longer needed (a failed job keeps its own:
they are all of its results)."""
MAX_STORAGE_ATTEMPTS = 5
"""Tries of the operator's data path (indexing, merging) against a failure that may pass, with
back-off (RETRY_BASE_SECONDS doubling: 5 s to 80 s, about 2.5 minutes in all) before the job fails."""
RETRY_BASE_SECONDS = 5.0


def ledger_for(job: BatchInference, client: Redis) -> JobLedger:
    return JobLedger(client, JobKeys.of(job.metadata))


def job_config(job: BatchInference) -> JobConfig:
    """What the ledger and the data path need of the job, from the custom resource (the operator
    never takes a URL from Redis that it can read from the resource)."""
    spec = job.spec
    return JobConfig(spec.input_url, spec.output_url, spec.endpoint, spec.retry.max_attempts)


def _status(job: BatchInference) -> BatchInferenceStatus:
    return job.status.model_copy(deep=True) if job.status else BatchInferenceStatus()


def _set(
    status: BatchInferenceStatus,
    job: BatchInference,
    kind: JobConditionType,
    *,
    value: ConditionStatus,
    reason: Reason,
    message: str,
    now: datetime,
) -> None:
    status.conditions = set_condition(
        status.conditions,
        kind,
        status=value,
        reason=reason,
        message=message,
        now=now,
        observed_generation=job.metadata.generation,
    )


def _quota_message(job: BatchInference, admission: Admission, unfinished: int) -> str:
    return (
        f"namespace {job.metadata.ns!r} may hold {admission.max_requests} unfinished requests in the "
        f"ledger and its other jobs hold {unfinished}: wait for them to finish, or ask for a larger quota"
    )


async def namespace_unfinished(client: Redis, raw_jobs: list[dict[str, Any]], job: BatchInference) -> int:
    """Requests the namespace's other jobs that have not ended hold unfinished in the ledger (what
    its cap counts). From the ledger, not from status: a job started a moment ago has its
    requests indexed before its status says so (the caller counts and starts one job of a
    namespace at a time). The counts are the operator's and the ledger service's: workers cannot
    write the ledger."""
    total = 0
    ended = {phase.value for phase in TERMINAL}
    for raw in raw_jobs:
        meta = raw.get("metadata", {})
        phase = (raw.get("status") or {}).get("phase")
        if meta.get("namespace") != job.metadata.ns or meta.get("uid") == job.metadata.uid_text:
            continue
        if phase in ended:
            continue
        keys = JobKeys(meta["namespace"], meta["name"], meta["uid"])
        progress = await JobLedger(client, keys).progress()
        total += max(0, progress.total - progress.finished)
    return total


async def _storage_failed(
    job: BatchInference,
    status: BatchInferenceStatus,
    ledger: JobLedger,
    what: str,
    error: StorageError | MergeError,
    *,
    reason: Reason,
    now: datetime,
) -> StatusUpdate:
    """A failure of the operator's data path: Degraded and a retry with back-off while it may
    pass (at most MAX_STORAGE_ATTEMPTS in a row), else the job fails saying what and where."""
    failures = await ledger.count_failure(what)
    transient = isinstance(error, StorageError) and error.transient
    if transient and failures < MAX_STORAGE_ATTEMPTS:
        delay = RETRY_BASE_SECONDS * 2 ** (failures - 1)
        message = f"{error} (attempt {failures} of {MAX_STORAGE_ATTEMPTS}; again in {delay:.0f}s)"
        _set(status, job, JobConditionType.DEGRADED, value=ConditionStatus.TRUE, reason=reason,
             message=message, now=now)  # fmt: skip
        return StatusUpdate(status, [Event(reason, message, warning=True)], retry_in=delay)
    message = f"{error}" + (f" ({failures} attempts)" if transient else "")
    if await ledger.state() not in TERMINAL:
        await ledger.transition(Phase.FAILED)
    return _fail(status, job, reason, message, now)


async def _healthy(
    job: BatchInference, status: BatchInferenceStatus, ledger: JobLedger, what: str, now: datetime
) -> None:
    """`what` worked: its failures are forgotten and a Degraded condition, if any, clears."""
    await ledger.clear_failures(what)
    if find_condition(status.conditions, JobConditionType.DEGRADED) is not None:
        _set(status, job, JobConditionType.DEGRADED, value=ConditionStatus.FALSE, reason=Reason.HEALTHY,
             message="the ledger and the job's storage answer again", now=now)  # fmt: skip


def _fail(
    status: BatchInferenceStatus, job: BatchInference, reason: Reason, message: str, now: datetime
) -> StatusUpdate:
    """Failed=True, phase failed, one warning Event."""
    _set(
        status,
        job,
        JobConditionType.FAILED,
        value=ConditionStatus.TRUE,
        reason=reason,
        message=message,
        now=now,
    )
    status.phase = Phase.FAILED
    status.observed_generation = job.metadata.generation
    status.finished_at = status.finished_at or now
    return StatusUpdate(status, [Event(reason, message, warning=True)])


def ledger_unavailable(job: BatchInference, message: str, now: datetime) -> BatchInferenceStatus:
    """The status while the ledger cannot be reached: Degraded, with what was being done."""
    status = _status(job)
    _set(status, job, JobConditionType.DEGRADED, value=ConditionStatus.TRUE,
         reason=Reason.LEDGER_UNAVAILABLE, message=message, now=now)  # fmt: skip
    return status


def refuse(job: BatchInference, reason: Reason, message: str, now: datetime) -> StatusUpdate:
    """The job cannot run as written: Admitted=False, Failed=True, one warning Event."""
    status = _status(job)
    _set(
        status,
        job,
        JobConditionType.ADMITTED,
        value=ConditionStatus.FALSE,
        reason=reason,
        message=message,
        now=now,
    )
    return _fail(status, job, reason, message, now)


async def start(
    job: BatchInference,
    admission: Admission,
    ledger: JobLedger,
    store: ObjectStore | None,
    now: datetime,
    *,
    namespace_unfinished: int = 0,
) -> StatusUpdate:
    """Admit the job (or refuse it), record it in the ledger and index its input (`store`: the
    job's object store, with its grant's credentials; None when nothing admits it)."""
    if job.status is not None and job.status.phase is not None and (await ledger.progress()).refused:
        return await refresh_status(job, _status(job), ledger, store, now)  # refused: never re-admitted
    if not admission.allowed or store is None:
        return refuse(job, admission.reason, admission.message, now)
    limit = constants.MAX_REQUESTS_PER_JOB
    if admission.max_requests is not None:
        room = admission.max_requests - namespace_unfinished
        if room <= 0 and job.status is None:
            return refuse(
                job, Reason.REQUEST_QUOTA_EXCEEDED, _quota_message(job, admission, namespace_unfinished), now
            )
        limit = min(limit, max(room, 1))
    spec, config = job.spec, job_config(job)
    holder = await OutputClaims(ledger.client).claim(as_prefix(spec.output_url), ledger.keys)
    if holder is not None:
        where = (
            f"BatchInference {holder.name}"
            if holder.namespace == job.metadata.ns
            else "a BatchInference in another namespace"
        )
        message = (
            f"outputURL {spec.output_url} is the output of {where}, which has not ended: two live jobs "
            "never share an output prefix (pick another, or wait until it ends)"
        )
        return refuse(job, Reason.OUTPUT_IN_USE, message, now)
    created = await ledger.create(config)
    status = _status(job)
    events = [Event(Reason.ADMITTED, admission.message)] if created else []
    _set(
        status,
        job,
        JobConditionType.ADMITTED,
        value=ConditionStatus.TRUE,
        reason=Reason.ADMITTED,
        message=admission.message,
        now=now,
    )
    if await ledger.state() == Phase.VALIDATING:
        try:
            report = await index_input(ledger, store, config, max_requests=limit)
        except StorageError as error:  # Admitted stays true: the spec was fine, its storage is not
            reason = Reason.INPUT_UNREADABLE if isinstance(error, ReadError) else Reason.OUTPUT_UNWRITABLE
            return await _storage_failed(job, status, ledger, "index", error, reason=reason, now=now)
        except InputChangedError as error:
            return await _storage_failed(
                job, status, ledger, "index", error, reason=Reason.INPUT_CHANGED, now=now
            )
        except InputTooLargeError as error:
            await ledger.transition(Phase.FAILED)
            if error.limit < constants.MAX_REQUESTS_PER_JOB:  # the namespace's cap, not the ledger's
                message = f"{error}: {_quota_message(job, admission, namespace_unfinished)}"
                return _fail(status, job, Reason.REQUEST_QUOTA_EXCEEDED, message, now)
            message = f"{error}, the most one job may hold: split it into several jobs"
            return _fail(status, job, Reason.INPUT_TOO_LARGE, message, now)
        await _healthy(job, status, ledger, "index", now)
        if report.invalid:
            events.append(
                Event(
                    Reason.INVALID_SPEC,
                    f"{report.invalid} of {report.total} input lines are invalid; they go to the error file",
                    warning=True,
                )
            )
    status.started_at = status.started_at or now
    refreshed = await refresh_status(job, status, ledger, store, now)
    refreshed.events[:0] = events
    return refreshed


@dataclass(frozen=True)
class WorkerView:
    """The job's workers as its pool's last planning cycle saw them (controller.pools records it)."""

    desired: int
    ready: int
    """Serving: Ready and not being stopped."""
    limit: Limit
    """The planner's reason for fewer workers than the job could use."""
    at_risk: bool
    crash_loop: str | None = None
    """Why no worker is started right now, when its workers keep failing."""
    gpu_seconds: float = 0.0
    """GPU-seconds its serving workers held in all (what the status reports)."""
    admission: Admission | None = None
    """The job admitted again against its template and pool as the cycle found them."""
    progress: Progress | None = None
    """The ledger's counts as that cycle read them."""


class QuietJobs:
    """Which jobs' status refresh would find nothing new: the same object (resourceVersion) and
    the same view from the pool's last cycle (workers, plan and ledger counts) as when it last
    ran, and its completion window not yet over. A pool of a thousand waiting jobs then costs a
    dictionary lookup per job per tick instead of a parse, a ledger read and a store lookup."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[object, float]] = {}

    def unchanged(self, uid: str, fingerprint: object, now: float) -> bool:
        last = self._last.get(uid)
        return last is not None and last[0] == fingerprint and now < last[1]

    def refreshed(self, uid: str, fingerprint: object, job: BatchInference) -> None:
        """The refresh ran with these inputs and asks for no retry."""
        ends = deadline(job)
        self._last[uid] = (fingerprint, ends.timestamp() if ends else math.inf)

    def forget(self, uid: str) -> None:
        self._last.pop(uid, None)


def deadline(job: BatchInference) -> datetime | None:
    created = job.metadata.creationTimestamp
    return created + parse_duration(job.spec.completion_window) if created else None


def _running_condition(job: BatchInference, workers: WorkerView) -> tuple[ConditionStatus, Reason, str]:
    if workers.admission is not None and not workers.admission.allowed:
        return ConditionStatus.FALSE, workers.admission.reason, workers.admission.message
    if workers.crash_loop:
        return ConditionStatus.FALSE, Reason.CRASH_LOOP, workers.crash_loop
    if job.spec.suspend:
        return (
            ConditionStatus.FALSE,
            Reason.SUSPENDED,
            "spec.suspend is true: every worker stops, progress is kept",
        )
    if workers.ready:
        return (
            ConditionStatus.TRUE,
            Reason.WORKERS_READY,
            f"{workers.ready} of {workers.desired} workers ready",
        )
    reason = {Limit.STALE_SIGNAL: Reason.SIGNAL_STALE, Limit.NO_TROUGH: Reason.ONLINE_DEMAND}.get(
        workers.limit, Reason.WAITING_FOR_TROUGH
    )
    return (
        ConditionStatus.FALSE,
        reason,
        f"no worker ready ({workers.desired} wanted; limited by {workers.limit.value})",
    )


async def refresh_status(
    job: BatchInference,
    status: BatchInferenceStatus,
    ledger: JobLedger,
    store: ObjectStore | None,
    now: datetime,
    *,
    workers: WorkerView | None = None,
    retention_seconds: float | None = None,
) -> StatusUpdate:
    """Counts and phase from the ledger; workers from the pool's plan; once every request is
    done, merge the output and complete; once the completion window has passed, expire the rest
    (both only with the job's `store`: None while nothing admits the job, so nothing is merged).
    An ended job's ledger keys are set to go after `retention_seconds`."""
    events: list[Event] = []
    config = job_config(job)
    retry_in = None
    progress = await ledger.progress()
    if progress.corrupt:
        return await _ledger_corrupt(
            job, status, ledger, progress.corrupt, now=now, retention_seconds=retention_seconds
        )
    if progress.input_changed and progress.state not in TERMINAL:  # a worker found it changed
        await ledger.transition(Phase.FAILED)
        events += _fail(status, job, Reason.INPUT_CHANGED, progress.input_changed, now).events
        progress = await ledger.progress()
    try:
        progress = await _cancel_if_asked(
            job, status, ledger, store, config=config, progress=progress, now=now, events=events
        )
        progress = await _expire_if_window_ended(
            job, status, ledger, store, config=config, progress=progress, now=now, events=events
        )
        progress = await _finalize_if_done(status, ledger, store, config, progress, events=events)
    except LedgerCorruptError as error:  # met while merging: a span, a dead letter, a segment
        return await _ledger_corrupt(
            job, status, ledger, str(error), now=now, retention_seconds=retention_seconds
        )
    except (StorageError, MergeError) as error:
        writing = isinstance(error, StorageError) and not isinstance(error, ReadError)
        reason = Reason.OUTPUT_UNWRITABLE if writing else Reason.MERGE_FAILED
        if isinstance(error, InputChangedError):
            reason = Reason.INPUT_CHANGED
        failed = await _storage_failed(job, status, ledger, "finalize", error, reason=reason, now=now)
        events += failed.events
        retry_in = failed.retry_in
        progress = await ledger.progress()
    else:
        if is_true(status.conditions, JobConditionType.DEGRADED):  # the ledger and the merge work
            await _healthy(job, status, ledger, "finalize", now)
    _counts(job, status, progress)
    if progress.refused:
        _refused(status, job, progress.refused, now)  # whatever status this writer started from
    if progress.state is not None:
        status.phase = progress.state
    if progress.state == Phase.COMPLETED:
        _completed(job, status, progress, now)
    if workers is not None and progress.state not in TERMINAL:
        if workers.admission is not None and not progress.refused:
            _admitted(status, job, workers.admission, now)
        _workers_conditions(job, status, workers, now)
    elif progress.state in TERMINAL:
        _workers_ended(job, status, progress.state, now)
        if retention_seconds is not None and not progress.expiring:
            await ledger.expire_after(retention_seconds)
    elif status.workers.desired or status.workers.ready:  # no pool plans it any more (deleted)
        status.workers = WorkerCounts(desired=0, ready=0)
        _set(status, job, JobConditionType.RUNNING, value=ConditionStatus.FALSE, reason=Reason.POOL_NOT_FOUND,
             message="no pool plans this job now: its template's pool is gone", now=now)  # fmt: skip
    return StatusUpdate(status, events, retry_in)


async def _ledger_corrupt(
    job: BatchInference,
    status: BatchInferenceStatus,
    ledger: JobLedger,
    what: str,
    *,
    now: datetime,
    retention_seconds: float | None,
) -> StatusUpdate:
    """The job's ledger holds what neither the operator nor its workers write (its pods hold its
    ledger credentials): the job fails, naming what, its workers stop, nothing is merged from a
    ledger that cannot be trusted, and its keys go after the retention time."""
    message = (
        f"the job's ledger holds what troughfill does not write ({what}); the job's workers are stopped and "
        "its results are not merged. Anything holding the job's credentials (its pods) can write there"
    )
    await ledger.condemn(what)
    update = _fail(status, job, Reason.LEDGER_CORRUPT, message, now)
    _workers_ended(job, status, Phase.FAILED, now)
    if retention_seconds is not None:
        await ledger.expire_after(retention_seconds)
    return update


async def _cancel_if_asked(
    job: BatchInference,
    status: BatchInferenceStatus,
    ledger: JobLedger,
    store: ObjectStore | None,
    *,
    config: JobConfig,
    progress: Progress,
    now: datetime,
    events: list[Event],
) -> Progress:
    """spec.cancel: merge what is done, the rest as batch_cancelled, and end cancelled (the
    pool stops the workers: a cancelled job is planned none). A job already finalizing ends as
    it would have; the merge waits for a storage grant that admits the job (`store`)."""
    if not job.spec.cancel or store is None or progress.state not in CANCELLABLE:
        return progress
    if progress.state != Phase.CANCELLING:
        await ledger.transition(Phase.CANCELLING)
    report = await finalize(ledger, store, Phase.CANCELLED, config)
    event = Event(Reason.CANCEL_REQUESTED, f"cancelled: {_summary(report)}")
    _ended(job, status, JobConditionType.CANCELLED, event, report=report, now=now, events=events)
    return await ledger.progress()


async def _expire_if_window_ended(
    job: BatchInference,
    status: BatchInferenceStatus,
    ledger: JobLedger,
    store: ObjectStore | None,
    *,
    config: JobConfig,
    progress: Progress,
    now: datetime,
    events: list[Event],
) -> Progress:
    """Past the completion window with work left: merge what is done, the rest as expired."""
    ends = deadline(job)
    if (
        store is None
        or ends is None
        or now < ends
        or progress.all_done
        or progress.state not in {Phase.VALIDATING, Phase.IN_PROGRESS, Phase.FINALIZING}
    ):
        return progress
    report = await finalize(ledger, store, Phase.EXPIRED, config)
    message = f"completion window {job.spec.completion_window} ended: {_summary(report)}"
    event = Event(Reason.WINDOW_ENDED, message, warning=True)
    _ended(job, status, JobConditionType.EXPIRED, event, report=report, now=now, events=events)
    return await ledger.progress()


def _ended(
    job: BatchInference,
    status: BatchInferenceStatus,
    condition: JobConditionType,
    event: Event,
    *,
    report: FinalReport,
    now: datetime,
    events: list[Event],
) -> None:
    """A job ended before every request was done (expired, cancelled): its merged output in the
    status, the condition saying why, the Event."""
    events.append(event)
    status.output_url, status.error_url = report.output_url, report.error_url
    _set(
        status,
        job,
        condition,
        value=ConditionStatus.TRUE,
        reason=event.reason,
        message=event.message,
        now=now,
    )
    status.finished_at = status.finished_at or now


async def _finalize_if_done(
    status: BatchInferenceStatus,
    ledger: JobLedger,
    store: ObjectStore | None,
    config: JobConfig,
    progress: Progress,
    *,
    events: list[Event],
) -> Progress:
    """Every request done: merge the output (idempotent; a retry after a crash converges)."""
    if store is not None and progress.state in MERGED and not progress.cleaned:
        await clean_segments(ledger, store, config)  # the operator stopped between merge and cleanup
        return progress
    if store is None or not progress.all_done or progress.state in TERMINAL:
        return progress
    report = await finalize(ledger, store, config=config)
    events.append(Event(Reason.ALL_REQUESTS_DONE, _summary(report)))
    status.output_url, status.error_url = report.output_url, report.error_url
    return await ledger.progress()


def _counts(job: BatchInference, status: BatchInferenceStatus, progress: Progress) -> None:
    status.request_counts = RequestCounts(
        total=progress.total, completed=progress.completed, failed=progress.failed, resumed=progress.resumed
    )
    status.progress = progress_text(status.request_counts)
    status.tokens = TokenCounts(
        prompt=progress.prompt_tokens,
        completion=progress.completion_tokens,
        cached=progress.cached_tokens,
        wasted=progress.wasted_tokens,
    )
    status.observed_generation = job.metadata.generation


def _completed(job: BatchInference, status: BatchInferenceStatus, progress: Progress, now: datetime) -> None:
    _set(
        status, job, JobConditionType.COMPLETE,
        value=ConditionStatus.TRUE, reason=Reason.ALL_REQUESTS_DONE,
        message=f"{progress.completed} completed, {progress.failed} failed of {progress.total}", now=now,
    )  # fmt: skip
    status.finished_at = status.finished_at or now
    if status.output_url is None:
        status.output_url = join(job.spec.output_url, OUTPUT_FILE)
        status.error_url = join(job.spec.output_url, ERROR_FILE)


def _admitted(status: BatchInferenceStatus, job: BatchInference, admission: Admission, now: datetime) -> None:
    """Admitted follows the pool's latest admission: an admin who narrows a template's flags or
    a namespace's quota or grants stops the job's workers (its progress stays) until it fits again."""
    _set(
        status, job, JobConditionType.ADMITTED,
        value=ConditionStatus.TRUE if admission.allowed else ConditionStatus.FALSE,
        reason=admission.reason, message=admission.message, now=now,
    )  # fmt: skip


def _workers_conditions(
    job: BatchInference, status: BatchInferenceStatus, workers: WorkerView, now: datetime
) -> None:
    """Running and AtRisk from the pool's last cycle; the GPU-seconds its workers held."""
    status.workers = WorkerCounts(desired=workers.desired, ready=workers.ready)
    status.gpu_seconds = max(status.gpu_seconds, workers.gpu_seconds)
    value, reason, message = _running_condition(job, workers)
    _set(status, job, JobConditionType.RUNNING, value=value, reason=reason, message=message, now=now)
    _set(
        status, job, JobConditionType.AT_RISK,
        value=ConditionStatus.TRUE if workers.at_risk else ConditionStatus.FALSE,
        reason=Reason.DEADLINE_AT_RISK if workers.at_risk else Reason.ON_TRACK,
        message="the deadline is missed at the current pace" if workers.at_risk else "on track",
        now=now,
    )  # fmt: skip


def _workers_ended(job: BatchInference, status: BatchInferenceStatus, state: Phase, now: datetime) -> None:
    status.workers = WorkerCounts(desired=0, ready=0)
    if find_condition(status.conditions, JobConditionType.RUNNING) is not None:
        ended = {
            Phase.COMPLETED: Reason.ALL_REQUESTS_DONE,
            Phase.EXPIRED: Reason.WINDOW_ENDED,
            Phase.CANCELLED: Reason.CANCEL_REQUESTED,
        }
        _set(
            status, job, JobConditionType.RUNNING, value=ConditionStatus.FALSE,
            reason=ended.get(state, Reason.DELETED),
            message=f"the job is {state.value}", now=now,
        )  # fmt: skip


def _summary(report: FinalReport) -> str:
    return f"{report.outputs} results, {report.errors} errors in {report.output_url}"


async def cancel(
    ledger: JobLedger, store: ObjectStore | None, config: JobConfig | None
) -> FinalReport | None:
    """The job is deleted: what is done is merged (the rest as batch_cancelled), then the ledger
    goes and its output prefix is free for another job.

    Nothing to merge for a job that already ended or was never recorded, for one whose spec
    cannot be read (`config` None: its output location is not taken from Redis), nor for one no
    storage grant admits any more (`store` None).
    """
    report = None
    try:
        state = await ledger.state()
        if config is not None and store is not None and state is not None and state not in TERMINAL:
            if state == Phase.FINALIZING:
                progress = await ledger.progress()
                outcome = Phase.COMPLETED if progress.all_done else Phase.EXPIRED
                report = await finalize(ledger, store, outcome, config)
            else:
                if state != Phase.CANCELLING:
                    await ledger.transition(Phase.CANCELLING)
                report = await finalize(ledger, store, Phase.CANCELLED, config)
    except LedgerCorruptError:
        report = None  # nothing is merged from a ledger that cannot be trusted; the job still goes
    await ledger.delete()
    if config is not None:
        await OutputClaims(ledger.client).release(as_prefix(config.output_url), ledger.keys)
    return report


async def spec_changed(
    old: BatchInference, new: BatchInference, ledger: JobLedger, now: datetime
) -> StatusUpdate | None:
    """An update to a running job's spec. Changes to fields fixed at admission (input, output,
    endpoint, template, window, engine flags) are refused: a cluster without CEL rules accepts
    them, so the operator stops acting on the job instead (Admitted=False; its workers stop,
    its progress stays; delete it to get the partial output). A suspend toggle is announced.
    None when there is nothing to say."""
    if new.status is None or new.status.phase in TERMINAL:
        return None
    changed = immutable_changes(old.spec, new.spec)
    if changed:
        status = _status(new)
        message = (
            f"{', '.join(changed)} cannot change once a job is admitted; the operator no longer acts on "
            "this job (its progress is kept): delete it (partial output is written) and create a new one"
        )
        await ledger.mark_refused(message)
        _refused(status, new, message, now)
        return StatusUpdate(status, [Event(Reason.IMMUTABLE_FIELD_CHANGED, message, warning=True)])
    if new.spec.cancel and not old.spec.cancel:
        message = "cancel requested: workers stop, finished results are merged, the rest is batch_cancelled"
        return StatusUpdate(_status(new), [Event(Reason.CANCEL_REQUESTED, message)])
    if old.spec.suspend != new.spec.suspend:
        if new.spec.suspend:
            event = Event(Reason.SUSPENDED, "suspended: every worker stops, progress is kept")
        else:
            event = Event(Reason.RESUMED, "resumed: workers start again as the trough allows")
        return StatusUpdate(_status(new), [event])
    return None


def _refused(status: BatchInferenceStatus, job: BatchInference, message: str, now: datetime) -> None:
    _set(
        status,
        job,
        JobConditionType.ADMITTED,
        value=ConditionStatus.FALSE,
        reason=Reason.IMMUTABLE_FIELD_CHANGED,
        message=message,
        now=now,
    )


def template_status(template: ModelTemplate, pool: BatchPool | None, now: datetime) -> ModelTemplateStatus:
    """Ready when the template's pool exists (the model validated when the object was parsed)."""
    status = template.status.model_copy(deep=True) if template.status else ModelTemplateStatus()
    name = template.spec.pool_ref
    status.observed_generation = template.metadata.generation
    status.conditions = set_condition(
        status.conditions,
        TemplateConditionType.READY,
        status=ConditionStatus.TRUE if pool else ConditionStatus.FALSE,
        reason=Reason.POOL_FOUND if pool else Reason.POOL_NOT_FOUND,
        message=f"BatchPool {name} exists"
        if pool
        else f"BatchPool {name} not found: jobs using this template wait",
        now=now,
        observed_generation=template.metadata.generation,
    )
    return status


def now_utc() -> datetime:
    return datetime.now(UTC)
