"""Each job's workers get a Redis user of their own (real redis-server, real ACLs): it can run
its job's ledger and nothing else. Written as team B's worker trying to reach team A's job."""

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.exceptions
from redis.asyncio import Redis

from tests.ledgertools import create_job, drain, request_line, write_input
from troughfill.ledger import JobKeys, JobLedger, OutputClaims
from troughfill.ledger.access import ACCESS_KEY, LedgerAccess
from troughfill.results import finalize, index_input
from troughfill.storage import ObjectStore
from troughfill_dev.localcluster import RedisServer

Denied = redis.exceptions.NoPermissionError


async def started(aredis: Redis, tmp_path: Path, namespace: str) -> JobLedger:
    ledger = JobLedger(aredis, JobKeys(namespace, "job", uuid.uuid4().hex))
    input_url = write_input(tmp_path / namespace / "in.jsonl", [request_line(f"r{i}") for i in range(6)])
    await create_job(ledger, input_url, (tmp_path / namespace / "out").as_uri())
    await index_input(ledger, ObjectStore())
    return ledger


@pytest.fixture
async def as_user(redis_server: RedisServer) -> AsyncIterator[list[Redis]]:
    opened: list[Redis] = []
    yield opened
    for client in opened:
        await client.aclose()


async def login(redis_server: RedisServer, opened: list[Redis], user: str, password: str) -> Redis:
    client: Redis = Redis.from_url(redis_server.url, username=user, password=password)
    opened.append(client)
    return client


async def test_a_job_user_runs_its_own_ledger_and_cannot_touch_another_jobs(
    aredis: Redis, redis_server: RedisServer, as_user: list[Redis], tmp_path: Path
) -> None:
    access = LedgerAccess(aredis)
    victim = await started(aredis, tmp_path, "team-a")
    attacker = await started(aredis, tmp_path, "team-b")
    await access.load_scripts()
    user, password = await access.grant(attacker.keys)
    b = await login(redis_server, as_user, user, password)

    # Its own job: everything a worker does (claims, partials, commits, heartbeats) works.
    own = JobLedger(b, attacker.keys)
    await drain(own, ObjectStore(), (tmp_path / "team-b" / "out").as_uri())
    assert (await attacker.progress()).completed == 6
    assert (await finalize(attacker, ObjectStore())).outputs == 6

    # Team A's keys: refused, whichever way they are asked for.
    meta = victim.keys.key("meta")
    with pytest.raises(Denied):
        await b.hset(meta, "output_url", "s3://attacker/")
    with pytest.raises(Denied):
        await b.hgetall(meta)
    with pytest.raises(Denied):
        await JobLedger(b, victim.keys).claim("thief", 6)  # its scripts, pointed at A's keys
    with pytest.raises(Denied):
        await b.get(ACCESS_KEY)  # the key every job's password derives from
    with pytest.raises(Denied):
        await b.set(OutputClaims.key("s3://team-a-batches/"), "team-b/x/y")
    # Nothing that lists other jobs, runs code of its own, or stalls Redis for everyone.
    for command in (
        ("SCAN", 0),
        ("KEYS", "*"),
        ("RANDOMKEY",),
        ("EVAL", "while true do end", 0),
        ("SCRIPT", "LOAD", "return 1"),
        ("FLUSHALL",),
        ("CONFIG", "SET", "maxmemory", "1"),
        ("ACL", "SETUSER", user, "~*"),
        ("SUBSCRIBE", "x"),
        ("BLPOP", attacker.keys.key("retry"), 5),
    ):
        with pytest.raises(Denied):
            await b.execute_command(*command)
    assert (await victim.progress()).completed == 0
    assert await victim.config() is not None  # A's job is intact


async def test_a_deleted_jobs_user_is_gone_and_a_redis_restart_brings_users_back(
    aredis: Redis, redis_server: RedisServer, as_user: list[Redis], tmp_path: Path
) -> None:
    access = LedgerAccess(aredis)
    job = await started(aredis, tmp_path, "team-a")
    assert await access.ensure([job.keys]) == 1  # first time: scripts loaded, user made
    assert await access.ensure([job.keys]) == 0  # the same Redis: nothing to do
    other = await started(aredis, tmp_path, "team-b")
    assert await access.ensure([other.keys]) == 1  # another pool's job, the same Redis: its user too
    user, password = await access.credentials(job.keys)
    client = await login(redis_server, as_user, user, password)
    assert await client.ping()
    # What a restart loses (users, scripts) is made again on the next cycle, same password.
    await aredis.acl_deluser(user)
    await aredis.script_flush()
    access._run_id = "another run"  # what a new run_id looks like to it
    assert await access.ensure([job.keys, other.keys]) == 2
    again = await login(redis_server, as_user, user, password)
    assert await JobLedger(again, job.keys).claim("w", 1) is not None  # EVALSHA of a loaded script
    await access.revoke(job.keys)
    with pytest.raises(redis.exceptions.AuthenticationError):
        await (await login(redis_server, as_user, user, password)).ping()
