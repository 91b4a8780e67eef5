"""The worker's overhead and what a mid-job yield costs, on a real vLLM engine.

    python -m troughfill_dev.bench.worker [--requests 600] [--max-tokens 64] [--concurrency 32] [--rounds 3]

1. Throughput: the same requests at the same concurrency to the same engine, once through a
   plain async client (aiohttp, one request per slot, not streamed: what a user's script
   would send) and once through the worker (ledger claims, calls, segments, commits; with
   its default settings these short requests are not streamed). Alternated, `--rounds`
   times each; the ratio compares median tokens/s.
   A plain *streamed* client is measured too, to tell the cost of streaming from the
   worker's own.
2. Waste: a job is yielded a third of the way through, then finished by a fresh worker, with
   partial resume on and off. Wasted tokens are measured by the engine's own counter
   (`vllm:generation_tokens_total` generated minus completion tokens delivered).

Starts redis-server and a vLLM engine (the tiny test model from scripts/setup_vllm.sh)
unless --engine-url is given. The engine gets half of this host's CPUs and this process and
Redis the other half (devenv.split_cpus: the CPU engine's busy-polling otherwise starves its
clients on a small host, whichever client it is). Prints one JSON object.
"""

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from troughfill import constants
from troughfill.api.batchinference import Endpoint
from troughfill.ledger import JobConfig, JobKeys, JobLedger, StopMode
from troughfill.results import finalize, index_input
from troughfill.storage import ObjectStore
from troughfill.worker.concurrency import ConcurrencyPolicy
from troughfill.worker.engine import EngineClient
from troughfill.worker.runner import Worker, WorkerOptions
from troughfill_dev.localcluster import split_cpus, start_redis, start_vllm

SERVED = "tiny"
# The engines started here keep idle connections as long as the worker's own (devenv's VLLM_ENV).
KEEPALIVE = constants.CLIENT_KEEP_ALIVE_SECONDS


def request_body(i: int, max_tokens: int) -> dict[str, Any]:
    return {
        "model": SERVED,
        "messages": [{"role": "user", "content": f"classify support ticket number {i} for the billing team"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,  # every request generates exactly max_tokens: equal work on both sides
    }


async def generated_tokens(engine_url: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{engine_url}/metrics") as reply:
        text = await reply.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:generation_tokens_total")
    )


async def plain_client(
    engine_url: str, bodies: list[dict[str, Any]], concurrency: int, stream: bool
) -> float:
    """Seconds to send every body with at most `concurrency` in flight."""
    slots = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(body: dict[str, Any]) -> None:
            async with slots:
                payload = {**body, "stream": True} if stream else body
                async with session.post(f"{engine_url}/v1/chat/completions", json=payload) as reply:
                    if stream:
                        async for _ in reply.content:
                            pass
                    else:
                        await reply.read()
                    if reply.status != 200:
                        raise RuntimeError(f"engine answered {reply.status}")

        started = time.perf_counter()
        await asyncio.gather(*(one(body) for body in bodies))
        return time.perf_counter() - started


def write_input(workdir: Path, bodies: list[dict[str, Any]]) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
        for i, body in enumerate(bodies)
    ]
    (workdir / "in.jsonl").write_text("\n".join(lines) + "\n")


async def new_job(client: aioredis.Redis, workdir: Path, bodies: list[dict[str, Any]]) -> JobLedger:
    await asyncio.to_thread(write_input, workdir, bodies)
    ledger = JobLedger(client, JobKeys("bench", "worker", uuid.uuid4().hex))
    config = JobConfig(
        (workdir / "in.jsonl").as_uri(), (workdir / "out").as_uri(), Endpoint.CHAT_COMPLETIONS, 3, 30.0
    )
    await ledger.create(config)
    await index_input(ledger, ObjectStore())
    return ledger


def options(
    name: str, concurrency: int, *, resume: bool = True, burst: bool = True, resume_min_tokens: int = 256
) -> WorkerOptions:
    return WorkerOptions(
        worker_id=name,
        served_model=SERVED,
        resume_min_tokens=resume_min_tokens,
        initial_concurrency=concurrency,
        policy=ConcurrencyPolicy(minimum=concurrency, maximum=concurrency),  # same concurrency as the client
        resume=resume,
        burst=burst,
        stop_mode=StopMode.YIELD,
        poll_seconds=0.05,
    )


async def through_worker(engine_url: str, client: aioredis.Redis, workdir: Path, bodies: list[dict[str, Any]],
                         concurrency: int) -> float:  # fmt: skip
    ledger = await new_job(client, workdir, bodies)
    engine = EngineClient(engine_url, keepalive_seconds=KEEPALIVE)
    started = time.perf_counter()
    await Worker(ledger, ObjectStore(), engine, options("bench", concurrency)).run()
    seconds = time.perf_counter() - started
    await engine.close()
    progress = await ledger.progress()
    if progress.completed != len(bodies):
        raise RuntimeError(f"worker completed {progress.completed} of {len(bodies)}")
    await ledger.delete()
    return seconds


async def yield_and_resume(
    engine_url: str,
    client: aioredis.Redis,
    workdir: Path,
    bodies: list[dict[str, Any]],
    *,
    concurrency: int,
    resume: bool,
) -> dict[str, Any]:
    ledger = await new_job(client, workdir, bodies)
    before = await generated_tokens(engine_url)
    engine = EngineClient(engine_url, keepalive_seconds=KEEPALIVE)
    # Every request streamed and checkpointed, whatever its length: this measures resume itself.
    first = Worker(
        ledger,
        ObjectStore(),
        engine,
        options("first", concurrency, resume=resume, burst=False, resume_min_tokens=0),
    )
    running = asyncio.create_task(first.run())
    for _ in range(60_000):  # a third of the way in (bounded: 20 minutes at most)
        if (await ledger.progress()).completed >= len(bodies) // 3:
            break
        await asyncio.sleep(0.02)
    in_flight = len(first.in_flight)
    stopped = time.perf_counter()
    first.request_stop()
    await running
    yield_seconds = time.perf_counter() - stopped
    saved = await ledger.load_partials(list(range(len(bodies))))
    second = options("second", concurrency, resume=resume, resume_min_tokens=0)
    await Worker(ledger, ObjectStore(), engine, second).run()
    await engine.close()
    await asyncio.sleep(1.5)  # the engine publishes its counters on its own schedule
    generated = await generated_tokens(engine_url) - before
    progress = await ledger.progress()
    await finalize(ledger, ObjectStore())
    delivered = sum(
        json.loads(line)["response"]["body"]["usage"]["completion_tokens"]
        for line in (workdir / "out" / "output.jsonl").read_text().splitlines()
    )
    await ledger.delete()
    return {
        "in_flight_at_yield": in_flight,
        "partials_saved": len(saved),
        "partial_tokens_saved": sum(p.tokens for p in saved.values()),
        "yield_seconds": round(yield_seconds, 3),
        "engine_generated_tokens": int(generated),
        "delivered_completion_tokens": delivered,
        "wasted_tokens_engine": int(generated) - delivered,
        # What the worker saw thrown away (streamed requests only: the rest it cannot see).
        "wasted_tokens_ledger": progress.wasted_tokens,
    }


async def run(
    engine_url: str,
    redis_url: str,
    workdir: Path,
    *,
    requests: int,
    max_tokens: int,
    concurrency: int,
    rounds: int,
) -> dict[str, Any]:
    client = aioredis.Redis.from_url(redis_url)
    bodies = [request_body(i, max_tokens) for i in range(requests)]
    await plain_client(engine_url, bodies[: concurrency * 2], concurrency, stream=False)  # warm-up
    plain, streamed, worker = [], [], []
    for round_ in range(rounds):
        plain.append(await plain_client(engine_url, bodies, concurrency, stream=False))
        worker.append(await through_worker(engine_url, client, workdir / f"w{round_}", bodies, concurrency))
        streamed.append(await plain_client(engine_url, bodies, concurrency, stream=True))
    tokens = requests * max_tokens

    def rate(seconds: list[float]) -> float:
        return tokens / statistics.median(seconds)

    waste_bodies = [request_body(i, max_tokens * 2) for i in range(requests)]
    with_resume = await yield_and_resume(
        engine_url, client, workdir / "resume", waste_bodies, concurrency=concurrency, resume=True
    )
    without = await yield_and_resume(
        engine_url, client, workdir / "restart", waste_bodies, concurrency=concurrency, resume=False
    )
    await client.aclose()
    return {
        "requests": requests,
        "max_tokens": max_tokens,
        "concurrency": concurrency,
        "plain_client_tokens_per_s": round(rate(plain)),
        "plain_streamed_client_tokens_per_s": round(rate(streamed)),
        "worker_tokens_per_s": round(rate(worker)),
        "worker_vs_plain_ratio": round(rate(worker) / rate(plain), 3),
        "worker_vs_plain_streamed_ratio": round(rate(worker) / rate(streamed), 3),
        "rounds": rounds,
        "seconds": {
            "plain": [round(s, 3) for s in plain],
            "worker": [round(s, 3) for s in worker],
            "plain_streamed": [round(s, 3) for s in streamed],
        },
        "yield_with_partial_resume": with_resume,
        "yield_without_partial_resume": without,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per side; medians compared")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--engine-url")
    args = parser.parse_args()
    split = split_cpus()
    if split is not None and not args.engine_url:
        os.sched_setaffinity(0, split[1])  # this process, and Redis started below
    with tempfile.TemporaryDirectory(prefix="troughfill-bench-") as scratch:
        workdir = Path(scratch)
        redis = start_redis(workdir / "redis", appendonly=False)
        engine = None
        if not args.engine_url:
            python, model = os.environ.get("TROUGHFILL_VLLM_PYTHON"), os.environ.get("TROUGHFILL_TINY_MODEL")
            if not python or not model:
                raise SystemExit("source scripts/setup.sh and scripts/setup_vllm.sh, or give --engine-url")
            engine = start_vllm(python, model, workdir / "vllm", cpus=split[0] if split else None)
        try:
            url = args.engine_url or (engine.url if engine else "")
            result = asyncio.run(
                run(
                    url,
                    redis.url,
                    workdir,
                    requests=args.requests,
                    max_tokens=args.max_tokens,
                    concurrency=args.concurrency,
                    rounds=args.rounds,
                )
            )
        finally:
            if engine:
                engine.stop()
            redis.stop()
    if split is not None and not args.engine_url:
        result["cpus"] = {"engine": sorted(split[0]), "clients_and_redis": sorted(split[1])}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
