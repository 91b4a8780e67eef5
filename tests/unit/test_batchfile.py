"""The OpenAI Batch input line format, and the checks the demo and admission run on it."""

import json

from troughfill.api import Endpoint
from troughfill.api.batchfile import check_lines


def line(custom_id: str = "a", url: str = "/v1/chat/completions", **extra: object) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": "m"}, **extra})


def test_valid_lines_and_blank_lines() -> None:
    summary = check_lines([line("a"), "", "  ", line("b")], Endpoint.CHAT_COMPLETIONS)
    assert (summary.lines, summary.valid, summary.problems) == (2, 2, [])


def test_each_problem_is_reported_with_its_line_number() -> None:
    lines = [
        line("a"),
        "{not json",
        line("b", url="/v1/embeddings"),
        line("a"),
        json.dumps({"custom_id": "c", "method": "GET", "url": "/v1/chat/completions", "body": {}}),
        line("d", extra_field=1),
        json.dumps({"custom_id": "", "method": "POST", "url": "/v1/chat/completions", "body": {}}),
    ]
    summary = check_lines(lines, Endpoint.CHAT_COMPLETIONS)
    assert summary.lines == 7
    assert summary.valid == 1
    found = {(p.line_number, p.custom_id): p.message for p in summary.problems}
    assert "Invalid JSON" in found[(2, None)]
    assert found[(3, "b")] == "url /v1/embeddings differs from the job's /v1/chat/completions"
    assert found[(4, "a")] == "duplicate custom_id"
    assert found[(5, None)].startswith("method:")
    assert found[(6, None)].startswith("extra_field:")
    assert found[(7, None)].startswith("custom_id:")
