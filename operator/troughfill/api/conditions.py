"""Status conditions: the metav1.Condition shape, the condition types and their documented reasons.

Conditions are the status API (`kubectl wait --for=condition=Complete bi/NAME`); `phase`
is only a one-word summary for printer columns. Reasons are CamelCase constants so
alerts and scripts can match on them; messages are for people.
"""

from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import Field, StringConstraints

from troughfill import constants
from troughfill.api.base import StatusModel


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class JobConditionType(StrEnum):
    """Conditions of a BatchInference."""

    ADMITTED = "Admitted"
    """The spec passed admission against its template and pool."""
    RUNNING = "Running"
    """At least one worker is ready and work remains."""
    YIELDING = "Yielding"
    """Workers are being stopped because online serving needs the GPUs."""
    COMPLETE = "Complete"
    """Every request has a result or an error; output is merged."""
    FAILED = "Failed"
    """The job cannot finish (bad input, crash loop, admission refused)."""
    EXPIRED = "Expired"
    """The completion window ended; remaining requests went to the error file as batch_expired."""
    CANCELLED = "Cancelled"
    """The job was deleted or cancelled; partial results are kept."""
    AT_RISK = "AtRisk"
    """At the current harvest rate the job will not finish inside its completion window."""
    DEGRADED = "Degraded"
    """Something the job needs (its storage, the ledger) is failing; it is retried with back-off."""


class PoolConditionType(StrEnum):
    """Conditions of a BatchPool."""

    SIGNAL_READY = "SignalReady"
    """Online demand was read from Prometheus within the staleness limit."""
    PRIORITY_CLASSES_READY = "PriorityClassesReady"
    """Every PriorityClass the pool lets jobs use exists (workers naming a missing one are refused)."""


class TemplateConditionType(StrEnum):
    """Conditions of a ModelTemplate."""

    READY = "Ready"
    """The template is valid and its pool exists."""


class Reason(StrEnum):
    """Every reason the operator writes; one place so they stay documented and unique."""

    ADMITTED = "Admitted"
    TEMPLATE_NOT_FOUND = "TemplateNotFound"
    POOL_NOT_FOUND = "PoolNotFound"
    ENGINE_ARG_NOT_ALLOWED = "EngineArgNotAllowed"
    PRIORITY_CLASS_NOT_ALLOWED = "PriorityClassNotAllowed"
    NAMESPACE_NOT_IN_QUOTA = "NamespaceNotInQuota"
    QUOTA_EXCEEDED = "QuotaExceeded"
    STORAGE_NOT_GRANTED = "StorageNotGranted"
    OUTPUT_IN_USE = "OutputInUse"
    INVALID_SPEC = "InvalidSpec"
    IMMUTABLE_FIELD_CHANGED = "ImmutableFieldChanged"
    INPUT_UNREADABLE = "InputUnreadable"
    OUTPUT_UNWRITABLE = "OutputUnwritable"
    INPUT_CHANGED = "InputChanged"
    INPUT_TOO_LARGE = "InputTooLarge"
    REQUEST_QUOTA_EXCEEDED = "RequestQuotaExceeded"
    MERGE_FAILED = "MergeFailed"
    LEDGER_UNAVAILABLE = "LedgerUnavailable"
    LEDGER_CORRUPT = "LedgerCorrupt"
    """The job's ledger holds what troughfill does not write (its pods can write it): the job
    fails, its workers stop, nothing is merged; no other job is affected."""
    HEALTHY = "Healthy"
    WORKERS_READY = "WorkersReady"
    WAITING_FOR_TROUGH = "WaitingForTrough"
    SUSPENDED = "Suspended"
    ONLINE_DEMAND = "OnlineDemand"
    SIGNAL_STALE = "SignalStale"
    ALL_REQUESTS_DONE = "AllRequestsDone"
    CRASH_LOOP = "CrashLoop"
    WINDOW_ENDED = "CompletionWindowEnded"
    DELETED = "Deleted"
    DEADLINE_AT_RISK = "DeadlineAtRisk"
    ON_TRACK = "OnTrack"
    SIGNAL_FRESH = "SignalFresh"
    POOL_FOUND = "PoolFound"
    PRIORITY_CLASSES_FOUND = "PriorityClassesFound"
    PRIORITY_CLASS_MISSING = "PriorityClassMissing"
    RESUMED = "Resumed"
    CANCEL_REQUESTED = "CancelRequested"
    TEMPLATE_DELETED = "TemplateDeleted"
    # Events of a pool's planning cycle
    SCALE_UP = "ScaleUp"
    SCALE_DOWN = "ScaleDown"
    YIELD = "Yield"
    WORKER_STOPPED = "WorkerStopped"
    """A stopped worker is gone and its GPUs free; the message says how long after the decision."""
    WORKER_CREATE_FAILED = "WorkerCreateFailed"


ConditionType = Annotated[str, StringConstraints(pattern=r"^[A-Z][A-Za-z0-9]*$", max_length=316)]


class Condition(StatusModel):
    """A metav1.Condition: what is true of the object now, why, and since when."""

    type: ConditionType
    status: ConditionStatus
    reason: Annotated[
        str, StringConstraints(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)
    ]
    message: Annotated[str, StringConstraints(max_length=32768)] = ""
    observed_generation: int | None = Field(default=None, ge=0)
    last_transition_time: datetime


def find_condition(conditions: list[Condition], condition_type: str) -> Condition | None:
    return next((c for c in conditions if c.type == condition_type), None)


def set_condition(
    conditions: list[Condition],
    condition_type: str,
    *,
    status: ConditionStatus,
    reason: Reason,
    message: str,
    now: datetime,
    observed_generation: int | None = None,
) -> list[Condition]:
    """A new list with one condition set; lastTransitionTime moves only when the status flips.

    Returns an equal list when nothing changed, so callers can skip the status write.
    """
    previous = find_condition(conditions, condition_type)
    since = previous.last_transition_time if previous and previous.status == status else now
    updated = Condition(
        type=condition_type,
        status=status,
        reason=reason,
        message=message,
        observed_generation=observed_generation,
        last_transition_time=since,
    )
    kept = [c for c in conditions if c.type != condition_type]
    if len(kept) >= constants.MAX_CONDITIONS:
        raise ValueError(f"more than {constants.MAX_CONDITIONS} condition types on one object")
    if previous is None:
        return [*kept, updated]
    return [updated if c.type == condition_type else c for c in conditions]


def is_true(conditions: list[Condition], condition_type: str) -> bool:
    found = find_condition(conditions, condition_type)
    return found is not None and found.status == ConditionStatus.TRUE
