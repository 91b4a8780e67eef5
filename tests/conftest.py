"""Shared by every tier.

Tiers (each folder's conftest says what in it is real):
- unit/: pure Python, no processes, no network.
- manifests/: the generated CRDs and kustomize output, built with a real kubectl and
  checked against Kubernetes' published OpenAPI schemas and a real CEL interpreter.
- integration/: real redis-server and prometheus processes on loopback.
"""

from pathlib import Path

import pytest
from hypothesis import settings

# Shared 2-core machines time out fast examples at random; a property failing is what matters.
settings.register_profile("default", deadline=None)
settings.load_profile("default")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT
