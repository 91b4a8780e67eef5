"""Typed settings come from TROUGHFILL_* environment variables and refuse nonsense."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from troughfill.config import Settings


def test_defaults_point_at_loopback() -> None:
    settings = Settings()
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.watch_namespaces == ()


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TROUGHFILL_REDIS_URL", "rediss://ledger:6380/1")
    monkeypatch.setenv("TROUGHFILL_REDIS_PASSWORD", "hunter2")
    monkeypatch.setenv("TROUGHFILL_WATCH_NAMESPACES", '["team-a", "team-b"]')
    monkeypatch.setenv("TROUGHFILL_RECONCILE_INTERVAL_SECONDS", "0.5")
    settings = Settings()
    assert settings.redis_url == "rediss://ledger:6380/1"
    assert settings.redis_password is not None
    assert settings.redis_password.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(settings)
    assert settings.watch_namespaces == ("team-a", "team-b")
    assert settings.reconcile_interval_seconds == 0.5


def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TROUGHFILL_METRICS_PORT", "70000")
    with pytest.raises(ValidationError, match="metrics_port"):
        Settings()


def test_every_setting_is_documented(repo_root: Path) -> None:
    documented = (repo_root / "docs" / "operator.md").read_text()
    missing = [name for name in Settings.model_fields if f"`TROUGHFILL_{name.upper()}`" not in documented]
    assert not missing, f"docs/operator.md's settings table lacks {missing}"
