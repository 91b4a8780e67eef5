"""BatchInference: one offline batch of OpenAI-format requests, run in the trough of online demand."""

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from troughfill import constants
from troughfill.api.base import (
    LIST_MAP_KEYS_KEY,
    LIST_TYPE_KEY,
    ApiModel,
    Rule,
    StatusModel,
    immutable,
    latch,
    list_map,
)
from troughfill.api.conditions import Condition
from troughfill.api.resource import CrdInfo, PrinterColumn, Resource, Scope
from troughfill.api.types import (
    ENGINE_ARG_VALUE_PATTERN,
    DnsSubdomain,
    Duration,
    EngineArgName,
    StorageURL,
    duration_rule,
)


class Endpoint(StrEnum):
    """The OpenAI-compatible endpoint every request line of the input targets."""

    CHAT_COMPLETIONS = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"
    EMBEDDINGS = "/v1/embeddings"


class Phase(StrEnum):
    """OpenAI Batch statuses; a summary of the conditions for printer columns."""

    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


class RetryPolicy(ApiModel):
    """How often a request is tried before it is given up."""

    max_attempts: int = Field(default=3, ge=1, le=constants.MAX_RETRY_ATTEMPTS)
    """Attempts per request before it goes to the error file."""


class EngineArg(ApiModel):
    """One engine flag, e.g. {name: max-num-seqs, value: "128"} for `--max-num-seqs 128`."""

    name: EngineArgName
    value: Annotated[str, StringConstraints(max_length=256, pattern=ENGINE_ARG_VALUE_PATTERN)]
    """Passed as the argument after `--name`; it may not start with "-" (a negative number may)."""


MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=constants.MAX_METADATA_KEY_LENGTH)]
MetadataValue = Annotated[str, StringConstraints(max_length=constants.MAX_METADATA_VALUE_LENGTH)]


class BatchInferenceSpec(ApiModel):
    input_url: StorageURL = immutable(alias="inputURL")
    """JSONL in the OpenAI Batch format (custom_id, method, url, body), file:// or s3://."""
    output_url: StorageURL = immutable(alias="outputURL")
    """Prefix under which output.jsonl and errors.jsonl are written."""
    endpoint: Endpoint = immutable(default=Endpoint.CHAT_COMPLETIONS)
    """Every input line's url must equal this."""
    template_ref: DnsSubdomain = immutable()
    """Name of an admin-approved ModelTemplate; it fixes image, model, GPUs and pool."""
    completion_window: Duration = immutable(default="24h")
    """Time from creation after which unfinished requests are cancelled as batch_expired."""
    priority_class_name: DnsSubdomain | None = None
    """A PriorityClass the pool allows for this namespace; the pool's default when unset."""
    min_workers: int = Field(default=0, ge=0, le=constants.MAX_WORKERS_PER_JOB)
    """Workers this job gets before its class shares the trough (never beyond the trough or quota)."""
    max_workers: int | None = Field(default=None, ge=1, le=constants.MAX_WORKERS_PER_JOB)
    """Upper bound on workers; unbounded (quota and trough permitting) when unset."""
    suspend: bool = False
    """Stop every worker, keeping progress; set back to false to resume."""
    cancel: bool = latch()
    """Cancel the job and keep it: workers stop, finished results are merged into the output (the
    rest as batch_cancelled errors) and the job ends cancelled. Cannot be undone. (Deleting the
    job cancels it the same way, and removes it.)"""
    engine_args: list[EngineArg] = immutable(
        default_factory=list,
        max_length=32,
        json_schema_extra={LIST_TYPE_KEY: "map", LIST_MAP_KEYS_KEY: ["name"]},
    )
    """vLLM flags to override; only those the template allowlists."""
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    metadata: dict[MetadataKey, MetadataValue] = Field(
        default_factory=dict, max_length=constants.MAX_METADATA_KEYS
    )
    """Free-form labels kept with the batch, as in OpenAI's Batch API."""

    rules = (
        Rule(
            cel="!has(self.maxWorkers) || self.minWorkers <= self.maxWorkers",
            message="minWorkers must not exceed maxWorkers",
            holds=lambda s: s.max_workers is None or s.min_workers <= s.max_workers,
        ),
        duration_rule("completionWindow", constants.MIN_COMPLETION_WINDOW, constants.MAX_COMPLETION_WINDOW),
    )


class RequestCounts(StatusModel):
    total: int = Field(default=0, ge=0)
    completed: int = Field(default=0, ge=0)
    failed: int = Field(default=0, ge=0)
    resumed: int = Field(default=0, ge=0)
    """Requests a worker continued from another's saved partial output (after a yield)."""


class WorkerCounts(StatusModel):
    desired: int = Field(default=0, ge=0)
    ready: int = Field(default=0, ge=0)


class TokenCounts(StatusModel):
    prompt: int = Field(default=0, ge=0)
    completion: int = Field(default=0, ge=0)
    cached: int = Field(default=0, ge=0)
    wasted: int = Field(default=0, ge=0)
    """Generated and thrown away: attempts cut short with nothing saved to resume from."""


class BatchInferenceStatus(StatusModel):
    observed_generation: int | None = Field(default=None, ge=0)
    phase: Phase | None = None
    conditions: list[Condition] = list_map("type", max_length=constants.MAX_CONDITIONS)
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    progress: str | None = Field(default=None, max_length=64)
    """Completed and failed over total, for printer columns (e.g. "420/1000 (42%)")."""
    workers: WorkerCounts = Field(default_factory=WorkerCounts)
    tokens: TokenCounts = Field(default_factory=TokenCounts)
    gpu_seconds: float = Field(default=0.0, ge=0)
    """GPU time batch workers of this job have held, for cost accounting."""
    started_at: datetime | None = None
    finished_at: datetime | None = None
    output_url: str | None = Field(default=None, alias="outputURL")
    error_url: str | None = Field(default=None, alias="errorURL")


def progress_text(counts: RequestCounts) -> str:
    done = counts.completed + counts.failed
    percent = 100 * done // counts.total if counts.total else 0
    return f"{done}/{counts.total} ({percent}%)"


class BatchInference(Resource):
    """An offline batch of OpenAI-format requests that runs in GPU capacity online serving leaves idle."""

    crd = CrdInfo(
        kind=constants.KIND_BATCH_INFERENCE,
        plural="batchinferences",
        singular="batchinference",
        scope=Scope.NAMESPACED,
        short_names=("bi",),
        printer_columns=(
            PrinterColumn("Phase", ".status.phase"),
            PrinterColumn("Progress", ".status.progress"),
            PrinterColumn("Workers", ".status.workers.ready", "integer", "Ready workers"),
            PrinterColumn("Desired", ".status.workers.desired", "integer", "Workers the planner wants", 1),
            PrinterColumn("Template", ".spec.templateRef"),
            PrinterColumn("Age", ".metadata.creationTimestamp", "date"),
        ),
    )

    kind: Literal["BatchInference"] = "BatchInference"
    spec: BatchInferenceSpec
    status: BatchInferenceStatus | None = None
