"""Shared by every tier.

Tiers (each folder's conftest says what in it is real):
- unit/: pure Python, no processes, no network.
- packaging/: the wheel pip builds from this checkout: what it holds and what it loads.
- manifests/: the generated CRDs and kustomize output, built with a real kubectl and
  checked against Kubernetes' published OpenAPI schemas and a real CEL interpreter.
- integration/: real redis-server and prometheus processes on loopback.
- engine/: a real vLLM engine (CPU build, tiny random-weight model).
- e2e/: a real Kubernetes control plane (or the cluster KUBECONFIG names).
"""

import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from redis.asyncio import Redis

from tests.reporting import REPORTED
from troughfill_dev.localcluster import RedisServer, VllmServer, start_redis, start_vllm

# Shared 2-core machines time out fast examples at random; a property failing is what matters.
settings.register_profile("default", deadline=None)
settings.load_profile("default")

REPO_ROOT = Path(__file__).resolve().parents[1]
ENDED = {"completed", "failed", "expired", "cancelled"}


def wait_for_job(
    read: Callable[[], dict[str, Any]], what: str, stall: float = 240.0, cap: float = 1800.0
) -> dict[str, Any]:
    """Poll a BatchInference (`read` returns it) until it has ended; return it.

    Fails when it has not moved for `stall` seconds (no request finished, no token generated,
    no worker became ready: give it a worker's cold start and more) or after `cap` seconds in
    all. A slow machine
    makes a job slow, not stuck: only a fixed deadline would fail it for that."""
    started = moved = time.monotonic()
    seen: tuple[int, ...] | None = None
    while True:
        job = read()
        status = job.get("status", {})
        if status.get("phase") in ENDED:
            return job
        counts, tokens = status.get("requestCounts", {}), status.get("tokens", {})
        progress = (
            counts.get("completed", 0),
            counts.get("failed", 0),
            tokens.get("completion", 0),
            status.get("workers", {}).get("ready", 0),
        )
        now = time.monotonic()
        if progress != seen:
            seen, moved = progress, now
        if now - moved > stall or now - started > cap:
            why = f"no progress for {now - moved:.0f}s" if now - moved > stall else f"{cap:.0f}s passed"
            raise AssertionError(f"{what} did not end ({why}): {json.dumps(status, indent=1)}")
        time.sleep(2.0)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server for the session (integration and engine tiers; started on first use)."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
async def aredis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client: Redis = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def _engine_paths() -> tuple[str, str]:
    python = os.environ.get("TROUGHFILL_VLLM_PYTHON")
    model = os.environ.get("TROUGHFILL_TINY_MODEL")
    if not python or not model or not Path(python).exists() or not Path(model).exists():
        pytest.fail("the engine and e2e tiers need scripts/setup_vllm.sh (scripts/test.sh runs it)")
    return python, model


@pytest.fixture(scope="session")
def engine_paths() -> tuple[str, str]:
    return _engine_paths()


@pytest.fixture(scope="session")
def vllm_engine(
    engine_paths: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmServer]:
    python, model = engine_paths
    # Dev mode: the window benchmark empties the prefix cache between windows (/reset_prefix_cache).
    server = start_vllm(python, model, tmp_path_factory.mktemp("vllm"), env={"VLLM_SERVER_DEV_MODE": "1"})
    yield server
    server.stop()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """What tests reported (tests.reporting): measured figures and real tools' answers."""
    if REPORTED:
        terminalreporter.section("reported by the tests")
        for line in REPORTED:
            terminalreporter.write_line(line)
