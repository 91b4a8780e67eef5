"""A stand-in for vLLM's OpenAI-compatible server: answers at once, without a model.

    python -m troughfill_dev.standin --port 8000 [--served-model-name tiny] [--crash-on TEXT]
        [--delay-seconds S] [--load-seconds S] [--token-seconds S] [--max-running N]

It takes vLLM's command line as a template writes it (`--model`, `--host`, `--port`,
`--served-model-name`, and any `--name=value` engine argument, ignored), and serves what the
worker uses: `/health`, `/metrics` (vLLM's running/waiting gauges), `/v1/models`, and
`/v1/chat/completions`, `/v1/completions` (plain and streamed) and `/v1/embeddings`. A
request "generates" its `max_tokens` (16 if unset) one-word tokens, so usage adds up.

It is for measuring troughfill's pipeline (ledger, worker, storage, merge) without a model's
cost, and for failures a real engine will not produce on demand: with `--crash-on TEXT` the
process exits at once (as an engine segfaulting or OOM-killed would) when a request's body
contains TEXT; with `--delay-seconds` each answer takes that long (a model's latency, to keep
work in flight); with `--load-seconds` it listens only after that long (an engine loading its
model: a worker's cold start); with `--token-seconds` a streamed answer sends one token that often
(a decode rate, so a stopped worker has partial output to save or lose); with `--max-running`
at most that many streamed answers run at once and the rest wait, reported as
`vllm:num_requests_waiting` (an engine's batch limit, which bounds the worker's in-flight
requests as a real engine does). Nothing here claims to be an inference engine.
"""

import argparse
import asyncio
import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

DEFAULT_TOKENS = 16


@dataclass(frozen=True)
class Answer:
    ident: str
    chat: bool
    text: str
    usage: dict[str, int]


class StandIn:
    def __init__(
        self,
        served: str,
        crash_on: str | None,
        delay: float = 0.0,
        token_seconds: float = 0.0,
        max_running: int = 0,
    ) -> None:
        self.served = served
        self.delay = delay
        self.token_seconds = token_seconds
        self.slots = asyncio.Semaphore(max_running) if max_running else None
        self.waiting = 0
        self.crash_on = crash_on.encode() if crash_on else None
        self.running = 0
        self.served_requests = 0

    async def health(self, _: web.Request) -> web.Response:
        return web.Response(text="")

    async def metrics(self, _: web.Request) -> web.Response:
        labels = f'{{model_name="{self.served}"}}'
        return web.Response(
            text=(
                f"vllm:num_requests_running{labels} {self.running}\n"
                f"vllm:num_requests_waiting{labels} {self.waiting}\n"
                f"vllm:kv_cache_usage_perc{labels} 0.0\n"
                f"standin_requests_total {self.served_requests}\n"
            )
        )

    async def models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.served, "object": "model"}]})

    async def _body(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        if self.crash_on and self.crash_on in raw:
            os._exit(139)  # as a crashed engine would: no answer, no cleanup
        if self.delay:
            self.running += 1
            try:
                await asyncio.sleep(self.delay)  # "generating"
            finally:
                self.running -= 1
        body: dict[str, Any] = json.loads(raw)
        return body

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        chat = request.path.endswith("/chat/completions")
        tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_TOKENS)
        prompt = len(json.dumps(body.get("messages") or body.get("prompt") or "")) // 4 + 1
        text = " ".join(["ok"] * tokens)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        usage = {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens}
        self.served_requests += 1
        if body.get("stream"):
            return await self._stream(request, body, Answer(ident, chat, text, usage))
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return web.json_response(
            {
                "id": ident,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": self.served,
                "choices": [choice],
                "usage": usage,
            },
            headers={"x-request-id": ident},
        )

    async def _stream(self, request: web.Request, body: dict[str, Any], answer: Answer) -> web.StreamResponse:
        ident, chat, usage = answer.ident, answer.chat, answer.usage
        tokens = usage["completion_tokens"]
        reply = web.StreamResponse(headers={"content-type": "text/event-stream", "x-request-id": ident})
        await reply.prepare(request)
        if self.slots is not None:
            self.waiting += 1
            try:
                await self.slots.acquire()
            finally:
                self.waiting -= 1
        self.running += 1
        options = body.get("stream_options") or {}
        try:
            words = answer.text.split(" ")
            for n, word in enumerate(words):
                piece = word if n == 0 else " " + word
                last = n == len(words) - 1
                delta: dict[str, Any] = {"index": 0, "finish_reason": "length" if last else None}
                if chat:
                    delta["delta"] = {"content": piece}
                else:
                    delta["text"] = piece
                chunk: dict[str, Any] = {
                    "id": ident,
                    "object": "chat.completion.chunk" if chat else "text_completion",
                    "model": self.served,
                    "choices": [delta],
                }
                if options.get("continuous_usage_stats"):
                    done = min(n + 1, tokens)
                    total = usage["prompt_tokens"] + done
                    chunk["usage"] = {**usage, "completion_tokens": done, "total_tokens": total}
                await reply.write(f"data: {json.dumps(chunk)}\n\n".encode())
                if self.token_seconds and not last:
                    await asyncio.sleep(self.token_seconds)
            if options.get("include_usage"):
                final = {"id": ident, "model": self.served, "choices": [], "usage": usage}
                await reply.write(f"data: {json.dumps(final)}\n\n".encode())
            await reply.write(b"data: [DONE]\n\n")
        finally:
            self.running -= 1
            if self.slots is not None:
                self.slots.release()
        return reply

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        vectors = [{"object": "embedding", "index": k, "embedding": [0.0] * 8} for k in range(len(items))]
        self.served_requests += 1
        return web.json_response(
            {
                "object": "list",
                "model": self.served,
                "data": vectors,
                "usage": {"prompt_tokens": len(items), "total_tokens": len(items)},
            }
        )


def app(
    served: str,
    crash_on: str | None = None,
    delay: float = 0.0,
    token_seconds: float = 0.0,
    max_running: int = 0,
) -> web.Application:
    standin = StandIn(served, crash_on, delay, token_seconds, max_running)
    application = web.Application(client_max_size=64 << 20)
    application.add_routes(
        [
            web.get("/health", standin.health),
            web.get("/metrics", standin.metrics),
            web.get("/v1/models", standin.models),
            web.post("/v1/chat/completions", standin.generate),
            web.post("/v1/completions", standin.generate),
            web.post("/v1/embeddings", standin.embeddings),
        ]
    )
    return application


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-model-name", default="standin")
    parser.add_argument("--model", default="", help="ignored: there is no model")
    parser.add_argument("--crash-on", help="exit at once when a request's body contains this text")
    parser.add_argument("--delay-seconds", type=float, default=0.0, help="wait this long before answering")
    parser.add_argument("--load-seconds", type=float, default=0.0, help="start listening after this long")
    parser.add_argument(
        "--token-seconds", type=float, default=0.0, help="a streamed answer's seconds per token"
    )
    parser.add_argument(
        "--max-running", type=int, default=0, help="streamed answers running at once (0: no limit)"
    )
    args, _ = parser.parse_known_args(argv)  # vLLM's engine arguments: accepted, ignored
    time.sleep(max(0.0, args.load_seconds))
    web.run_app(
        app(args.served_model_name, args.crash_on, args.delay_seconds, args.token_seconds, args.max_running),
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
    )


if __name__ == "__main__":
    main()
