"""The real services later tiers build on: Redis keeps acknowledged writes across a crash,
Prometheus follows a metric the test moves within a scrape interval."""

import time
from pathlib import Path

import pytest
import redis
import requests
from prometheus_api_client import PrometheusConnect
from prometheus_client import CollectorRegistry, Gauge, start_http_server
from pydantic import SecretStr

from troughfill.config import Settings
from troughfill.ledger import connect
from troughfill_dev.localcluster import PrometheusServer, free_port, start_prometheus, start_redis


def test_redis_is_real_and_durable_by_default(redis_client: "redis.Redis[bytes]") -> None:
    assert redis_client.ping() is True
    info = redis_client.info("server")
    assert int(str(info["redis_version"]).split(".")[0]) >= 6
    assert redis_client.config_get("appendonly") == {"appendonly": "yes"}
    assert redis_client.config_get("appendfsync") == {"appendfsync": "everysec"}
    assert redis_client.config_get("bind")["bind"] == "127.0.0.1"


def test_a_write_acknowledged_a_second_before_a_crash_survives_it(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "redis")
    try:
        client: redis.Redis[bytes] = redis.Redis.from_url(server.url)
        client.set("result:1", b"done")
        time.sleep(1.5)  # appendfsync everysec: at most the last second is at risk
        server.managed.kill()
        with pytest.raises(redis.ConnectionError):
            client.ping()
        server.restart()
        client = redis.Redis.from_url(server.url)
        assert client.get("result:1") == b"done"
        client.close()
    finally:
        server.stop()


def test_password_protected_redis(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "redis", password="s3cret")
    try:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port).ping()
        assert redis.Redis.from_url(server.url).ping()
    finally:
        server.stop()


def test_prometheus_follows_a_metric_within_a_scrape_interval(prometheus_server: PrometheusServer) -> None:
    registry = CollectorRegistry()
    online_gpus = Gauge("online_gpus", "GPUs held by online serving", registry=registry)
    port = free_port()
    http_server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        prometheus_server.set_targets([f"127.0.0.1:{port}"])
        client = PrometheusConnect(url=prometheus_server.url, disable_ssl=True)

        def wait_for(value: float, timeout: float) -> float:
            start = time.monotonic()
            while time.monotonic() - start < timeout:
                result = client.custom_query("online_gpus")
                if result and float(result[0]["value"][1]) == value:
                    return time.monotonic() - start
                time.sleep(0.1)
            raise AssertionError(f"Prometheus did not see online_gpus={value} within {timeout}s")

        online_gpus.set(3)
        wait_for(3, timeout=15)  # first scrape after the reload
        online_gpus.set(7)
        seen_after = wait_for(7, timeout=5)
        print(f"\nPrometheus saw the new value {seen_after:.2f}s after it moved (scrape interval 1s)")
        assert seen_after <= 2.5  # one interval plus scheduling slack

        up = client.custom_query('up{job="targets"}')
        assert [sample["value"][1] for sample in up] == ["1"]
    finally:
        http_server.shutdown()
        thread.join(5)


def test_prometheus_stopped_means_no_answer(tmp_path: Path) -> None:
    server = start_prometheus(tmp_path / "prometheus")
    client = PrometheusConnect(url=server.url, disable_ssl=True)
    assert client.check_prometheus_connection()
    server.stop()
    with pytest.raises(requests.exceptions.ConnectionError):
        client.check_prometheus_connection()


async def test_ledger_connects_with_password_from_settings(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "redis", password="from-a-secret")
    try:
        plain_url = f"redis://127.0.0.1:{server.port}/0"
        client = connect(Settings(redis_url=plain_url, redis_password=SecretStr("from-a-secret")))
        assert await client.ping()
        await client.aclose()
        with pytest.raises(redis.AuthenticationError):
            await connect(Settings(redis_url=plain_url)).ping()
    finally:
        server.stop()
