"""The online signal end to end: a real /metrics endpoint (prometheus-client) whose values the
test moves, a real Prometheus scraping it every second, the signals adapter querying it, and
the planner deciding from what the adapter read."""

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from tests.plannertools import job, workers
from troughfill.api.batchpool import OnlineWorkload
from troughfill.planner import Plan, PoolPolicy, Quota, SignalState, Snapshot, StopMode, plan
from troughfill.signals import PrometheusSignals, SignalReading
from troughfill_dev.localcluster import PrometheusServer, free_port, start_prometheus

SCRAPE_SECONDS = 1.0
ONLINE = OnlineWorkload.model_validate(
    {
        "gpusInUseQuery": 'sum(online_gpus_in_use{model="chat"})',
        "utilizationQuery": "avg(dcgm_gpu_utilization)",
        "pressure": [
            # Depending on the Prometheus and client versions, vLLM's "vllm:x" is stored as
            # "vllm:x" or escaped to "vllm_x"; a name regex matches both.
            {"name": "queue", "query": 'sum({__name__=~"vllm[:_]num_requests_waiting"})', "threshold": 5},
            {"name": "kv-cache", "query": 'max({__name__=~"vllm[:_]kv_cache_usage_perc"})', "threshold": 0.9},
        ],
    }
)
POOL = PoolPolicy(capacity_gpus=16, headroom_gpus=1, max_staleness_seconds=3.0, default_quota=Quota(100))


@dataclass
class OnlineExporter:
    """What online serving would export: GPUs in use, queue, KV cache, DCGM utilisation."""

    gpus: Gauge
    waiting: Gauge
    kv_cache: Gauge
    utilization: Gauge
    target: str
    stop: Callable[[], None]


@pytest.fixture
def exporter() -> Iterator[OnlineExporter]:
    registry = CollectorRegistry()
    gpus = Gauge("online_gpus_in_use", "GPUs held by online serving", ["model"], registry=registry)
    waiting = Gauge("vllm:num_requests_waiting", "Requests waiting", registry=registry)
    kv_cache = Gauge("vllm:kv_cache_usage_perc", "KV cache use", registry=registry)
    utilization = Gauge("dcgm_gpu_utilization", "GPU utilisation", registry=registry)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if not stopped:
            server.shutdown()
            thread.join(5)
            stopped = True

    gpus.labels(model="chat").set(2)
    yield OnlineExporter(gpus.labels(model="chat"), waiting, kv_cache, utilization, f"127.0.0.1:{port}", stop)  # type: ignore[arg-type]
    stop()


@pytest.fixture
def prometheus(tmp_path: Path, exporter: OnlineExporter) -> Iterator[PrometheusServer]:
    server = start_prometheus(
        tmp_path / "prometheus", [exporter.target], scrape_interval=f"{SCRAPE_SECONDS:g}s"
    )
    yield server
    server.stop()


def decide(reading: SignalReading, now: float) -> Plan:
    held = job("team/j", workers=workers(6))
    return plan(Snapshot(now=now, pool=POOL, online=reading.online_signal(), jobs=(held,)))


def wait_for(
    signals: PrometheusSignals, check: Callable[[SignalReading], bool], timeout: float
) -> tuple[float, SignalReading]:
    start = time.monotonic()
    while True:
        reading = signals.read("pool", ONLINE)
        if check(reading):
            return time.monotonic() - start, reading
        if time.monotonic() - start > timeout:
            raise AssertionError(f"signal did not follow within {timeout}s: {reading}")
        time.sleep(0.05)


def test_planner_input_follows_the_online_metric_within_one_scrape_interval(
    exporter: OnlineExporter, prometheus: PrometheusServer
) -> None:
    signals = PrometheusSignals(prometheus.url, timeout_seconds=2.0)
    wait_for(signals, lambda r: r.gpus_in_use == 2, timeout=20)  # first scrapes

    latencies = []
    for value in (9, 4, 12):
        exporter.gpus.set(value)
        seconds, reading = wait_for(signals, lambda r, v=value: r.gpus_in_use == v, timeout=5)
        latencies.append(seconds)
        result = decide(reading, time.time())
        assert result.signal is SignalState.FRESH
        assert result.trough_gpus == 16 - value - 1
        assert result.batch_gpus <= 16 - value - 1
    print(
        f"\nplanner input followed the metric after {', '.join(f'{s:.2f}s' for s in latencies)} (scrape 1s)"
    )
    # one scrape interval, plus Prometheus's scrape jitter and query time
    assert max(latencies) <= SCRAPE_SECONDS + 0.6

    exporter.waiting.set(7)
    _, reading = wait_for(signals, lambda r: "queue" in r.firing, timeout=5)
    assert reading.pressure["queue"] == 7
    assert decide(reading, time.time()).trough_gpus == 16 - 12 - 1 - POOL.pressure_release_gpus
    exporter.waiting.set(0)
    exporter.kv_cache.set(0.95)
    _, reading = wait_for(signals, lambda r: r.firing == ("kv-cache",), timeout=5)
    exporter.utilization.set(0.42)
    _, reading = wait_for(signals, lambda r: r.utilization == pytest.approx(0.42), timeout=5)


def test_prometheus_stopped_goes_stale_and_batch_yields(
    exporter: OnlineExporter, prometheus: PrometheusServer
) -> None:
    signals = PrometheusSignals(prometheus.url, timeout_seconds=1.0)
    _, reading = wait_for(signals, lambda r: r.gpus_in_use == 2, timeout=20)
    assert decide(reading, time.time()).batch_gpus == 6
    prometheus.stop()
    stopped_at = time.time()
    reading = signals.read("pool", ONLINE)
    assert reading.error is not None
    assert reading.gpus_in_use == 2  # the last good value, aging
    assert decide(reading, time.time()).signal is SignalState.FRESH  # not stale yet
    while time.time() - stopped_at <= POOL.max_staleness_seconds + 0.5:
        time.sleep(0.2)
    reading = signals.read("pool", ONLINE)
    result = decide(reading, time.time())
    assert result.signal is SignalState.STALE
    assert result.batch_gpus == POOL.floor_gpus == 0
    assert {s.mode for s in result.stops} == {StopMode.YIELD}
    assert len(result.stops) == 6


def test_exporter_gone_means_no_value_then_stale(
    exporter: OnlineExporter, prometheus: PrometheusServer
) -> None:
    signals = PrometheusSignals(prometheus.url, timeout_seconds=2.0)
    wait_for(signals, lambda r: r.gpus_in_use == 2, timeout=20)
    exporter.stop()
    # Prometheus marks the target's series stale on the first failed scrape: the query turns empty.
    _, reading = wait_for(
        signals,
        lambda r: r.read_at is not None and time.time() - r.read_at > 1.5,
        timeout=10,
    )
    assert reading.pressure == {}
    assert reading.error == "gpusInUseQuery returned no samples"  # what SignalReady will say
    print(f"\nseries vanished; last good value {time.time() - (reading.read_at or 0):.1f}s old")
    time.sleep(POOL.max_staleness_seconds)
    assert decide(signals.read("pool", ONLINE), time.time()).signal is SignalState.STALE


def test_never_read_is_missing() -> None:
    signals = PrometheusSignals(f"http://127.0.0.1:{free_port()}", timeout_seconds=0.5)
    reading = signals.read("pool", ONLINE)
    assert reading.gpus_in_use is None
    assert reading.error is not None
    assert "Connection" in reading.error
    assert " at 0x" not in reading.error  # the same failure reads the same: no status churn
    assert signals.read("pool", ONLINE).error == reading.error
    assert decide(reading, time.time()).signal is SignalState.MISSING


def test_history_for_the_forecast(exporter: OnlineExporter, prometheus: PrometheusServer) -> None:
    signals = PrometheusSignals(prometheus.url, timeout_seconds=2.0)
    wait_for(signals, lambda r: r.gpus_in_use == 2, timeout=20)
    exporter.gpus.set(5)
    wait_for(signals, lambda r: r.gpus_in_use == 5, timeout=5)
    time.sleep(1.5)  # range queries take whole-second bounds
    now = time.time()
    history = signals.history('online_gpus_in_use{model="chat"}', now - 30, now, step=1)
    values = [v for _, v in history]
    assert values[-1] == 5
    assert 2 in values
    assert all(a < b for (a, _), (b, _) in itertools.pairwise(history))
