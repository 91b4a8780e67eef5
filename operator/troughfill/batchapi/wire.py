"""OpenAI's Batch and File objects, list pages and errors, as the official client reads them."""

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from troughfill import constants

BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]
FilePurpose = Literal["batch", "batch_output"]
T = TypeVar("T")


class WireModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileObject(WireModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int = Field(ge=0)
    created_at: int
    filename: str
    purpose: FilePurpose
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileDeleted(WireModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class RequestCounts(WireModel):
    total: int = Field(ge=0)
    completed: int = Field(ge=0)
    failed: int = Field(ge=0)


class BatchError(WireModel):
    code: str | None = None
    message: str | None = None
    param: str | None = None
    line: int | None = None


class BatchErrors(WireModel):
    object: Literal["list"] = "list"
    data: list[BatchError] = Field(default_factory=list)


class InputTokensDetails(WireModel):
    cached_tokens: int = Field(ge=0)


class OutputTokensDetails(WireModel):
    reasoning_tokens: int = Field(ge=0)


class Usage(WireModel):
    input_tokens: int = Field(ge=0)
    input_tokens_details: InputTokensDetails
    output_tokens: int = Field(ge=0)
    output_tokens_details: OutputTokensDetails
    total_tokens: int = Field(ge=0)


class Batch(WireModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    input_file_id: str
    completion_window: str
    """troughfill accepts windows other than OpenAI's only "24h" (up to 168h)."""
    status: BatchStatus
    created_at: int
    errors: BatchErrors | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None
    model: str | None = None
    usage: Usage | None = None
    troughfill: dict[str, Any] = Field(default_factory=dict)
    """troughfill's additions (the custom resource's namespace and name, its template, GPU-seconds,
    phase reason): clients that do not know the field ignore it."""


MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=constants.MAX_METADATA_KEY_LENGTH)]
MetadataValue = Annotated[str, StringConstraints(max_length=constants.MAX_METADATA_VALUE_LENGTH)]


class CreateBatch(WireModel):
    """The body of POST /v1/batches (unknown fields are refused, as OpenAI does)."""

    input_file_id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    endpoint: str
    completion_window: str
    metadata: dict[MetadataKey, MetadataValue] | None = Field(
        default=None, max_length=constants.MAX_METADATA_KEYS
    )
    output_expires_after: dict[str, Any] | None = None
    """Accepted for compatibility; output lives as long as the storage grant keeps it."""


class Page(WireModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class ErrorBody(WireModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(WireModel):
    error: ErrorBody
