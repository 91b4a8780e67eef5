"""What a worker turns into committed results when its trough window is short, on a real engine.

    python -m troughfill_dev.bench.window [--model smollm2|tiny] [--windows 15,30,60,120]
                                          [--mixes example,long-prompts] [--repeat 1]
                                          [--result-seconds 10,0] [--engine-cpus half|all]

For each mix of requests, side by side on the same engine:
- uninterrupted: one worker, with the worker's default settings, runs the job to the end;
- windowed, for each W: a worker runs for W seconds, is told to yield (SIGTERM's yield: save
  partial output, abort, flush, give every lease back), and the next worker starts; repeated
  until the job is done.

"Ready-seconds" are the seconds a worker held the engine: from its start (the engine already
up, as when a pod's readiness probe passes) until its yield returned. The figures per run are
committed results and committed completion tokens per ready-second; each W's ratio is its rate
over the uninterrupted run's. Per window: results committed in it (a window that commits none
is what a short trough wastes), and the seconds to its first committed result.

Between windows the engine's prefix cache is emptied (a yielded worker's pod and its engine are
gone; the next window's engine starts with nothing cached), and the bench waits until the engine
runs nothing. Re-prefill: prompt tokens the engine processed beyond the uninterrupted run's
(resumed requests send their prompt again, plus the text they had generated), and how many of
those its prefix cache served.

Mixes: `example` is manifests/examples/requests.jsonl (80 each of max_tokens 8, 48 and 256);
`long-prompts` is the same requests with a long document (about 300 tokens) before each
question. Starts redis-server and a vLLM engine (the demo's SmolLM2-135M, or the tiny test
model); the engine gets its own CPUs as in the other benches, or with `--engine-cpus all` it
and the worker share every CPU (on 2 CPUs the engine's model runner busy-polls its one CPU and
starves its own API server and scheduler when few requests run: a few tokens a second). Prints
one JSON object.
"""

import argparse
import asyncio
import json
import logging
import os
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from troughfill.api.batchinference import Endpoint
from troughfill.ledger import JobConfig, JobKeys, JobLedger, StopMode
from troughfill.results import index_input
from troughfill.storage import ObjectStore
from troughfill.worker.concurrency import ConcurrencyPolicy
from troughfill.worker.engine import EngineClient
from troughfill.worker.runner import Worker, WorkerOptions
from troughfill_dev.localcluster import split_cpus, start_redis, start_vllm
from troughfill_dev.paths import examples

log = logging.getLogger("troughfill.bench.window")
SERVED = "bench"
DOCUMENT = (
    "Order history and notes. The customer placed several orders over the last year; each was "
    "paid by card, shipped by the standard courier and delivered within the promised window, "
    "except where noted. Returns were accepted within thirty days and refunded to the original "
    "card. The support team logged calls, emails and chats about delivery times, damaged boxes, "
    "missing items, account access and billing questions, and closed each with a short summary. "
)
"""About 75 tokens (SmolLM2's tokenizer); `long-prompts` puts four of it before each question."""
ENGINE_COUNTERS = (
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:prefix_cache_hits_total",
    "vllm:prefix_cache_queries_total",
)


def requests_of(mix: str, limit: int | None, served_model: str, repeats: int = 4) -> list[dict[str, Any]]:
    text = (examples() / "requests.jsonl").read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    if limit:
        lines = lines[:limit]
    for line in lines:
        body = line["body"]
        body["model"] = served_model
        if mix == "long-prompts":
            question = body["messages"][-1]
            question["content"] = DOCUMENT * repeats + "\n\n" + question["content"]
        elif mix != "example":
            raise ValueError(f"unknown mix {mix!r}")
    return lines


async def engine_counters(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(f"{url}/metrics") as reply:
        text = await reply.text()
    totals = dict.fromkeys(ENGINE_COUNTERS, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


async def engine_idle(session: aiohttp.ClientSession, url: str) -> None:
    """Wait until the engine runs and queues nothing (aborted calls leave it within a step or two)."""
    for _ in range(600):
        async with session.get(f"{url}/metrics") as reply:
            text = await reply.text()
        busy = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting"))
        )
        if busy == 0:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError("the engine kept running requests a minute after the worker yielded")


async def reset_prefix_cache(session: aiohttp.ClientSession, url: str) -> None:
    async with session.post(f"{url}/reset_prefix_cache") as reply:
        if reply.status != 200:
            raise RuntimeError(f"the engine refused to reset its prefix cache: {reply.status}")


def write_input(workdir: Path, lines: list[dict[str, Any]]) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


@dataclass(frozen=True)
class Engine:
    url: str
    served_model: str


@dataclass
class Window:
    ready_seconds: float
    results: int
    completion_tokens: int
    first_result_seconds: float | None
    in_flight_at_yield: int
    yield_seconds: float


async def run_window(
    ledger: JobLedger, engine: "Engine", name: str, window: float | None, result_seconds: float
) -> Window:
    """One worker with the default options, for `window` seconds or until the job has no work
    left (it exits then, as a worker does once its job needs no more capacity)."""
    options = WorkerOptions(
        worker_id=name,
        served_model=engine.served_model,
        burst=True,
        stop_mode=StopMode.YIELD,
        policy=ConcurrencyPolicy(result_seconds=result_seconds),
    )
    client = EngineClient(engine.url)
    worker = Worker(ledger, ObjectStore(), client, options)
    before = await ledger.progress()
    started = time.monotonic()
    running = asyncio.create_task(worker.run())
    first: float | None = None
    deadline = started + window if window is not None else None
    while not running.done() and (deadline is None or time.monotonic() < deadline):
        await asyncio.wait([running], timeout=0.05)
        if first is None and (await ledger.progress()).finished > before.finished:
            first = time.monotonic() - started
    in_flight = len(worker.in_flight)
    stopped = time.monotonic()
    worker.request_stop()
    await running
    ended = time.monotonic()
    await client.close()
    after = await ledger.progress()
    if first is None and after.finished > before.finished:
        first = ended - started  # committed by the yield's own flush
    return Window(
        ready_seconds=ended - started,
        results=after.finished - before.finished,
        completion_tokens=after.completion_tokens - before.completion_tokens,
        first_result_seconds=first,
        in_flight_at_yield=in_flight if window is not None else 0,
        yield_seconds=ended - stopped if window is not None else 0.0,
    )


async def run_job(
    client: aioredis.Redis,
    engine: Engine,
    workdir: Path,
    lines: list[dict[str, Any]],
    *,
    window: float | None,
    result_seconds: float,
) -> dict[str, Any]:
    await asyncio.to_thread(write_input, workdir, lines)
    ledger = JobLedger(client, JobKeys("bench", "window", uuid.uuid4().hex))
    config = JobConfig(
        (workdir / "in.jsonl").as_uri(), (workdir / "out").as_uri(), Endpoint.CHAT_COMPLETIONS, 3, 30.0
    )
    await ledger.create(config)
    await index_input(ledger, ObjectStore())
    windows: list[Window] = []
    async with aiohttp.ClientSession() as session:
        await engine_idle(session, engine.url)
        await reset_prefix_cache(session, engine.url)
        before = await engine_counters(session, engine.url)
        while not (await ledger.progress()).all_done:
            if len(windows) >= MAX_WINDOWS:
                raise RuntimeError(f"the job was not done after {MAX_WINDOWS} windows of {window}s")
            windows.append(await run_window(ledger, engine, f"w{len(windows)}", window, result_seconds))
            log.info("%s target %gs window %s: %s", workdir.name, result_seconds, len(windows), windows[-1])
            await engine_idle(session, engine.url)
            await reset_prefix_cache(session, engine.url)
        await asyncio.sleep(1.5)  # the engine publishes its counters on its own schedule
        after = await engine_counters(session, engine.url)
    progress = await ledger.progress()
    await ledger.delete()
    if progress.failed:
        raise RuntimeError(f"{progress.failed} requests failed: the figures would not compare")
    ready = sum(w.ready_seconds for w in windows)
    firsts = [w.first_result_seconds for w in windows]
    return {
        "windows": len(windows),
        "ready_seconds": round(ready, 2),
        "results": progress.completed,
        "completion_tokens": progress.completion_tokens,
        "results_per_ready_s": round(progress.completed / ready, 3),
        "tokens_per_ready_s": round(progress.completion_tokens / ready, 2),
        "results_per_window": [w.results for w in windows],
        "windows_without_results": sum(1 for w in windows if w.results == 0),
        "first_result_s": [None if f is None else round(f, 2) for f in firsts],
        "in_flight_at_yield": [w.in_flight_at_yield for w in windows] if window is not None else [],
        "yield_s_max": round(max(w.yield_seconds for w in windows), 3),
        "resumed": progress.resumed,
        "wasted_tokens": progress.wasted_tokens,
        "engine_prompt_tokens": int(after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"]),
        "engine_prefix_cache_hit_tokens": int(
            after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]
        ),
        "engine_generated_tokens": int(
            after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
        ),
    }


MAX_WINDOWS = 200


def compare(uninterrupted: dict[str, Any], windowed: dict[str, Any]) -> dict[str, Any]:
    prompt = windowed["engine_prompt_tokens"] - uninterrupted["engine_prompt_tokens"]
    return {
        **windowed,
        "results_ratio": round(windowed["results_per_ready_s"] / uninterrupted["results_per_ready_s"], 3),
        "tokens_ratio": round(windowed["tokens_per_ready_s"] / uninterrupted["tokens_per_ready_s"], 3),
        "re_prefill_tokens": prompt,
        "re_prefill_tokens_computed": prompt
        - (windowed["engine_prefix_cache_hit_tokens"] - uninterrupted["engine_prefix_cache_hit_tokens"]),
    }


async def run(
    engine: Engine,
    redis_url: str,
    workdir: Path,
    *,
    mixes: list[str],
    windows: list[float],
    targets: list[float],
    limit: int | None,
    repeat: int,
    document_repeats: int = 4,
) -> dict[str, Any]:
    """Per mix and per time-to-result target (0: no bound, the worker before it had one)."""
    client = aioredis.Redis.from_url(redis_url)
    result: dict[str, Any] = {}
    for mix in mixes:
        lines = requests_of(mix, limit, engine.served_model, document_repeats)
        await run_job(  # warm-up
            client, engine, workdir / f"{mix}-warm", lines[:16], window=None, result_seconds=targets[0]
        )
        runs: dict[tuple[float, str], list[dict[str, Any]]] = {}
        for round_ in range(repeat):  # alternated: a drift of the host shows on every side alike
            for target in targets:
                for window in [None, *windows]:
                    side = "uninterrupted" if window is None else f"{window:g}"
                    run_dir = workdir / f"{mix}-{target:g}-{side}-{round_}"
                    runs.setdefault((target, side), []).append(
                        await run_job(client, engine, run_dir, lines, window=window, result_seconds=target)
                    )
        by_target: dict[str, Any] = {}
        for target in targets:
            base = median_run(runs[(target, "uninterrupted")])
            by_target[f"{target:g}"] = {
                "uninterrupted": base,
                "windowed": {f"{w:g}": compare(base, median_run(runs[(target, f"{w:g}")])) for w in windows},
            }
        first = by_target[f"{targets[0]:g}"]["uninterrupted"]["results_per_ready_s"]
        for entry in by_target.values():
            entry["uninterrupted_vs_first_target"] = round(
                entry["uninterrupted"]["results_per_ready_s"] / first, 3
            )
        result[mix] = {"requests": len(lines), "result_seconds": by_target}
    await client.aclose()
    return result


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median results per ready-second (all of it, so its figures agree)."""
    ordered = sorted(runs, key=lambda r: r["results_per_ready_s"])
    chosen = dict(ordered[len(ordered) // 2])
    if len(runs) > 1:
        chosen["results_per_ready_s_all"] = [r["results_per_ready_s"] for r in runs]
        chosen["results_per_ready_s_spread"] = round(
            statistics.pstdev(chosen["results_per_ready_s_all"]) / chosen["results_per_ready_s"], 3
        )
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument(
        "--windows", default="15,30,60,120", help="window lengths in seconds, comma-separated"
    )
    parser.add_argument("--mixes", default="example,long-prompts")
    parser.add_argument("--requests", type=int, help="only the first N requests of each mix")
    parser.add_argument(
        "--result-seconds",
        default="10,0",
        help="the worker's time-to-result targets to compare, comma-separated (0: no bound)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per side; the median run is reported")
    parser.add_argument(
        "--max-num-seqs", type=int, default=128, help="the engine's batch (the example template's)"
    )
    parser.add_argument(
        "--engine-cpus",
        choices=("half", "all"),
        default="half",
        help="the engine on half the CPUs and the worker on the rest, or everything on every CPU",
    )
    args = parser.parse_args()
    logging.basicConfig(
        level=os.environ.get("TROUGHFILL_LOG_LEVEL", "WARNING"), format="%(asctime)s %(message)s"
    )
    variable = "TROUGHFILL_DEMO_MODEL" if args.model == "smollm2" else "TROUGHFILL_TINY_MODEL"
    python, model = os.environ.get("TROUGHFILL_VLLM_PYTHON"), os.environ.get(variable)
    if not python or not model:
        raise SystemExit(f"source scripts/setup.sh and scripts/setup_vllm.sh (and setup_demo.sh): {variable}")
    split = split_cpus() if args.engine_cpus == "half" else None
    if split is not None:
        os.sched_setaffinity(0, split[1])  # this process and Redis; the engine has the others
    windows = [float(w) for w in args.windows.split(",") if w]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="troughfill-bench-") as scratch:
        workdir = Path(scratch)
        redis = start_redis(workdir / "redis", appendonly=False)
        server = start_vllm(
            python,
            model,
            workdir / "vllm",
            served_model=SERVED,
            max_num_seqs=args.max_num_seqs,
            cpus=split[0] if split else None,  # given: this process's own affinity is narrowed already
            env={"VLLM_SERVER_DEV_MODE": "1"},  # for /reset_prefix_cache between windows
        )
        try:
            result = asyncio.run(
                run(
                    Engine(server.url, SERVED),
                    redis.url,
                    workdir,
                    mixes=args.mixes.split(","),
                    windows=windows,
                    targets=[float(t) for t in args.result_seconds.split(",")],
                    limit=args.requests,
                    repeat=args.repeat,
                )
            )
        finally:
            server.stop()
            redis.stop()
    summary = {
        "model": args.model,
        "max_num_seqs": args.max_num_seqs,
        "bench_seconds": round(time.monotonic() - started),
        "cpus": {"engine": sorted(split[0]), "worker_and_redis": sorted(split[1])} if split else None,
        "mixes": result,
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
