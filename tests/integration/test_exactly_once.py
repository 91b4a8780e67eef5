"""Exactly once, whatever crashes: random workers die at random points, then the job recovers.

Hypothesis draws a schedule of worker actions against a real redis-server and real files:
claims, partial work, flushes, releases, lease renewals, time passing, and crashes before
the upload, between upload and commit, and after a commit with the rest of the chunk
unfinished. After the schedule, leases expire, a healthy worker finishes the job, and the
stalled workers wake up and commit their stale results late. The
merged output must then hold every valid input exactly once, and the error file every
invalid or given-up input exactly once, with tokens counted once per delivered result.
"""

import asyncio
import json
import uuid
from pathlib import Path

import hypothesis.strategies as st
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings

from tests.ledgertools import (
    FakeClock,
    FakeWorker,
    create_job,
    drain,
    read_jsonl,
    request_line,
    tokens_for,
    write_input,
)
from troughfill.ledger import JobKeys, JobLedger, Progress
from troughfill.results import finalize, index_input
from troughfill.storage import ObjectStore, new_segment_id, write_segment
from troughfill_dev.localcluster import RedisServer

LEASE_SECONDS = 10.0
WORKERS = 3

actions = st.one_of(
    st.tuples(st.just("claim"), st.integers(0, WORKERS - 1), st.integers(1, 12)),
    st.tuples(st.just("work"), st.integers(0, WORKERS - 1), st.integers(1, 12)),
    st.tuples(st.just("flush"), st.integers(0, WORKERS - 1), st.just(0)),
    st.tuples(st.just("release"), st.integers(0, WORKERS - 1), st.just(0)),
    st.tuples(st.just("renew"), st.integers(0, WORKERS - 1), st.just(0)),
    st.tuples(st.just("crash_before_upload"), st.integers(0, WORKERS - 1), st.just(0)),
    st.tuples(st.just("crash_between_upload_and_commit"), st.integers(0, WORKERS - 1), st.just(0)),
    st.tuples(st.just("crash_after_commit"), st.integers(0, WORKERS - 1), st.just(0)),
    st.tuples(st.just("time_passes"), st.just(0), st.sampled_from([1.0, 4.0, 11.0])),
)


def make_input(workdir: Path, valid: int, invalid_every: int) -> tuple[str, list[str], list[str]]:
    """(input URL, custom_ids that must be answered, custom_ids that are duplicates)."""
    lines, expected_valid, expected_invalid = [], [], []
    for i in range(valid):
        lines.append(request_line(f"r{i}"))
        expected_valid.append(f"r{i}")
        if invalid_every and i % invalid_every == 0:
            lines.append(request_line(f"r{i}"))  # a duplicate: goes to the error file
            expected_invalid.append(f"r{i}")
    return write_input(workdir / "in.jsonl", lines), expected_valid, expected_invalid


async def play(worker: FakeWorker, clock: FakeClock, action: str, amount: float) -> None:
    """One step of the schedule for one worker."""
    if action == "time_passes":
        clock.advance(amount)
    elif action == "claim" and worker.claim is None:
        await worker.take(int(amount))
    elif worker.claim is None:
        return
    elif action == "work":
        await worker.work(int(amount))
    elif action == "flush":
        await worker.flush()
    elif action == "release":
        await worker.flush()
        await worker.ledger.release(worker.name, worker.claim.lease_id)
        worker.claim = None
    elif action == "renew":
        await worker.ledger.renew(worker.name, worker.claim.lease_id)
    elif action == "crash_before_upload":
        worker.crash()
    elif action == "crash_between_upload_and_commit":
        segment = new_segment_id(worker.name)
        await asyncio.to_thread(
            write_segment, worker.store, worker.output_url, segment, list(worker.writer.records)
        )
        worker.crash()
    elif action == "crash_after_commit":
        await worker.flush()
        worker.crash()


def check_exactly_once(
    workdir: Path, progress: Progress, expected_valid: list[str], expected_invalid: list[str]
) -> None:
    outputs = read_jsonl(workdir / "out" / "output.jsonl")
    errors = read_jsonl(workdir / "out" / "errors.jsonl")
    delivered = [o["custom_id"] for o in outputs]
    given_up = [e["custom_id"] for e in errors if e["error"]["code"] == "max_attempts_exceeded"]
    duplicates = [e["custom_id"] for e in errors if e["error"]["code"] == "duplicate_custom_id"]
    assert len(delivered) == len(set(delivered)), "a result was delivered twice"
    assert sorted(delivered + given_up) == sorted(expected_valid), "a request was lost or invented"
    assert sorted(duplicates) == sorted(expected_invalid)
    assert len(outputs) + len(errors) == progress.total
    assert {o["response"]["body"]["echo"] for o in outputs} == set(delivered)
    indices = [int(o["id"].rsplit("_", 1)[1]) for o in outputs]
    assert progress.completion_tokens == sum(tokens_for(index) for index in indices), "tokens counted twice"
    assert progress.completed == len(delivered)
    assert progress.failed == len(errors)


async def run_schedule(
    redis_url: str, workdir: Path, valid: int, invalid_every: int, schedule: list[tuple[str, int, float]]
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    clock = FakeClock()
    store = ObjectStore()
    try:
        input_url, expected_valid, expected_invalid = make_input(workdir, valid, invalid_every)
        output_url = (workdir / "out").as_uri()
        ledger = JobLedger(client, JobKeys("ns", "job", uuid.uuid4().hex), clock=clock)
        await create_job(ledger, input_url, output_url, max_attempts=3, lease_seconds=LEASE_SECONDS)
        await index_input(ledger, store)

        workers = [FakeWorker(ledger, store, output_url, f"w{n}") for n in range(WORKERS)]
        for action, who, amount in schedule:
            await play(workers[who], clock, action, amount)

        # Recovery: every lease expires, a healthy worker picks up what is left. Then the
        # workers that were only stalled (not dead) wake up and commit what they had: late.
        clock.advance(LEASE_SECONDS + 1)
        await drain(ledger, store, output_url, chunk=7)
        for worker in workers:
            if worker.claim is not None:
                await worker.flush()
                assert await ledger.release(worker.name, worker.claim.lease_id) == -1  # long reaped
        progress = await ledger.progress()
        assert progress.all_done
        await finalize(ledger, store)
        check_exactly_once(workdir, progress, expected_valid, expected_invalid)
        await ledger.delete()
    finally:
        await client.aclose()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    valid=st.integers(1, 40),
    invalid_every=st.sampled_from([0, 3, 7]),
    schedule=st.lists(actions, min_size=1, max_size=40),
)
def test_random_crashes_never_lose_or_duplicate_a_result(
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
    valid: int,
    invalid_every: int,
    schedule: list[tuple[str, int, float]],
) -> None:
    workdir = tmp_path_factory.mktemp("exactly-once")
    asyncio.run(run_schedule(redis_server.url, workdir, valid, invalid_every, schedule))


def test_output_files_are_plain_jsonl(tmp_path: Path, redis_server: RedisServer) -> None:
    asyncio.run(
        run_schedule(redis_server.url, tmp_path, 5, 0, [("claim", 0, 5), ("work", 0, 5), ("flush", 0, 0)])
    )
    for line in (tmp_path / "out" / "output.jsonl").read_text().splitlines():
        assert json.loads(line)["error"] is None
