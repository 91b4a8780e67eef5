"""The ledger's Redis dies mid-job (SIGKILL) and comes back from its append-only file.

redis-server runs as deployed: AOF with fsync every second. A result acknowledged more than
a second before the crash must survive it; one acknowledged within the last second may be
lost, and must then be redone, not duplicated: its commit and its segment's registration
are one script, so they are lost or kept together.
"""

import asyncio
import time
import uuid
from pathlib import Path

import redis.asyncio as aioredis
from redis.asyncio import Redis

from tests.ledgertools import (
    FakeClock,
    FakeWorker,
    create_job,
    drain,
    new_ledger,
    read_jsonl,
    request_line,
    write_input,
)
from troughfill.config import Settings
from troughfill.ledger import JobKeys, JobLedger, connect
from troughfill.results import finalize, index_input
from troughfill.storage import ObjectStore
from troughfill_dev.localcluster import start_redis

REQUESTS = 2_000
OUTAGE_SECONDS = 10
OUTAGE_REQUESTS = 3_000


async def half_done_job(redis_url: str, workdir: Path, clock: FakeClock) -> tuple[JobLedger, str, int]:
    client = aioredis.Redis.from_url(redis_url)
    ledger = new_ledger(client, clock)
    input_url = write_input(workdir / "in.jsonl", [request_line(f"r{i}") for i in range(REQUESTS)])
    output_url = (workdir / "out").as_uri()
    await create_job(ledger, input_url, output_url, lease_seconds=10)
    await index_input(ledger, ObjectStore())
    worker = FakeWorker(ledger, ObjectStore(), output_url, "w1")
    while (await ledger.progress()).completed < REQUESTS // 2 and await worker.take(100):
        await worker.finish()
    assert await worker.take(100)
    await worker.work(100)  # in flight when Redis dies
    return ledger, output_url, (await ledger.progress()).completed


async def recover_and_finish(redis_url: str, ledger: JobLedger, output_url: str, clock: FakeClock) -> int:
    client = aioredis.Redis.from_url(redis_url)
    revived = JobLedger(client, ledger.keys, clock=clock)
    survived = (await revived.progress()).completed
    clock.advance(11)  # the in-flight lease expires
    await drain(revived, ObjectStore(), output_url, chunk=100)
    await finalize(revived, ObjectStore())
    await client.aclose()
    return survived


def check_output(workdir: Path) -> None:
    ids = [line["custom_id"] for line in read_jsonl(workdir / "out" / "output.jsonl")]
    assert len(ids) == len(set(ids)) == REQUESTS
    assert read_jsonl(workdir / "out" / "errors.jsonl") == []


def test_results_acknowledged_before_the_last_second_survive_a_crash(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "redis")
    clock = FakeClock()
    try:
        ledger, output_url, completed = asyncio.run(half_done_job(server.url, tmp_path, clock))
        asyncio.run(asyncio.sleep(1.5))  # one fsync interval and then some
        server.managed.kill()
        server.restart()
        survived = asyncio.run(recover_and_finish(server.url, ledger, output_url, clock))
        assert survived == completed >= REQUESTS // 2
        check_output(tmp_path)
    finally:
        server.stop()


def test_results_lost_with_the_last_second_are_redone_not_duplicated(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "redis")
    clock = FakeClock()
    try:
        ledger, output_url, completed = asyncio.run(half_done_job(server.url, tmp_path, clock))
        server.managed.kill()  # no grace: whatever was not yet fsynced is gone
        server.restart()
        survived = asyncio.run(recover_and_finish(server.url, ledger, output_url, clock))
        assert survived <= completed
        print(f"\n{completed - survived} of {completed} acknowledged results were in the lost second")
        check_output(tmp_path)
    finally:
        server.stop()


async def test_a_workers_client_rides_out_a_redis_restart(tmp_path: Path) -> None:
    """Redis (AOF) stops for ten seconds while a worker drains its job: the worker's patient
    client waits and carries on; every request is done once and no attempt is charged (redis-py's
    default of three retries gives up within the outage)."""
    server = start_redis(tmp_path / "redis")
    operator = Redis.from_url(server.url)
    worker = connect(Settings(redis_url=server.url), patient=True)
    try:
        keys = JobKeys("team-a", "job", uuid.uuid4().hex)
        ledger = JobLedger(operator, keys)
        input_url = write_input(
            tmp_path / "in.jsonl", [request_line(f"r{i}") for i in range(OUTAGE_REQUESTS)]
        )
        await create_job(ledger, input_url, (tmp_path / "out").as_uri())
        await index_input(ledger, ObjectStore())
        await operator.aclose()
        draining = asyncio.create_task(
            drain(JobLedger(worker, keys), ObjectStore(), (tmp_path / "out").as_uri(), chunk=1)
        )
        await asyncio.sleep(0.3)
        assert not draining.done()

        def restart() -> None:
            server.stop()
            time.sleep(OUTAGE_SECONDS)
            server.restart()

        await asyncio.to_thread(restart)
        assert not draining.done()  # it was mid-job through the whole outage
        await asyncio.wait_for(draining, 120)
        operator = Redis.from_url(server.url)
        progress = await JobLedger(operator, keys).progress()
        assert (progress.completed, progress.failed, progress.failed_attempts) == (OUTAGE_REQUESTS, 0, 0)
    finally:
        await worker.aclose()
        await operator.aclose()
        server.stop()
