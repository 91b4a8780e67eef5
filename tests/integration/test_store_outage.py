"""The object store unavailable for a minute while a job runs (a real S3-protocol server,
frozen with SIGSTOP so that connections hang instead of failing fast, as a partitioned or
overloaded store behaves): the worker pauses, keeps its leases, and resumes when the store
comes back; nothing is lost, nothing duplicated, no attempt charged for the outage."""

import asyncio
import os
import subprocess
import time
import uuid
from pathlib import Path

import s3fs
from redis.asyncio import Redis

from tests.ledgertools import create_job, request_line, standin_worker
from troughfill.ledger import JobKeys, JobLedger
from troughfill.results import finalize, index_input
from troughfill.storage import ObjectStore
from troughfill.worker.runner import ExitCode
from troughfill_dev.localcluster import RedisServer, S3Server, start_s3

OUTAGE_SECONDS = 60.0
REQUESTS = 1500


def start_worker(keys: JobKeys, redis: RedisServer, server: S3Server, log: Path) -> "subprocess.Popen[bytes]":
    """One worker with a stand-in engine (a tenth of a second an answer), reading and writing
    through the S3 server with the credentials and endpoint a pod would get."""
    command = standin_worker(keys, "--delay-seconds", "0.1", concurrency=4)
    env = {
        **os.environ,
        "TROUGHFILL_REDIS_URL": redis.url,
        "TROUGHFILL_S3_ENDPOINT_URL": server.url,
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with log.open("wb") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


async def test_a_minute_without_the_object_store_pauses_the_job_and_loses_nothing(
    aredis: Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    server = start_s3(tmp_path / "s3")
    worker: subprocess.Popen[bytes] | None = None
    try:
        s3fs.S3FileSystem(**server.s3_options).mkdir("jobs")
        store = ObjectStore(options={"s3": server.s3_options})
        lines = [request_line(f"r{i}") for i in range(REQUESTS)]
        store.write_bytes("s3://jobs/in.jsonl", "".join(line + "\n" for line in lines).encode())
        ledger = JobLedger(aredis, JobKeys("team-a", "outage", uuid.uuid4().hex))
        await create_job(ledger, "s3://jobs/in.jsonl", "s3://jobs/out/", lease_seconds=10)
        await index_input(ledger, store)

        log = tmp_path / "worker.log"
        worker = start_worker(ledger.keys, redis_server, server, log)

        async def completed() -> int:
            return (await ledger.progress()).completed

        deadline = time.monotonic() + 60
        while await completed() < 100:
            assert worker.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            await asyncio.sleep(0.2)

        server.freeze()
        before = await completed()
        await asyncio.sleep(OUTAGE_SECONDS)
        assert worker.poll() is None, f"the worker gave up during the outage:\n{log.read_text()}"
        during = await completed() - before
        # At 40 answers a second the job would have finished within the minute: the store's
        # absence held results back (they are committed only once stored).
        assert before + during < REQUESTS / 2, (before, during)
        progress = await ledger.progress()
        assert progress.failed_attempts == 0
        server.thaw()

        code = await asyncio.to_thread(worker.wait, 240)
        assert code == ExitCode.OK, log.read_text()
        progress = await ledger.progress()
        assert (progress.completed, progress.failed, progress.failed_attempts) == (REQUESTS, 0, 0)
        final = await finalize(ledger, store)
        outputs = list(store.read_jsonl(final.output_url))
        assert sorted(o["custom_id"] for o in outputs) == sorted(f"r{i}" for i in range(REQUESTS))
        assert not store.exists(final.error_url) or not list(store.read_jsonl(final.error_url))
        print(f"\n{before} done before the outage, {during} committed during {OUTAGE_SECONDS:.0f}s of it")
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait()
        server.stop()
