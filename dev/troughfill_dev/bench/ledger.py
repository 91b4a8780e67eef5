"""Ledger throughput on one local redis-server: index, claim, complete, finalize.

    python -m troughfill_dev.bench.ledger [--requests 100000] [--chunk 1000] [--workers 4]

Starts its own redis-server (AOF, fsync every second, as deployed) unless --redis-url is
given, writes a synthetic OpenAI Batch input, and runs the real data path: indexing,
chunked claims (Lua), segment upload (file://), commits (Lua), release, finalize. Results
are synthetic (no engine); everything else is what a job does. Prints one JSON object.
"""

import argparse
import asyncio
import json
import resource
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from troughfill.api.batchfile import output_record
from troughfill.api.batchinference import Endpoint
from troughfill.ledger import Claim, JobConfig, JobKeys, JobLedger, Outcome
from troughfill.results import ResultWriter, finalize, index_input
from troughfill.storage import ObjectStore, RecordKind, SegmentRecord
from troughfill_dev.localcluster import start_redis


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


async def claim_all(ledger: JobLedger, workers: int, chunk: int) -> list[tuple[str, Claim]]:
    claims: list[tuple[str, Claim]] = []

    async def worker(name: str) -> None:
        while claim := await ledger.claim(name, chunk):
            claims.append((name, claim))

    await asyncio.gather(*(worker(f"bench-{n}") for n in range(workers)))
    return claims


async def complete_all(
    ledger: JobLedger, store: ObjectStore, output_url: str, claims: list[tuple[str, Claim]], workers: int
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
            await writer.flush(claim.lease_id)
            await ledger.release(name, claim.lease_id)

    await asyncio.gather(*(worker() for _ in range(workers)))


async def run(redis_url: str, workdir: Path, requests: int, chunk: int, workers: int) -> dict[str, Any]:
    client = aioredis.Redis.from_url(redis_url)
    store = ObjectStore()
    input_path = workdir / "requests.jsonl"
    write_input(input_path, requests)
    output_url = (workdir / "out").as_uri()
    ledger = JobLedger(client, JobKeys("bench", "ledger", uuid.uuid4().hex))
    await ledger.create(JobConfig(input_path.as_uri(), output_url, Endpoint.CHAT_COMPLETIONS, 3, 30.0))
    memory_before = int((await client.info("memory"))["used_memory"])

    started = time.perf_counter()
    await index_input(ledger, store)
    index_s = time.perf_counter() - started
    memory_indexed = int((await client.info("memory"))["used_memory"])

    started = time.perf_counter()
    claims = await claim_all(ledger, workers, chunk)
    claim_s = time.perf_counter() - started
    claimed = sum(len(c.indices) for _, c in claims)

    started = time.perf_counter()
    await complete_all(ledger, store, output_url, claims, workers)
    complete_s = time.perf_counter() - started
    progress = await ledger.progress()

    started = time.perf_counter()
    report = await finalize(ledger, store)
    finalize_s = time.perf_counter() - started
    await ledger.delete()
    await client.aclose()
    if claimed != requests or progress.completed != requests or report.outputs != requests:
        raise RuntimeError(f"claimed {claimed}, completed {progress.completed}, merged {report.outputs}")
    return {
        "requests": requests,
        "chunk": chunk,
        "workers": workers,
        "index_per_s": round(requests / index_s),
        "claims_per_s": round(requests / claim_s),
        "completions_per_s": round(requests / complete_s),
        "end_to_end_per_s": round(requests / (claim_s + complete_s)),
        "finalize_per_s": round(requests / finalize_s),
        "redis_bytes_per_request_indexed": round((memory_indexed - memory_before) / requests, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "seconds": {
            "index": round(index_s, 3),
            "claim": round(claim_s, 3),
            "complete": round(complete_s, 3),
            "finalize": round(finalize_s, 3),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--chunk", type=int, default=1_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="troughfill-bench-") as scratch:
        workdir = Path(scratch)
        server = None if args.redis_url else start_redis(workdir / "redis")
        try:
            url = args.redis_url or (server.url if server else "")
            result = asyncio.run(run(url, workdir, args.requests, args.chunk, args.workers))
        finally:
            if server:
                server.stop()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
