"""Reads a BatchPool's online-serving queries from Prometheus, with timeouts and staleness.

A value is only as fresh as its last successful read. Prometheus itself drops a series the
moment a scrape of its target fails (staleness markers), so "the exporter died" and "Prometheus
is unreachable" both show up here as reads that return nothing; `read_at` then stops moving and
the planner sees the signal age past `maxStaleness`.

The client (prometheus-api-client) is synchronous: call `read` from a worker thread in async
code. Retries are off on purpose: a slow answer is a stale answer.
"""

import contextlib
import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from prometheus_api_client import PrometheusConnect
from urllib3.util.retry import Retry

from troughfill.api.batchpool import OnlineWorkload
from troughfill.planner import OnlineSignal

_OBJECT_ADDRESS = re.compile(r" object at 0x[0-9a-fA-F]+")


@dataclass(frozen=True)
class SignalReading:
    gpus_in_use: float | None
    """Sum of the gpusInUseQuery result; None when it gave nothing (or was not read)."""
    read_at: float | None
    """Clock time of the last read that gave a value (older when this one failed)."""
    utilization: float | None = None
    pressure: dict[str, float] = field(default_factory=dict)
    """Each pressure query's value (absent when it gave nothing)."""
    firing: tuple[str, ...] = ()
    """Pressure signals above their threshold."""
    error: str | None = None
    """Why a query gave no value this read (its exception, or that gpusInUseQuery returned
    nothing): the pool's SignalReady condition says it."""

    def online_signal(self, pending_gpus: float = 0.0) -> OnlineSignal:
        """The planner's view: the last good value and when it was read, plus the cluster's pending GPUs."""
        return OnlineSignal(
            gpus_in_use=self.gpus_in_use,
            observed_at=self.read_at,
            pending_gpus=pending_gpus,
            pressure=bool(self.firing),
        )


class SignalSource(Protocol):
    def read(self, pool_name: str, online: OnlineWorkload) -> SignalReading: ...

    def history(
        self, query: str, start: float, end: float, step: float, url: str | None = None
    ) -> list[tuple[float, float]]: ...


def vector_sum(result: Sequence[dict[str, Any]]) -> float | None:
    """The sum of an instant vector's samples; None for an empty vector or NaN."""
    if not result:
        return None
    total = 0.0
    for sample in result:
        value = float(sample["value"][1])
        if math.isnan(value):
            return None
        total += value
    return total


def describe_error(error: Exception) -> str:
    """An error's text, the same for the same failure: it lands in a condition message, and a
    message that changed every read (urllib3 names its connection objects by address) would
    rewrite the pool's status every cycle."""
    return _OBJECT_ADDRESS.sub("", f"{type(error).__name__}: {error}")[:300]


class PrometheusSignals:
    """One client per Prometheus URL; remembers the last good reading of each pool."""

    def __init__(
        self,
        default_url: str,
        timeout_seconds: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.default_url = default_url
        self.timeout_seconds = timeout_seconds
        self.clock = clock
        self._clients: dict[str, PrometheusConnect] = {}
        self._last_good: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def client(self, url: str | None) -> PrometheusConnect:
        url = url or self.default_url
        with self._lock:
            if url not in self._clients:
                self._clients[url] = PrometheusConnect(
                    url=url,
                    disable_ssl=not url.startswith("https"),
                    retry=Retry(total=0),
                    timeout=self.timeout_seconds,
                )
            return self._clients[url]

    def query(self, client: PrometheusConnect, promql: str) -> float | None:
        # Prometheus durations take integers: "2500ms", not "2.5s".
        params = {"timeout": f"{max(1, round(self.timeout_seconds * 1000))}ms"}
        return vector_sum(client.custom_query(promql, params=params))

    def read(self, pool_name: str, online: OnlineWorkload) -> SignalReading:
        client = self.client(online.prometheus_url)
        errors: list[str] = []

        def attempt(promql: str) -> float | None:
            try:
                return self.query(client, promql)
            except Exception as error:  # any failure is a missing value; the reason is kept
                errors.append(describe_error(error))
                return None

        gpus = attempt(online.gpus_in_use_query) if online.gpus_in_use_query else None
        if online.gpus_in_use_query and gpus is None and not errors:
            errors.append("gpusInUseQuery returned no samples")
        now = self.clock()
        if gpus is not None:
            self._last_good[pool_name] = (gpus, now)
        last = self._last_good.get(pool_name)
        utilization = attempt(online.utilization_query) if online.utilization_query else None
        pressure: dict[str, float] = {}
        for signal in online.pressure:
            value = attempt(signal.query)
            if value is not None:
                pressure[signal.name] = value
        firing = tuple(s.name for s in online.pressure if pressure.get(s.name, 0.0) > s.threshold)
        return SignalReading(
            # A failed read reports the last good value with its (aging) time: the planner decides
            # when that is too old.
            gpus_in_use=last[0] if last else None,
            read_at=last[1] if last else None,
            utilization=utilization,
            pressure=pressure,
            firing=firing,
            error="; ".join(errors) or None,
        )

    def history(
        self, query: str, start: float, end: float, step: float, url: str | None = None
    ) -> list[tuple[float, float]]:
        """(time, value) of a query's sum over a past range, for the forecast; [] when unavailable."""
        client = self.client(url)
        with contextlib.suppress(Exception):  # no history only means no forecast
            result = client.custom_query_range(
                f"sum({query})",
                start_time=datetime.fromtimestamp(start, UTC),
                end_time=datetime.fromtimestamp(end, UTC),
                step=f"{max(1, int(step))}s",
            )
            if result:
                return [(float(at), float(value)) for at, value in result[0]["values"]]
        return []
