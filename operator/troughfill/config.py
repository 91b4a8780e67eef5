"""Typed operator and worker settings, read from TROUGHFILL_* environment variables."""

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from troughfill import constants


class Settings(BaseSettings):
    """Process-wide settings; everything per job or per pool lives in the custom resources instead."""

    model_config = SettingsConfigDict(env_prefix="TROUGHFILL_", extra="ignore", frozen=True)

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Ledger Redis; rediss:// enables TLS."""
    redis_username: str | None = None
    """The Redis user (a worker's: its job's own, from the job's Secret); the default user when unset."""
    redis_password: SecretStr | None = None
    """Overrides any password in redis_url, so the URL can live in a ConfigMap and this in a Secret."""
    redis_tls_ca_file: str | None = None
    """CA certificate (PEM file) that signed the ledger Redis's TLS certificate (rediss://)."""
    redis_tls_ca_pem: str | None = None
    """The same CA as PEM text (worker pods get it so; the operator reads its file and passes it on)."""
    ledger_url: str | None = None
    """The ledger service (workers: the operator sets it; unset, a worker uses Redis directly
    with the redis_* settings, as on a developer's machine)."""
    ledger_token: SecretStr | None = None
    """A worker's job token for the ledger service (from its job's Secret)."""
    ledger_ca_file: str | None = None
    """CA certificate (PEM file) of the ledger service's TLS certificate (https:// URLs)."""
    worker_ledger_url: str = f"http://{constants.LEDGER_SERVICE_NAME}.{constants.OPERATOR_NAMESPACE}.svc:{constants.LEDGER_SERVICE_PORT}"
    """The operator: the ledger service's URL as worker pods reach it (they get it with their job's token)."""
    ledger_port: int = Field(default=constants.LEDGER_SERVICE_PORT, ge=1, le=65535)
    """`troughfill ledger`: where the ledger service listens (its /metrics and /healthz too)."""
    ledger_calls_per_second: float = Field(default=2000.0, gt=0)
    """Each job's ledger calls a second over all its workers, per service replica (429 past it)."""
    ledger_burst: float = Field(default=4000.0, ge=1)
    s3_endpoint_url: str | None = None
    """S3-protocol endpoint for s3:// URLs (MinIO, Ceph, ...); AWS when unset. Credentials come
    from the usual AWS_* variables or the pod's identity."""
    s3_addressing_style: Literal["auto", "path", "virtual"] = "auto"
    """`path` for stores that serve buckets as paths, not as host names (most in-cluster ones)."""
    prometheus_url: str = "http://127.0.0.1:9090"
    """Default Prometheus for pools that name none."""
    prometheus_timeout_seconds: float = Field(default=5.0, gt=0)
    namespace: str = constants.OPERATOR_NAMESPACE
    """Where the operator itself runs (events about cluster-scoped objects go here)."""
    watch_namespaces: tuple[str, ...] = ()
    """Namespaces whose BatchInferences are served; empty means the whole cluster."""
    reconcile_interval_seconds: float = Field(default=2.0, gt=0)
    watch_cache: bool = True
    """Pool cycles read jobs, templates, pools, worker and online pods, nodes and priority
    classes from watches (informers) instead of listing them each cycle."""
    finished_job_retention_seconds: float = Field(default=86_400.0, gt=0)
    """How long an ended job's ledger keys stay in Redis (its status keeps the counts; deleting
    the custom resource removes them at once)."""
    worker_command: tuple[str, ...] = ("troughfill",)
    """How worker pods invoke troughfill in the template's image (JSON list in the environment)."""
    metrics_port: int = Field(default=9090, ge=0, le=65535)
    """0: no metrics endpoint."""
    health_port: int = Field(default=8080, ge=0, le=65535)
    """0: no liveness endpoint."""
    api_port: int = Field(default=8000, ge=1, le=65535)
    """`troughfill api`: where the OpenAI Batch API listens (its /metrics and probes too)."""
    api_max_file_bytes: int = Field(default=200 * 1024 * 1024, gt=0)
    """Largest upload the Batch API takes (OpenAI's limit: 200 MB)."""
    api_calls_per_second: float = Field(default=20.0, gt=0)
    """`troughfill api`: each caller's calls a second (by its username; 429 with retry-after past it)."""
    api_burst: float = Field(default=100.0, ge=1)
    """`troughfill api`: how many calls a caller may make at once above that rate."""
    api_max_concurrent_uploads: int = Field(default=4, gt=0)
    """Uploads `troughfill api` takes at once (each may spool up to api_max_file_bytes to its
    scratch volume); more get 429 with retry-after."""
    api_max_file_lines: int = Field(default=50_000, gt=0)
    """Most requests one uploaded file may hold (OpenAI's limit: 50,000)."""
