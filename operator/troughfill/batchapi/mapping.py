"""Between OpenAI's Batch API and BatchInference (pure).

Ids map one to one to what is on the cluster:
- a batch is `batch_<name>` for the BatchInference `<name>` in the caller's namespace;
- an uploaded file is `file-<32 hex>`, stored under the namespace's grant;
- a job's own files are `file-input.<name>`, `file-output.<name>`, `file-errors.<name>`
  (its inputURL and the output and error files its status names), so a job made with kubectl
  reads the same through the API as one made by a client.
"""

import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from troughfill import constants
from troughfill.api.batchinference import BatchInference, Endpoint, Phase
from troughfill.api.conditions import Condition, JobConditionType, find_condition
from troughfill.api.types import duration_between, parse_duration
from troughfill.batchapi.wire import (
    Batch,
    BatchError,
    BatchErrors,
    CreateBatch,
    InputTokensDetails,
    OutputTokensDetails,
    RequestCounts,
    Usage,
)

BATCH_PREFIX = "batch_"
UPLOAD_PREFIX = "file-"
NAME_PATTERN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
UPLOAD_PATTERN = re.compile(r"^file-[0-9a-f]{32}$")
TEMPLATE_METADATA_KEY = "troughfill.io/template"
"""A batch's metadata key naming its ModelTemplate (else the namespace's default template)."""
DEFAULT_TEMPLATE_ANNOTATION = f"{constants.ANNOTATION_PREFIX}/default-template"
"""On a Namespace (set by an admin): the template its batches use unless their metadata names one."""
INPUT_FILE_ANNOTATION = f"{constants.ANNOTATION_PREFIX}/openai-input-file-id"
CANCEL_ANNOTATION = f"{constants.ANNOTATION_PREFIX}/cancel-requested-at"
"""When a client asked to cancel (Unix seconds): the batch's cancelling_at."""
CREATED_BY_LABEL = f"{constants.ANNOTATION_PREFIX}/created-by"
CREATED_BY_VALUE = "openai-batch-api"


class JobFile(StrEnum):
    INPUT = "input"
    OUTPUT = "output"
    ERRORS = "errors"


@dataclass(frozen=True)
class FileRef:
    """What a file id names: an uploaded object, or one of a job's own files."""

    upload: str | None = None
    job: str | None = None
    part: JobFile | None = None


def batch_id(name: str) -> str:
    return BATCH_PREFIX + name


def job_name(batch: str) -> str | None:
    """The BatchInference a batch id names (None: not a batch id)."""
    if not batch.startswith(BATCH_PREFIX):
        return None
    name = batch[len(BATCH_PREFIX) :]
    return name if len(name) <= 253 and NAME_PATTERN.match(name) else None


def new_upload_id() -> str:
    return UPLOAD_PREFIX + secrets.token_hex(16)


def new_job_name() -> str:
    """A fresh BatchInference name for a batch the API creates (its id: batch_<name>)."""
    return "b-" + secrets.token_hex(12)


def job_file_id(part: JobFile, name: str) -> str:
    return f"{UPLOAD_PREFIX}{part.value}.{name}"


def parse_file_id(file_id: str) -> FileRef | None:
    if UPLOAD_PATTERN.match(file_id):
        return FileRef(upload=file_id)
    for part in JobFile:
        prefix = f"{UPLOAD_PREFIX}{part.value}."
        if file_id.startswith(prefix):
            name = file_id[len(prefix) :]
            if len(name) <= 253 and NAME_PATTERN.match(name):
                return FileRef(job=name, part=part)
    return None


def seconds(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


def _since(conditions: list[Condition], kind: JobConditionType) -> int | None:
    found = find_condition(conditions, kind)
    return seconds(found.last_transition_time) if found is not None and found.status == "True" else None


def _errors(conditions: list[Condition], phase: Phase) -> BatchErrors | None:
    """Why the batch failed as a whole (each request's error is in the error file)."""
    if phase != Phase.FAILED:
        return None
    failed = find_condition(conditions, JobConditionType.FAILED)
    refused = find_condition(conditions, JobConditionType.ADMITTED)
    found = [
        BatchError(code=c.reason, message=c.message)
        for c, why in ((failed, "True"), (refused, "False"))
        if c is not None and c.status == why
    ]
    return BatchErrors(data=found)


def to_batch(job: BatchInference, now: datetime) -> Batch:
    """The Batch object the BatchInference is."""
    spec, status, meta = job.spec, job.status, job.metadata
    name = meta.name
    conditions = status.conditions if status else []
    phase = status.phase if status and status.phase else Phase.VALIDATING
    created = meta.creationTimestamp or now
    counts = status.request_counts if status else None
    tokens = status.tokens if status else None
    cancelled = _since(conditions, JobConditionType.CANCELLED) if phase == Phase.CANCELLED else None
    output = job_file_id(JobFile.OUTPUT, name) if status and status.output_url else None
    errors = job_file_id(JobFile.ERRORS, name) if status and status.error_url else None
    troughfill: dict[str, Any] = {
        "namespace": meta.ns,
        "name": name,
        "template": spec.template_ref,
        "gpu_seconds": round(status.gpu_seconds, 3) if status else 0.0,
        "suspended": spec.suspend,
    }
    if status and status.progress:
        troughfill["progress"] = status.progress
    return Batch(
        id=batch_id(name),
        endpoint=spec.endpoint.value,
        input_file_id=meta.annotations.get(INPUT_FILE_ANNOTATION) or job_file_id(JobFile.INPUT, name),
        completion_window=spec.completion_window,
        status=phase.value,  # Phase's values are OpenAI's statuses
        created_at=int(created.timestamp()),
        errors=_errors(conditions, phase),
        output_file_id=output,
        error_file_id=errors,
        in_progress_at=seconds(status.started_at) if status else None,
        expires_at=int((created + parse_duration(spec.completion_window)).timestamp()),
        completed_at=_since(conditions, JobConditionType.COMPLETE),
        failed_at=_since(conditions, JobConditionType.FAILED),
        expired_at=_since(conditions, JobConditionType.EXPIRED),
        cancelling_at=cancelled,
        cancelled_at=cancelled,
        request_counts=RequestCounts(
            total=counts.total if counts else 0,
            completed=counts.completed if counts else 0,
            failed=counts.failed if counts else 0,
        ),
        metadata=dict(spec.metadata) or None,
        usage=(
            Usage(
                input_tokens=tokens.prompt,
                input_tokens_details=InputTokensDetails(cached_tokens=tokens.cached),
                output_tokens=tokens.completion,
                output_tokens_details=OutputTokensDetails(reasoning_tokens=0),
                total_tokens=tokens.prompt + tokens.completion,
            )
            if tokens
            else None
        ),
        troughfill=troughfill,
    )


class CreateProblem(ValueError):  # noqa: N818 - a client mistake, told back as a 400
    """A create-batch request that cannot become a BatchInference; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def endpoint_of(request: CreateBatch) -> Endpoint:
    try:
        return Endpoint(request.endpoint)
    except ValueError:
        supported = ", ".join(e.value for e in Endpoint)
        raise CreateProblem(
            f"endpoint {request.endpoint!r} is not supported (supported: {supported})", "endpoint"
        ) from None


def completion_window_of(request: CreateBatch) -> str:
    """OpenAI's "24h", or any duration troughfill's bounds allow."""
    window = request.completion_window
    try:
        within = duration_between(window, constants.MIN_COMPLETION_WINDOW, constants.MAX_COMPLETION_WINDOW)
    except ValueError:
        within = False
    if not within:
        raise CreateProblem(
            f"completion_window {window!r} must be a duration from {constants.MIN_COMPLETION_WINDOW} "
            f"to {constants.MAX_COMPLETION_WINDOW} (e.g. 24h)",
            "completion_window",
        )
    return window


def job_manifest(
    *,
    name: str,
    namespace: str,
    request: CreateBatch,
    input_url: str,
    output_url: str,
    template: str,
) -> dict[str, Any]:
    """The BatchInference a create-batch request becomes."""
    endpoint = endpoint_of(request)
    window = completion_window_of(request)
    return {
        "apiVersion": constants.GROUP_VERSION,
        "kind": constants.KIND_BATCH_INFERENCE,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {CREATED_BY_LABEL: CREATED_BY_VALUE},
            "annotations": {INPUT_FILE_ANNOTATION: request.input_file_id},
        },
        "spec": {
            "inputURL": input_url,
            "outputURL": output_url,
            "endpoint": endpoint.value,
            "templateRef": template,
            "completionWindow": window,
            "metadata": dict(request.metadata or {}),
        },
    }
