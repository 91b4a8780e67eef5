"""The ledger service, written as team B: its workers hold its job's token and nothing else, and
everything they can send is bounded by what the operator owns (real redis-server; the service is
the real aiohttp application on a loopback port; the client is the workers' own RemoteLedger).

The rows of docs/security.md's attack table that the service answers are tested here."""

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from redis.asyncio import Redis

from tests.ledgertools import Service, create_job, drain, request_line, serve, write_input
from tests.reporting import report
from troughfill.ledger import JobKeys, JobLedger, LedgerClosedError, Outcome
from troughfill.ledger.credentials import LedgerKey, make_token
from troughfill.ledger.remote import RemoteLedger
from troughfill.ledger.service import LedgerService, Limits
from troughfill.results import finalize, index_input
from troughfill.storage import ObjectStore
from troughfill_dev.localcluster import RedisServer, start_redis

REQUESTS = 6


@pytest.fixture
async def ledger_service(aredis: Redis) -> AsyncIterator[Service]:
    served, runner = await serve(aredis)
    yield served
    await runner.cleanup()


async def started(client: Redis, tmp_path: Path, namespace: str) -> JobLedger:
    """A job as the operator starts one: recorded and indexed."""
    ledger = JobLedger(client, JobKeys(namespace, "job", uuid.uuid4().hex))
    input_url = write_input(
        tmp_path / namespace / "in.jsonl", [request_line(f"r{i}") for i in range(REQUESTS)]
    )
    await create_job(ledger, input_url, (tmp_path / namespace / "out").as_uri())
    await index_input(ledger, ObjectStore())
    return ledger


async def worker_of(service: Service, ledger: JobLedger) -> RemoteLedger:
    """What the job's worker pod holds: the service's URL and the job's token."""
    return RemoteLedger(ledger.keys, service.url, await LedgerKey(service.client).token(ledger.keys))


async def post(url: str, operation: str, token: str | None, body: object) -> tuple[int, dict[str, object]]:
    """A raw call, as a tenant's own program would make it (no client-side checks)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/job/{operation}", data=json.dumps(body), headers=headers) as response,
    ):
        return response.status, await response.json()


async def test_a_worker_runs_its_job_through_the_service_alone(
    ledger_service: Service, tmp_path: Path
) -> None:
    """Claims, partials, heartbeats, commits: a whole job through the service, then merged."""
    job = await started(ledger_service.client, tmp_path, "team-b")
    remote = await worker_of(ledger_service, job)
    try:
        await drain(remote, ObjectStore(), (tmp_path / "team-b" / "out").as_uri())
    finally:
        await remote.aclose()
    assert (await job.progress()).completed == REQUESTS
    assert (await finalize(job, ObjectStore())).outputs == REQUESTS


async def test_a_token_is_for_one_job_and_cannot_be_forged_or_bent(
    ledger_service: Service, tmp_path: Path
) -> None:
    victim = await started(ledger_service.client, tmp_path, "team-a")
    attacker = await started(ledger_service.client, tmp_path, "team-b")
    token = await LedgerKey(ledger_service.client).token(attacker.keys)
    # Its own token acts on its own job: team A's requests are never what it claims.
    status, answer = await post(ledger_service.url, "claim", token, {"worker": "b-w-1", "max_count": 100})
    assert status == 200
    assert len(answer["result"]["indices"]) == REQUESTS  # type: ignore[index]
    assert await victim.pending() == REQUESTS
    # Another job's name under its own MAC, a MAC under another key, no token, garbage.
    mac = token.split(".")[1]
    forged_ref = make_token(b"not the key", victim.keys)
    spliced = f"{forged_ref.split('.')[0]}.{mac}"
    for bad in (spliced, forged_ref, "", "x.y", token + "0", "a" * 1000):
        status, answer = await post(
            ledger_service.url, "claim", bad or None, {"worker": "b-w-1", "max_count": 1}
        )
        assert status == 401, (bad[:40], answer)
    assert await victim.pending() == REQUESTS  # nothing of team A's moved


@pytest.mark.parametrize(
    ("operation", "body", "problem"),
    [
        # Row 3: a huge claim (the operator's CLAIM script looped on it).
        ("claim", {"worker": "w", "max_count": 2**32}, "max_count"),
        # Indices past the job's total (the operator indexed it: REQUESTS requests).
        ("nack", {"worker": "w", "lease_id": 1, "indices": [REQUESTS], "how": "1"}, "not one of this job's"),
        ("save-partials", {"partials": {"9999": {"text": "x", "tokens": 1}}}, "not one of this job's"),
        ("save-partials", {"partials": {"99999999": {"text": "x", "tokens": 1}}}, "less than"),
        ("spans", {"indices": [0, 2**31]}, "indices"),
        # Row 6: a segment id that is a path into another job's directory.
        ("commit", {"segment_id": "../../team-a/x-0123456789abcdef", "outcomes": []}, "segment_id"),
        # Row 16 and row 2-like: a huge self-report, a huge text.
        ("record-waste", {"tokens": 2**62}, "tokens"),
        ("save-partials", {"partials": {"0": {"text": "x" * ((1 << 20) + 1), "tokens": 1}}}, "text"),
        ("input-changed", {"message": "x" * 5000}, "message"),
        (
            "heartbeat",
            {"worker": "w", "beat": {"pid": 1, "at": 1, "engine_url": "x" * 9000}, "ttl": 5},
            "heartbeat",
        ),
        ("heartbeat", {"worker": "w", "beat": {"pid": 1, "at": 1}, "ttl": 10**9}, "ttl"),
        # Names that are not a pod's, unknown fields (a raw Redis command smuggled in).
        ("claim", {"worker": "../../x", "max_count": 1}, "worker"),
        ("claim", {"worker": "w", "max_count": 1, "eval": "redis.call('FLUSHALL')"}, "eval"),
    ],
)
async def test_what_a_worker_sends_is_bounded_by_what_the_operator_owns(
    ledger_service: Service, tmp_path: Path, operation: str, body: object, problem: str
) -> None:
    job = await started(ledger_service.client, tmp_path, "team-b")
    token = await LedgerKey(ledger_service.client).token(job.keys)
    before = await job.progress()
    status, answer = await post(ledger_service.url, operation, token, body)
    assert status == 400, answer
    assert problem in str(answer["error"])
    assert await job.progress() == before


async def test_a_job_over_its_rate_gets_429_and_the_client_waits_it_out(
    aredis: Redis, tmp_path: Path
) -> None:
    served, runner = await serve(aredis, Limits(calls_per_second=20, burst=5))
    try:
        job = await started(aredis, tmp_path, "team-b")
        other = await started(aredis, tmp_path, "team-a")
        token = await LedgerKey(aredis).token(job.keys)
        statuses = [(await post(served.url, "pending", token, {}))[0] for _ in range(12)]
        assert statuses[:5] == [200] * 5
        assert 429 in statuses[5:]
        # Another job's bucket is its own: team B's flood costs team A nothing.
        other_token = await LedgerKey(aredis).token(other.keys)
        assert (await post(served.url, "pending", other_token, {}))[0] == 200
        remote = await worker_of(served, job)
        try:  # the workers' client honours Retry-After and gets through
            assert [await remote.pending() for _ in range(10)] == [REQUESTS] * 10
        finally:
            await remote.aclose()
    finally:
        await runner.cleanup()


async def test_a_closed_job_refuses_results_through_the_service(
    ledger_service: Service, tmp_path: Path
) -> None:
    job = await started(ledger_service.client, tmp_path, "team-b")
    remote = await worker_of(ledger_service, job)
    try:
        claim = await remote.claim("w", 2)
        assert claim is not None
        await job.close()
        with pytest.raises(LedgerClosedError):
            await remote.commit("w-0123456789abcdef", [Outcome(claim.indices[0])], claim.lease_id)
        with pytest.raises(ValueError, match="not a segment id"):  # the client checks it too
            await remote.commit("../w-0123456789abcdef", [Outcome(0)], claim.lease_id)
    finally:
        await remote.aclose()


@pytest.fixture(scope="module")
def acl_less_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis whose ACL command is renamed away, as managed Redis and Valkey services do."""
    server = start_redis(
        tmp_path_factory.mktemp("acl-less"), appendonly=False, extra_args=["--rename-command", "ACL", '""']
    )
    yield server
    server.stop()


async def test_the_ledger_needs_no_acl_commands(acl_less_redis: RedisServer, tmp_path: Path) -> None:
    client: Redis = Redis.from_url(acl_less_redis.url)
    served, runner = await serve(client)
    try:
        with pytest.raises(Exception, match="unknown command"):
            await client.execute_command("ACL", "WHOAMI")
        job = await started(client, tmp_path, "team-b")
        remote = await worker_of(served, job)
        try:
            await drain(remote, ObjectStore(), (tmp_path / "team-b" / "out").as_uri())
        finally:
            await remote.aclose()
        assert (await finalize(job, ObjectStore())).outputs == REQUESTS
    finally:
        await runner.cleanup()
        await client.aclose()


async def test_a_worker_rides_out_a_service_restart(aredis: Redis, tmp_path: Path) -> None:
    """The service is stateless: a new replica on the same address serves the same token."""
    served, runner = await serve(aredis)
    job = await started(aredis, tmp_path, "team-b")
    remote = await worker_of(served, job)
    try:
        assert await remote.pending() == REQUESTS
        await runner.cleanup()
        port = int(served.url.rsplit(":", 1)[1])

        async def come_back() -> web.AppRunner:
            await asyncio.sleep(1.0)
            again = web.AppRunner(LedgerService(aredis).app())
            await again.setup()
            await web.TCPSite(again, "127.0.0.1", port).start()
            return again

        back = asyncio.create_task(come_back())
        assert await remote.pending() == REQUESTS  # retried until the service answered again
        await (await back).cleanup()
    finally:
        await remote.aclose()


def test_the_ledger_bench_runs_both_paths_and_reports_them(redis_server: RedisServer, tmp_path: Path) -> None:
    """The short version of `python -m troughfill_dev.bench.ledger`: both paths finish every
    request (the bench raises otherwise), batched as the worker batches; the figures are reported."""
    done = subprocess.run(
        [sys.executable, "-m", "troughfill_dev.bench.ledger", "--requests", "5000",
         "--redis-url", redis_server.url],
        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["chunk"] == result["flush"] == 64
    for path in ("service", "direct"):
        assert result[path]["end_to_end_per_s"] > 0
    report(
        "ledger bench (5,000 requests, claims and commits of 64, 4 workers): "
        f"service {result['service']['end_to_end_per_s']}/s, "
        f"direct {result['direct']['end_to_end_per_s']}/s, "
        f"ratio {result['service_over_direct_end_to_end']}"
    )
