"""The ledger over TLS, end to end: the operator and the ledger service connect with the CA file
their pods mount; a worker reaches the ledger only through the service, with its job's token."""

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.exceptions
from redis.asyncio import Redis

from tests.ledgertools import create_job, drain, request_line, serve, write_input
from troughfill.config import Settings
from troughfill.ledger import JobKeys, JobLedger, connect
from troughfill.ledger.credentials import LedgerKey
from troughfill.ledger.remote import RemoteLedger
from troughfill.results import index_input
from troughfill.storage import ObjectStore
from troughfill_dev.localcluster.services import RedisServer, make_tls, start_redis

PASSWORD = "operator-only"


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    workdir = tmp_path_factory.mktemp("redis-tls")
    server = start_redis(workdir / "data", appendonly=False, password=PASSWORD, tls=make_tls(workdir / "pki"))
    yield server
    server.stop()


async def test_operator_and_worker_speak_tls_with_their_own_credentials(
    tls_redis: RedisServer, tmp_path: Path
) -> None:
    assert tls_redis.tls is not None
    url = f"rediss://127.0.0.1:{tls_redis.port}/0"
    operator = connect(
        Settings(redis_url=url, redis_password=PASSWORD, redis_tls_ca_file=str(tls_redis.tls.ca))
    )
    try:
        keys = JobKeys("team-a", "job", uuid.uuid4().hex)
        ledger = JobLedger(operator, keys)
        input_url = write_input(tmp_path / "in.jsonl", [request_line(f"r{i}") for i in range(5)])
        await create_job(ledger, input_url, (tmp_path / "out").as_uri())
        await index_input(ledger, ObjectStore())
        served, runner = await serve(operator)  # the service's own connection, over TLS too
        worker = RemoteLedger(keys, served.url, await LedgerKey(operator).token(keys))
        try:
            await drain(worker, ObjectStore(), (tmp_path / "out").as_uri())
        finally:
            await worker.aclose()
            await runner.cleanup()
        assert (await ledger.progress()).completed == 5
    finally:
        await operator.aclose()


async def test_plain_text_and_unknown_cas_are_refused(tls_redis: RedisServer, tmp_path: Path) -> None:
    plain: Redis = Redis.from_url(f"redis://127.0.0.1:{tls_redis.port}/0", password=PASSWORD)
    with pytest.raises(redis.exceptions.ConnectionError):
        await plain.ping()
    await plain.aclose()
    stranger = make_tls(tmp_path / "other-pki")
    doubting = connect(
        Settings(
            redis_url=f"rediss://127.0.0.1:{tls_redis.port}/0",
            redis_password=PASSWORD,
            redis_tls_ca_file=str(stranger.ca),
        )
    )
    with pytest.raises(redis.exceptions.ConnectionError, match="certificate verify failed"):
        await doubting.ping()
    await doubting.aclose()
