"""Benchmarks: scripts that print JSON (`python -m troughfill_dev.bench.NAME`), not timed tests."""

import json
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from troughfill_dev.localcluster import free_port


def online_gpus_gauge() -> tuple[Gauge, str]:
    """An `online_gpus` gauge (at 0) served on loopback, as online serving would report it: the
    gauge and the host:port for Prometheus to scrape."""
    registry = CollectorRegistry()
    gauge = Gauge("online_gpus", "GPUs online serving holds", registry=registry)
    gauge.set(0)
    port = free_port()
    start_http_server(port, addr="127.0.0.1", registry=registry)
    return gauge, f"127.0.0.1:{port}"


def run_in_scratch(prefix: str, run: Callable[[Path], dict[str, Any]]) -> None:
    """Run a benchmark in a fresh directory and print its JSON; a failure keeps the directory
    (its logs) and says where. A SIGTERM stops everything it started, as Ctrl-C does."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        result = run(scratch)
    except BaseException:
        print(f"failed; logs kept in {scratch}", file=sys.stderr)
        raise
    shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(result, indent=2))
