"""One line of an OpenAI Batch input file: {"custom_id", "method", "url", "body"}."""

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError, model_validator

from troughfill.api.batchinference import Endpoint

CustomId = Annotated[str, StringConstraints(min_length=1, max_length=512)]


MAX_INT32 = 2**31 - 1
# Body fields that, if malformed, the engine would refuse on every attempt (or worse, accept in
# a form the worker cannot read): checked once, at indexing, so the line gets an error line of
# its own instead of being retried until it is dead-lettered.
COUNT_FIELDS = {"max_tokens": 1, "max_completion_tokens": 1, "n": 1}
"""name -> smallest value; at most MAX_INT32."""
NUMBER_FIELDS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed")


def _body_problem(body: dict[str, Any]) -> str | None:
    if body.get("stream") not in (None, False):
        return "body.stream: a batch returns whole responses; streaming is not supported"
    for name, low in COUNT_FIELDS.items():
        value = body.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_INT32
        ):
            return f"body.{name}: must be an integer from {low} to {MAX_INT32}, not {value!r}"[:300]
    for name in NUMBER_FIELDS:
        value = body.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
        ):
            return f"body.{name}: must be a finite number, not {value!r}"[:300]
    return None


class RequestLine(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    custom_id: CustomId
    method: Literal["POST"]
    url: Endpoint
    body: dict[str, Any]

    @model_validator(mode="after")
    def _body_is_one_an_engine_can_answer(self) -> "RequestLine":
        problem = _body_problem(self.body)
        if problem:
            raise ValueError(problem)
        return self


@dataclass
class LineProblem:
    line_number: int
    """1-based, as editors show it."""
    custom_id: str | None
    message: str


@dataclass
class InputSummary:
    lines: int = 0
    valid: int = 0
    problems: list[LineProblem] = field(default_factory=list)


def check_lines(lines: Iterable[str], endpoint: Endpoint) -> InputSummary:
    """Validate every line against the format, the job's endpoint and custom_id uniqueness."""
    summary = InputSummary()
    seen: set[str] = set()
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        summary.lines += 1
        line, code, message = classify_line(text.encode(), endpoint)
        custom_id = line.custom_id if line else None
        if code is None and custom_id in seen:
            code, message = ErrorCode.DUPLICATE_CUSTOM_ID, "duplicate custom_id"
        if code is None and line is not None:
            seen.add(line.custom_id)
            summary.valid += 1
        else:
            summary.problems.append(LineProblem(number, custom_id, message))
    return summary


# OpenAI Batch output and error lines. A request's id is derived from the job and the line,
# so a request redone after a crash gets the same id as the first attempt would have.


def request_id(job_token: str, index: int) -> str:
    return f"batch_req_{job_token}_{index}"


def output_record(
    job_token: str, index: int, custom_id: str, *, status_code: int, body: dict[str, Any], upstream_id: str
) -> dict[str, Any]:
    """A line of the output file: the engine's answer to one request."""
    return {
        "id": request_id(job_token, index),
        "custom_id": custom_id,
        "response": {"status_code": status_code, "request_id": upstream_id, "body": body},
        "error": None,
    }


class ErrorCode:
    """`error.code` values of the error file."""

    INVALID_JSON_LINE = "invalid_json_line"
    INVALID_REQUEST = "invalid_request"
    WRONG_URL = "invalid_url"
    DUPLICATE_CUSTOM_ID = "duplicate_custom_id"
    LINE_TOO_LONG = "line_too_long"
    MAX_ATTEMPTS = "max_attempts_exceeded"
    CRASHED_ENGINE = "request_crashed_engine"
    EXPIRED = "batch_expired"
    CANCELLED = "batch_cancelled"


ERROR_MESSAGES = {
    ErrorCode.MAX_ATTEMPTS: "The request failed on every attempt its job allows.",
    ErrorCode.CRASHED_ENGINE: "The inference engine died twice while it served this request alone.",
    ErrorCode.EXPIRED: "This request could not be executed before the completion window expired.",
    ErrorCode.CANCELLED: "This request was not executed because the batch was cancelled.",
}


def error_record(
    job_token: str,
    index: int,
    custom_id: str | None,
    code: str,
    *,
    message: str | None = None,
    response: dict[str, Any] | None = None,
    line: int | None = None,
) -> dict[str, Any]:
    """A line of the error file; `line` (1-based, as editors count) where the input line was at fault."""
    error: dict[str, Any] = {"code": code, "message": message or ERROR_MESSAGES.get(code, code)}
    if line is not None:
        error["line"] = line
    return {"id": request_id(job_token, index), "custom_id": custom_id, "response": response, "error": error}


MAX_JSON_CONTAINERS = 65_536
"""The most JSON objects and arrays one input line may hold (counted before parsing: a line of
`[{},{},...]` is 3 bytes an object raw and some 100 parsed, so the raw size alone does not bound
what parsing one line holds). A real request holds a few hundred."""


def line_problem(raw: bytes) -> str | None:
    """Why a line is refused before it is parsed (None: it may be parsed)."""
    containers = raw.count(b"{") + raw.count(b"[")
    if containers > MAX_JSON_CONTAINERS:
        return f"line holds {containers} JSON objects and arrays, over the {MAX_JSON_CONTAINERS} allowed"
    return None


def classify_line(raw: bytes, endpoint: Endpoint) -> tuple[RequestLine | None, str | None, str]:
    """(parsed line, error code, message) for one raw input line; the code is None when it is valid.

    Duplicate custom_ids need the whole file and are the caller's to detect.
    """
    problem = line_problem(raw)
    if problem is not None:
        return None, ErrorCode.INVALID_REQUEST, problem
    try:
        line = RequestLine.model_validate_json(raw)
    except ValidationError as error:
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            return None, ErrorCode.INVALID_JSON_LINE, f"line is not valid JSON: {first['msg']}"
        where = ".".join(str(p) for p in first["loc"]) or "line"
        return None, ErrorCode.INVALID_REQUEST, f"{where}: {first['msg']}"
    if line.url != endpoint:
        return line, ErrorCode.WRONG_URL, f"url {line.url.value} differs from the job's {endpoint.value}"
    return line, None, ""
