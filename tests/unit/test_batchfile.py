"""The OpenAI Batch input line format, and the checks the demo and admission run on it."""

import json

import pytest

from troughfill.api import Endpoint
from troughfill.api.batchfile import ErrorCode, check_lines, classify_line


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


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ('{"model": "m", "stream": true}', "body.stream: a batch returns whole responses"),
        ('{"model": "m", "max_tokens": "abc"}', "body.max_tokens: must be an integer from 1 to 2147483647"),
        ('{"model": "m", "max_tokens": 1e400}', "body.max_tokens: must be an integer"),
        ('{"model": "m", "max_tokens": 0}', "body.max_tokens: must be an integer from 1"),
        ('{"model": "m", "max_tokens": true}', "body.max_tokens: must be an integer"),
        ('{"model": "m", "max_completion_tokens": 4294967296}', "body.max_completion_tokens"),
        ('{"model": "m", "n": 0}', "body.n: must be an integer from 1"),
        ('{"model": "m", "temperature": 1e400}', "body.temperature: must be a finite number"),
        ('{"model": "m", "top_p": "high"}', "body.top_p: must be a finite number"),
    ],
)
def test_bodies_an_engine_cannot_answer_are_error_lines_at_once(body: str, problem: str) -> None:
    raw = f'{{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": {body}}}'
    _, code, message = classify_line(raw.encode(), Endpoint.CHAT_COMPLETIONS)
    assert code == ErrorCode.INVALID_REQUEST
    assert problem in message


def test_ordinary_bodies_pass() -> None:
    body = {
        "model": "m",
        "max_tokens": 64,
        "temperature": 0,
        "top_p": 0.9,
        "n": 1,
        "stream": False,
        "seed": -1,
    }
    raw = json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": body})
    assert classify_line(raw.encode(), Endpoint.CHAT_COMPLETIONS)[1] is None
