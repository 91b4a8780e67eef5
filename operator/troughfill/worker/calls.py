"""Turning a batch request into an engine call, and the engine's stream back into a result.

Pure: no I/O. Chat and text completions are streamed, so the worker always knows the text
generated so far and can save it; a request resumed from saved text continues it (chat:
the partial answer as a final assistant message with `continue_final_message`; text
completions: prompt + partial text) with the token budget reduced by what was already
generated. The assembled body has the same shape whether or not a request was resumed.
"""

import copy
import json
from dataclasses import dataclass, field
from typing import Any

from troughfill.api.batchinference import Endpoint

# Request features a streamed, resumable call cannot reproduce; such requests are sent as
# they are, unstreamed, and restart from scratch if interrupted.
_UNRESUMABLE_KEYS = ("tools", "functions", "logprobs", "top_logprobs", "response_format", "echo", "suffix")


def resumable(endpoint: Endpoint, body: dict[str, Any], min_tokens: int = 0) -> bool:
    """Whether to stream the request so that an interruption can resume from its partial output.

    Requests whose budget is below `min_tokens` are not worth it: streaming costs the engine's
    API server per token, and a short request is cheap to redo.
    """
    if endpoint == Endpoint.EMBEDDINGS or body.get("stream"):
        return False
    budget = body.get(_budget_key(body))
    if budget is not None and int(budget) < min_tokens:
        return False
    if body.get("n", 1) != 1 or body.get("best_of", 1) != 1:
        return False
    if any(body.get(key) for key in _UNRESUMABLE_KEYS):
        return False
    return endpoint != Endpoint.COMPLETIONS or isinstance(body.get("prompt"), str)


def _budget_key(body: dict[str, Any]) -> str:
    return "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"


@dataclass
class Progress:
    """What a streamed call has produced so far (and what an earlier attempt saved)."""

    text: str = ""
    completion_tokens: int = 0
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    stream_id: str | None = None
    created: int | None = None
    model: str | None = None
    cached_tokens: int = 0
    engine_prompt_tokens: int = 0
    """The prompt as this call's engine counted it: for a resumed call, prompt + saved text."""
    extra_usage: dict[str, Any] = field(default_factory=dict)


def engine_body(
    endpoint: Endpoint,
    body: dict[str, Any],
    served_model: str | None,
    saved: Progress | None,
    min_tokens: int = 0,
) -> tuple[dict[str, Any], bool]:
    """(the body to send, whether it is streamed). `saved` continues an interrupted request."""
    request = copy.deepcopy(body)
    if served_model:
        request["model"] = served_model
    if not (saved and saved.text) and not resumable(endpoint, body, min_tokens):
        return request, False
    request["stream"] = True
    request["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    if saved and saved.text:
        key = _budget_key(body)
        if body.get(key) is not None:
            request[key] = max(1, int(body[key]) - saved.completion_tokens)
        if endpoint == Endpoint.CHAT_COMPLETIONS:
            request["messages"] = [*request["messages"], {"role": "assistant", "content": saved.text}]
            request["continue_final_message"] = True
            request["add_generation_prompt"] = False
        else:
            request["prompt"] = request["prompt"] + saved.text
    return request, True


def remaining_budget(body: dict[str, Any], saved: Progress | None) -> int | None:
    """Completion tokens the request may still generate (None: it sets no budget)."""
    limit = body.get(_budget_key(body))
    if limit is None:
        return None
    return max(0, int(limit) - (saved.completion_tokens if saved else 0))


def budget_spent(body: dict[str, Any], saved: Progress | None) -> bool:
    """An earlier attempt already generated every token the request allowed."""
    limit = body.get(_budget_key(body))
    return saved is not None and limit is not None and saved.completion_tokens >= int(limit)


def cut_short(body: dict[str, Any], saved: Progress | None, progress: Progress) -> bool:
    """A resumed call that the engine ended for length before an uninterrupted one would have.

    The saved text is sent back as text, and text does not always tokenize back to the tokens
    it was decoded from: it can come out longer (a random model's output triples), and then
    the engine's context has less room than the request had, so it stops early ("length" below
    the budget; with no budget, a context fuller than prompt + generated tokens). Such an
    answer is not the one the request asked for: it is redone from the start."""
    if saved is None or progress.finish_reason != "length":
        return False
    limit = body.get(_budget_key(body))
    if limit is not None:
        return progress.completion_tokens < int(limit)
    return progress.engine_prompt_tokens > (saved.prompt_tokens or 0) + saved.completion_tokens


def apply_chunk(progress: Progress, chunk: dict[str, Any], resumed_from: Progress | None) -> None:
    """Fold one streamed chunk into `progress` (text, tokens so far, finish reason, usage)."""
    progress.stream_id = progress.stream_id or chunk.get("id")
    progress.created = progress.created or chunk.get("created")
    progress.model = progress.model or chunk.get("model")
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta")
        piece = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        if piece:
            progress.text += piece
        if choice.get("finish_reason"):
            progress.finish_reason = choice["finish_reason"]
    usage = chunk.get("usage")
    if usage:
        earlier = resumed_from.completion_tokens if resumed_from else 0
        progress.completion_tokens = earlier + int(usage.get("completion_tokens") or 0)
        progress.engine_prompt_tokens = int(usage.get("prompt_tokens") or 0)
        if resumed_from and resumed_from.prompt_tokens is not None:
            progress.prompt_tokens = resumed_from.prompt_tokens
        else:
            progress.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        details = usage.get("prompt_tokens_details") or {}
        progress.cached_tokens = int(details.get("cached_tokens") or 0)


def parse_sse_line(line: bytes) -> dict[str, Any] | None:
    """The JSON of one `data:` line of a server-sent event stream (None for others and [DONE])."""
    if not line.startswith(b"data:"):
        return None
    data = line[5:].strip()
    if not data or data == b"[DONE]":
        return None
    parsed: dict[str, Any] = json.loads(data)
    return parsed


def assembled_body(endpoint: Endpoint, progress: Progress) -> dict[str, Any]:
    """The non-streamed response the engine would have returned, built from the stream."""
    prompt = progress.prompt_tokens or 0
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": progress.completion_tokens,
        "total_tokens": prompt + progress.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": progress.cached_tokens}
        if progress.cached_tokens
        else None,
    }
    if endpoint == Endpoint.CHAT_COMPLETIONS:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": progress.text},
            "logprobs": None,
            "finish_reason": progress.finish_reason,
        }
        kind = "chat.completion"
    else:
        choice = {
            "index": 0,
            "text": progress.text,
            "logprobs": None,
            "finish_reason": progress.finish_reason,
        }
        kind = "text_completion"
    return {
        "id": progress.stream_id,
        "object": kind,
        "created": progress.created,
        "model": progress.model,
        "choices": [choice],
        "usage": usage,
    }


ABORTED = "abort"
"""vLLM's finish_reason for a request it dropped while stopping: not a result."""


def usage_of(body: dict[str, Any]) -> tuple[int, int, int]:
    """(prompt, completion, cached) tokens of a non-streamed response body."""
    usage = body.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    return (
        int(usage.get("prompt_tokens") or 0),
        int(usage.get("completion_tokens") or 0),
        int(details.get("cached_tokens") or 0),
    )


def finish_reasons(body: dict[str, Any]) -> set[str]:
    return {str(c.get("finish_reason")) for c in body.get("choices") or [] if c.get("finish_reason")}
