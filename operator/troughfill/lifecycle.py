"""A BatchInference's life as status: admission, indexing its input, progress, completion, deletion.

No Kopf here: the handlers look objects up, call these functions and write what they return
(the status, and Events to post). Each function is idempotent, so a handler retried after a
crash or an operator restart converges to the same status.
"""

from dataclasses import dataclass, field
from datetime import UTC, datetime

from redis.asyncio import Redis

from troughfill.api.admission import Admission
from troughfill.api.batchinference import (
    BatchInference,
    BatchInferenceStatus,
    Phase,
    RequestCounts,
    TokenCounts,
    progress_text,
)
from troughfill.api.conditions import ConditionStatus, JobConditionType, Reason, set_condition
from troughfill.jobs import finalize, index_input
from troughfill.ledger import TERMINAL, JobConfig, JobKeys, JobLedger
from troughfill.storage import ERROR_FILE, OUTPUT_FILE, ObjectStore, join


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


def ledger_for(job: BatchInference, client: Redis) -> JobLedger:
    meta = job.metadata
    return JobLedger(client, JobKeys(meta.namespace or "default", meta.name, meta.uid or ""))


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


async def start(
    job: BatchInference, admission: Admission, ledger: JobLedger, store: ObjectStore, now: datetime
) -> StatusUpdate:
    """Admit the job (or refuse it), record it in the ledger and index its input."""
    if not admission.allowed:
        return refuse(job, admission.reason, admission.message, now)
    spec = job.spec
    created = await ledger.create(
        JobConfig(spec.input_url, spec.output_url, spec.endpoint, spec.retry.max_attempts)
    )
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
            report = await index_input(ledger, store)
        except (OSError, ValueError) as error:
            message = f"input {spec.input_url} cannot be read: {error}"
            outcome = refuse(job, Reason.INPUT_UNREADABLE, message, now)
            outcome.status.conditions = [
                c for c in outcome.status.conditions if c.type != JobConditionType.ADMITTED
            ] + [c for c in status.conditions if c.type == JobConditionType.ADMITTED]
            return outcome
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


async def refresh_status(
    job: BatchInference, status: BatchInferenceStatus, ledger: JobLedger, store: ObjectStore, now: datetime
) -> StatusUpdate:
    """Counts and phase from the ledger; once every request is done, merge the output and complete."""
    progress = await ledger.progress()
    events: list[Event] = []
    if progress.all_done and progress.state not in TERMINAL:
        report = await finalize(ledger, store)
        message = f"{report.outputs} results, {report.errors} errors in {report.output_url}"
        events.append(Event(Reason.ALL_REQUESTS_DONE, message))
        status.output_url, status.error_url = report.output_url, report.error_url
        progress = await ledger.progress()
    status.request_counts = RequestCounts(
        total=progress.total, completed=progress.completed, failed=progress.failed
    )
    status.progress = progress_text(status.request_counts)
    status.tokens = TokenCounts(
        prompt=progress.prompt_tokens, completion=progress.completion_tokens, cached=progress.cached_tokens
    )
    status.observed_generation = job.metadata.generation
    if progress.state is not None:
        status.phase = progress.state
    if progress.state == Phase.COMPLETED:
        _set(
            status, job, JobConditionType.COMPLETE,
            value=ConditionStatus.TRUE, reason=Reason.ALL_REQUESTS_DONE,
            message=f"{progress.completed} completed, {progress.failed} failed of {progress.total}", now=now,
        )  # fmt: skip
        status.finished_at = status.finished_at or now
        if status.output_url is None:
            config = await ledger.config()
            status.output_url = join(config.output_url, OUTPUT_FILE)
            status.error_url = join(config.output_url, ERROR_FILE)
    return StatusUpdate(status, events)


def now_utc() -> datetime:
    return datetime.now(UTC)
