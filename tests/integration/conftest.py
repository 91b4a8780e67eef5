"""Integration tier: real `redis-server` and `prometheus` (Debian packages installed by
scripts/setup.sh), each started once per session on a free 127.0.0.1 port in a scratch
directory, and stopped at the end. Metrics endpoints are real HTTP servers
(prometheus-client) that the tests move; Prometheus scrapes them every second.
The S3 server is moto in server mode: a separate process speaking the S3 protocol over HTTP,
reached through s3fs exactly as a real object store would be. Nothing is faked."""

from collections.abc import Iterator

import pytest
import redis

from tests.ledgertools import FakeClock
from troughfill.storage import ObjectStore
from troughfill_dev.localcluster import PrometheusServer, RedisServer, S3Server, start_prometheus, start_s3


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator["redis.Redis[bytes]"]:
    client: redis.Redis[bytes] = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="session")
def prometheus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    server = start_prometheus(tmp_path_factory.mktemp("prometheus"), scrape_interval="1s")
    yield server
    server.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store() -> ObjectStore:
    return ObjectStore()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_s3(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()
