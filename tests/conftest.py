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

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from redis.asyncio import Redis

from troughfill_dev.localcluster import RedisServer, VllmServer, start_redis, start_vllm

# Shared 2-core machines time out fast examples at random; a property failing is what matters.
settings.register_profile("default", deadline=None)
settings.load_profile("default")

REPO_ROOT = Path(__file__).resolve().parents[1]


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
