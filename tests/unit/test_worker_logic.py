"""The worker's pure parts: concurrency control, engine request building, stream assembly."""

import asyncio
import json
from pathlib import Path

import pytest

from troughfill.api import Endpoint
from troughfill.api.batchfile import RequestLine
from troughfill.worker import calls
from troughfill.worker.concurrency import (
    ConcurrencyPolicy,
    EngineLoad,
    Pace,
    PaceMeter,
    next_limit,
    result_bound,
)
from troughfill.worker.engine import parse_load
from troughfill.worker.runner import Item, shortest_first, supervised

POLICY = ConcurrencyPolicy(minimum=2, maximum=64, step=4, backoff=0.5)


@pytest.mark.parametrize(
    ("current", "load", "in_flight", "expected", "why"),
    [
        (
            16,
            EngineLoad(running=16, waiting=0, kv_cache_usage=0.3),
            16,
            24,
            "all running, room left: grow by half",
        ),
        (4, EngineLoad(running=4, waiting=0, kv_cache_usage=0.3), 4, 8, "at least a step at a time"),
        (16, EngineLoad(running=10, waiting=0, kv_cache_usage=0.3), 10, 16, "not using the limit: hold"),
        (16, EngineLoad(running=16, waiting=2, kv_cache_usage=0.3), 16, 16, "a short queue is the target"),
        (16, EngineLoad(running=16, waiting=9, kv_cache_usage=0.3), 16, 8, "queueing: back off"),
        (16, EngineLoad(running=16, waiting=0, kv_cache_usage=0.97), 16, 8, "KV cache nearly full: back off"),
        (50, EngineLoad(running=50, waiting=0, kv_cache_usage=0.1), 50, 64, "never above the maximum"),
        (3, EngineLoad(running=3, waiting=50, kv_cache_usage=0.1), 3, 2, "never below the minimum"),
    ],
)
def test_concurrency_follows_the_engine_gauges(
    current: int, load: EngineLoad, in_flight: int, expected: int, why: str
) -> None:
    assert next_limit(current, load, in_flight, POLICY) == expected, why


def test_engine_gauges_are_read_from_a_real_vllm_metrics_page() -> None:
    text = (Path(__file__).parent / "data" / "vllm-0.32.0-metrics.txt").read_text()
    load = parse_load(text)
    assert load.running == 40.0
    assert load.waiting == 0.0  # num_requests_waiting_by_reason is a different series
    assert 0 < load.kv_cache_usage < 0.01
    assert load.generated_tokens == 12241.0


def test_engine_gauges_sum_label_sets_and_ignore_look_alikes() -> None:
    text = "\n".join(
        [
            "# HELP vllm:num_requests_running x",
            'vllm:num_requests_running{engine="0",model_name="a model } with spaces"} 3.0',
            'vllm:num_requests_running{engine="1",model_name="a"} 4.0 1700000000000',
            "vllm:num_requests_waiting 2",
            'vllm:num_requests_waiting_by_reason{reason="capacity"} 9.0',
            'vllm:kv_cache_usage_perc{engine="0"} 0.25',
            'vllm:kv_cache_usage_perc_total{engine="0"} 7',
        ]
    )
    assert parse_load(text) == EngineLoad(running=7.0, waiting=2.0, kv_cache_usage=0.25)


BUSY = EngineLoad(running=16, waiting=0, kv_cache_usage=0.3)
"""Everything sent is running and nothing waits: without a bound the limit would grow."""


@pytest.mark.parametrize(
    ("pace", "expected", "why"),
    [
        # 20 tokens/s, 50 tokens a request: 16 in flight come back in 40 s; 4 in 10 s.
        (Pace(20, 50), 12, "far past the target: back off, a quarter at a time"),
        (Pace(2000, 50), 24, "a fast engine comes back within the target: grow as before"),
        (Pace(100, 50), 20, "near the bound (20): it caps the growth"),
        (Pace(20, 0), 24, "nothing in flight a yield would lose: no bound"),
        (Pace(0, 50, stalled=True), 16, "the engine generated nothing since the last reading: hold"),
        (None, 24, "an engine without a token counter: its gauges alone"),
    ],
)
def test_the_time_to_result_bound_keeps_requests_coming_back_in_time(
    pace: Pace | None, expected: int, why: str
) -> None:
    policy = ConcurrencyPolicy(minimum=1, maximum=64, step=4, backoff=0.75, result_seconds=10)
    assert next_limit(16, BUSY, 16, policy, pace) == expected, why


def test_the_bound_is_littles_law_and_can_be_turned_off() -> None:
    policy = ConcurrencyPolicy(minimum=2, result_seconds=10)
    assert result_bound(Pace(100, 40), policy) == 25  # 100 tokens/s x 10 s / 40 tokens
    assert result_bound(Pace(1, 400), policy) == 2  # never below the minimum
    assert result_bound(Pace(100, 40), ConcurrencyPolicy(result_seconds=0)) is None
    assert Pace(100, 40).seconds_to_result(25) == 10


def test_the_pace_meter_smooths_the_engine_counter_and_the_lengths() -> None:
    meter = PaceMeter()
    meter.observe(None, now=9.0)
    assert meter.pace([100]) is None  # an engine without the counter: its gauges alone decide
    meter.observe(1000, now=10.0)
    assert meter.pace([100]) == Pace(0.0, 100.0, stalled=True)  # one reading is no rate
    meter.observe(1100, now=11.0)
    assert meter.pace([100, 300]) == Pace(100.0, 200.0)  # before any result, budgets stand for length
    assert meter.pace([]) == Pace(100.0, 0.0)  # nothing in flight a yield would lose
    meter.observe(1150, now=12.0)  # 50 tokens/s: smoothed, not taken whole
    assert 50 < meter.tokens_per_second < 100
    meter.observe(1150, now=13.0)  # nothing generated: a long prefill step
    stalled = meter.pace([100])
    assert stalled is not None
    assert stalled.stalled
    meter.observe(10, now=14.0)  # a restarted engine's counter: skipped, then measured from there
    meter.observe(110, now=15.0)
    assert meter.tokens_per_second > 50
    meter.result(40)
    meter.result(60)
    pace = meter.pace([100, 300])
    assert pace is not None
    assert not pace.stalled
    assert 40 < pace.completion_tokens < 60  # results replace the budgets


def test_a_stalled_engine_holds_the_limit_where_it_is() -> None:
    policy = ConcurrencyPolicy(minimum=1, maximum=64, result_seconds=10)
    stalled = Pace(0.0, 100.0, stalled=True)
    assert next_limit(16, BUSY, 16, policy, stalled) == 16  # neither grown nor cut on no evidence
    queueing = EngineLoad(running=16, waiting=9, kv_cache_usage=0.3)
    assert next_limit(16, queueing, 16, policy, stalled) == 12  # a queue still backs off


def _item(index: int, max_tokens: int | None, saved_tokens: int = 0) -> Item:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    line = RequestLine.model_validate(
        {"custom_id": f"r{index}", "method": "POST", "url": "/v1/chat/completions", "body": body}
    )
    saved = calls.Progress(text="x", completion_tokens=saved_tokens) if saved_tokens else None
    return Item(index, 1, line, saved)


def test_a_claim_starts_the_requests_with_the_least_left_to_generate_first() -> None:
    items = [_item(0, 256), _item(1, 8), _item(2, None), _item(3, 256, saved_tokens=250), _item(4, 48)]
    assert [item.index for item in sorted(items, key=shortest_first)] == [3, 1, 4, 0, 2]


CHAT = {"model": "user-choice", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}


@pytest.mark.parametrize(
    ("endpoint", "body", "expected"),
    [
        (Endpoint.CHAT_COMPLETIONS, CHAT, True),
        (Endpoint.CHAT_COMPLETIONS, {**CHAT, "n": 2}, False),
        (Endpoint.CHAT_COMPLETIONS, {**CHAT, "logprobs": True}, False),
        (Endpoint.CHAT_COMPLETIONS, {**CHAT, "tools": [{"type": "function"}]}, False),
        (Endpoint.COMPLETIONS, {"model": "m", "prompt": "Once"}, True),
        (Endpoint.COMPLETIONS, {"model": "m", "prompt": [1, 2, 3]}, False),
        (Endpoint.EMBEDDINGS, {"model": "m", "input": "x"}, False),
    ],
)
def test_which_requests_can_be_resumed(endpoint: Endpoint, body: dict[str, object], expected: bool) -> None:
    assert calls.resumable(endpoint, body) is expected


def test_a_fresh_chat_request_is_streamed_with_usage_and_the_template_model() -> None:
    request, streamed = calls.engine_body(Endpoint.CHAT_COMPLETIONS, CHAT, "tiny", None)
    assert streamed
    assert request["model"] == "tiny"
    assert request["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert request["max_tokens"] == 50
    assert CHAT["model"] == "user-choice"  # the batch request itself is untouched


def test_a_resumed_chat_request_continues_the_assistant_message_with_the_rest_of_the_budget() -> None:
    saved = calls.Progress(text="The answer is", completion_tokens=20, prompt_tokens=5)
    request, _ = calls.engine_body(Endpoint.CHAT_COMPLETIONS, CHAT, None, saved)
    assert request["messages"][-1] == {"role": "assistant", "content": "The answer is"}
    assert request["continue_final_message"] is True
    assert request["add_generation_prompt"] is False
    assert request["max_tokens"] == 30
    with_new_key = {**CHAT, "max_completion_tokens": 40}
    del with_new_key["max_tokens"]
    request, _ = calls.engine_body(Endpoint.CHAT_COMPLETIONS, with_new_key, None, saved)
    assert request["max_completion_tokens"] == 20


def test_a_resumed_completion_appends_the_partial_text_to_the_prompt() -> None:
    saved = calls.Progress(text=" upon a time", completion_tokens=3)
    body = {"model": "m", "prompt": "Once", "max_tokens": 10}
    request, _ = calls.engine_body(Endpoint.COMPLETIONS, body, None, saved)
    assert request["prompt"] == "Once upon a time"
    assert request["max_tokens"] == 7
    assert calls.budget_spent(body, calls.Progress(text="x", completion_tokens=10))
    assert not calls.budget_spent(body, saved)


def sse(chunk: dict[str, object]) -> bytes:
    return b"data: " + json.dumps(chunk).encode() + b"\n"


def test_a_stream_is_assembled_into_the_non_streamed_shape() -> None:
    lines = [
        sse({"id": "c1", "created": 7, "model": "tiny",
             "choices": [{"delta": {"role": "assistant", "content": ""}}],
             "usage": {"prompt_tokens": 5, "completion_tokens": 0}}),
        sse({"id": "c1", "choices": [{"delta": {"content": "bill"}}],
             "usage": {"prompt_tokens": 5, "completion_tokens": 1}}),
        b"\n",
        sse({"id": "c1", "choices": [{"delta": {"content": "ing"}, "finish_reason": "stop"}],
             "usage": {"prompt_tokens": 5, "completion_tokens": 2}}),
        sse({"id": "c1", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}),
        b"data: [DONE]\n",
    ]  # fmt: skip
    progress = calls.Progress()
    for line in lines:
        chunk = calls.parse_sse_line(line)
        if chunk is not None:
            calls.apply_chunk(progress, chunk, None)
    body = calls.assembled_body(Endpoint.CHAT_COMPLETIONS, progress)
    assert body == {
        "id": "c1",
        "object": "chat.completion",
        "created": 7,
        "model": "tiny",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "billing"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 5,
            "completion_tokens": 2,
            "total_tokens": 7,
            "prompt_tokens_details": None,
        },
    }


def test_usage_of_a_resumed_stream_counts_what_was_generated_against_the_original_prompt() -> None:
    saved = calls.Progress(text="bill", completion_tokens=1, prompt_tokens=5)
    progress = calls.Progress(text=saved.text, completion_tokens=1, prompt_tokens=5)
    chunk = {
        "id": "c2",
        "choices": [{"text": "ing", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 6, "completion_tokens": 1},
    }
    calls.apply_chunk(progress, chunk, saved)
    assert (progress.text, progress.completion_tokens, progress.prompt_tokens) == ("billing", 2, 5)
    body = calls.assembled_body(Endpoint.COMPLETIONS, progress)
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "billing"
    assert calls.usage_of(body) == (5, 2, 0)


@pytest.mark.parametrize(
    ("body", "engine_prompt", "total", "finish", "expected", "why"),
    [
        ({"max_tokens": 400}, 305, 400, "length", False, "the whole budget: a faithful continuation"),
        ({"max_tokens": 400}, 1000, 124, "length", True, "the context ran out before the budget"),
        ({"max_completion_tokens": 400}, 1000, 124, "length", True, "either budget key"),
        ({"max_tokens": 400}, 1000, 124, "stop", False, "a stop is the model's answer"),
        ({}, 305, 719, "length", False, "no budget, prompt + generated as before: as far as it would go"),
        ({}, 1000, 124, "length", True, "no budget, text tokenized longer: stopped early"),
    ],
)
def test_a_continuation_the_engine_cut_short_is_recognised(
    body: dict[str, object], engine_prompt: int, total: int, finish: str, expected: bool, why: str
) -> None:
    saved = calls.Progress(text="partial", completion_tokens=300, prompt_tokens=5)
    progress = calls.Progress(
        text="partial and more",
        completion_tokens=total,
        finish_reason=finish,
        engine_prompt_tokens=engine_prompt,
    )
    assert calls.cut_short(body, saved, progress) is expected, why
    assert not calls.cut_short(body, None, progress)  # a fresh call is never a cut-short continuation


def test_a_stream_records_the_prompt_the_engine_counted() -> None:
    saved = calls.Progress(text="bill", completion_tokens=1, prompt_tokens=5)
    progress = calls.Progress(text=saved.text, completion_tokens=1, prompt_tokens=5)
    calls.apply_chunk(progress, {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}, saved)
    assert (progress.prompt_tokens, progress.engine_prompt_tokens, progress.completion_tokens) == (5, 9, 3)


async def test_a_background_task_that_fails_is_run_again_not_lost() -> None:
    runs: list[int] = []

    async def flaky() -> None:
        runs.append(len(runs))
        if len(runs) < 3:
            raise ConnectionError("ledger away")

    await asyncio.wait_for(supervised("heartbeat", flaky), 10)
    assert runs == [0, 1, 2]  # failed twice, ran a third time, then finished
