"""Ledger throughput on one local redis-server: index, claim, complete, finalize, through the
path workers use (the ledger service) and the direct path (Redis), side by side in one run.

    python -m troughfill_dev.bench.ledger [--requests 100000] [--chunk 64] [--flush 64] [--workers 4]

Starts its own redis-server (AOF, fsync every second, as deployed) unless --redis-url is
given, and a `troughfill ledger` process in front of it (as deployed: its own process, HTTP on
loopback), writes a synthetic OpenAI Batch input, and runs the real data path for two jobs of
the same input: indexing (the operator's, direct), then chunked claims (Lua), segment uploads
(file://) and commits every `--flush` results (Lua), releases, finalize. One job's workers go
through the ledger service with the job's token (RemoteLedger), the other's straight to Redis
(JobLedger); the two run one after the other, service first. Results are synthetic (no
engine); everything else is what a job does. The defaults batch as the worker does (claims of
64, a commit every 64 results). Prints one JSON object.
"""

import argparse
import asyncio
import json
import resource
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from troughfill.api.batchfile import output_record
from troughfill.api.batchinference import Endpoint
from troughfill.ledger import Claim, JobConfig, JobKeys, JobLedger, Outcome
from troughfill.ledger.credentials import LedgerKey
from troughfill.ledger.port import WorkerLedger
from troughfill.ledger.remote import RemoteLedger
from troughfill.results import ResultWriter, finalize, index_input
from troughfill.storage import ObjectStore, RecordKind, SegmentRecord
from troughfill.worker.runner import WorkerOptions
from troughfill_dev.localcluster import start_ledger, start_redis


def write_input(path: Path, requests: int) -> None:
    with path.open("w") as stream:
        for i in range(requests):
            body = {
                "model": "m",
                "messages": [{"role": "user", "content": f"classify record {i}"}],
                "max_tokens": 8,
            }
            stream.write(
                json.dumps(
                    {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
                )
            )
            stream.write("\n")


async def claim_all(ledger: WorkerLedger, workers: int, chunk: int) -> list[tuple[str, Claim]]:
    claims: list[tuple[str, Claim]] = []

    async def worker(name: str) -> None:
        while claim := await ledger.claim(name, chunk):
            claims.append((name, claim))

    await asyncio.gather(*(worker(f"bench-{n}") for n in range(workers)))
    return claims


async def complete_all(
    ledger: WorkerLedger,
    store: ObjectStore,
    output_url: str,
    claims: list[tuple[str, Claim]],
    *,
    workers: int,
    flush: int,
) -> None:
    queue: asyncio.Queue[tuple[str, Claim]] = asyncio.Queue()
    for item in claims:
        queue.put_nowait(item)

    # Stands in for the engine's parsed answer: its cost belongs to the engine client, not the ledger.
    body = {"choices": [{"message": {"content": "billing"}}], "usage": {"completion_tokens": 1}}

    async def worker() -> None:
        while not queue.empty():
            name, claim = queue.get_nowait()
            writer = ResultWriter(ledger, store, output_url, writer=name)
            for index in claim.indices:
                record = output_record(
                    ledger.job_token,
                    index,
                    f"req-{index}",
                    status_code=200,
                    body=body,
                    upstream_id=str(index),
                )
                writer.add(
                    SegmentRecord(index, RecordKind.OUTPUT, record), Outcome(index, completion_tokens=1)
                )
                if len(writer) >= flush:
                    await writer.flush(claim.lease_id)
            await writer.flush(claim.lease_id)
            await ledger.release(name, claim.lease_id)

    await asyncio.gather(*(worker() for _ in range(workers)))


@dataclass(frozen=True)
class Setup:
    client: aioredis.Redis
    store: ObjectStore
    input_path: Path
    workdir: Path
    chunk: int
    flush: int
    workers: int


async def one_job(setup: Setup, path: str, ledger_url: str) -> dict[str, Any]:
    """Index as the operator does, then claim and complete through `path` ("service" or "direct")."""
    client, store, requests = setup.client, setup.store, _lines(setup.input_path)
    output_url = (setup.workdir / f"out-{path}").as_uri()
    ledger = JobLedger(client, JobKeys("bench", f"ledger-{path}", uuid.uuid4().hex))
    await ledger.create(JobConfig(setup.input_path.as_uri(), output_url, Endpoint.CHAT_COMPLETIONS, 3, 30.0))
    memory_before = int((await client.info("memory"))["used_memory"])

    started = time.perf_counter()
    await index_input(ledger, store)
    index_s = time.perf_counter() - started
    memory_indexed = int((await client.info("memory"))["used_memory"])

    remote = RemoteLedger(ledger.keys, ledger_url, await LedgerKey(client).token(ledger.keys))
    workers: WorkerLedger = remote if path == "service" else ledger
    try:
        started = time.perf_counter()
        claims = await claim_all(workers, setup.workers, setup.chunk)
        claim_s = time.perf_counter() - started
        claimed = sum(len(c.indices) for _, c in claims)

        started = time.perf_counter()
        await complete_all(workers, store, output_url, claims, workers=setup.workers, flush=setup.flush)
        complete_s = time.perf_counter() - started
    finally:
        await remote.aclose()
    progress = await ledger.progress()

    started = time.perf_counter()
    report = await finalize(ledger, store)
    finalize_s = time.perf_counter() - started
    await ledger.delete()
    if claimed != requests or progress.completed != requests or report.outputs != requests:
        raise RuntimeError(
            f"{path}: claimed {claimed}, completed {progress.completed}, merged {report.outputs}"
        )
    return {
        "index_per_s": round(requests / index_s),
        "claims_per_s": round(requests / claim_s),
        "completions_per_s": round(requests / complete_s),
        "end_to_end_per_s": round(requests / (claim_s + complete_s)),
        "finalize_per_s": round(requests / finalize_s),
        "redis_bytes_per_request_indexed": round((memory_indexed - memory_before) / requests, 1),
        "seconds": {
            "index": round(index_s, 3),
            "claim": round(claim_s, 3),
            "complete": round(complete_s, 3),
            "finalize": round(finalize_s, 3),
        },
    }


def _lines(path: Path) -> int:
    with path.open("rb") as stream:
        return sum(1 for _ in stream)


async def run(
    redis_url: str, ledger_url: str, workdir: Path, *, requests: int, chunk: int, flush: int, workers: int
) -> dict[str, Any]:
    client = aioredis.Redis.from_url(redis_url)
    input_path = workdir / "requests.jsonl"
    write_input(input_path, requests)
    setup = Setup(client, ObjectStore(), input_path, workdir, chunk, flush, workers)
    try:
        service = await one_job(setup, "service", ledger_url)
        direct = await one_job(setup, "direct", ledger_url)
    finally:
        await client.aclose()
    return {
        "requests": requests,
        "chunk": chunk,
        "flush": flush,
        "workers": workers,
        "service": service,
        "direct": direct,
        "service_over_direct_end_to_end": round(service["end_to_end_per_s"] / direct["end_to_end_per_s"], 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--chunk", type=int, default=WorkerOptions(worker_id="").max_claim)
    parser.add_argument("--flush", type=int, default=WorkerOptions(worker_id="").flush_results)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="troughfill-bench-") as scratch:
        workdir = Path(scratch)
        server = None if args.redis_url else start_redis(workdir / "redis")
        url = args.redis_url or (server.url if server else "")
        ledger = start_ledger(workdir / "ledger", url)
        try:
            result = asyncio.run(
                run(
                    url,
                    ledger.url,
                    workdir,
                    requests=args.requests,
                    chunk=args.chunk,
                    flush=args.flush,
                    workers=args.workers,
                )
            )
        finally:
            ledger.stop()
            if server:
                server.stop()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
