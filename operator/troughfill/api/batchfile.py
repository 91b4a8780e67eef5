"""One line of an OpenAI Batch input file: {"custom_id", "method", "url", "body"}."""

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from troughfill.api.batchinference import Endpoint

CustomId = Annotated[str, StringConstraints(min_length=1, max_length=512)]


class RequestLine(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    custom_id: CustomId
    method: Literal["POST"]
    url: Endpoint
    body: dict[str, Any]


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
        try:
            line = RequestLine.model_validate_json(text)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "line"
            summary.problems.append(LineProblem(number, None, f"{where}: {first['msg']}"))
            continue
        if line.url != endpoint:
            summary.problems.append(
                LineProblem(
                    number, line.custom_id, f"url {line.url.value} differs from the job's {endpoint.value}"
                )
            )
        elif line.custom_id in seen:
            summary.problems.append(LineProblem(number, line.custom_id, "duplicate custom_id"))
        else:
            seen.add(line.custom_id)
            summary.valid += 1
    return summary
