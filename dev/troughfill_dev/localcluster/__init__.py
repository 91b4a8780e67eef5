"""Local stand-ins for a cluster's services, for tests and the demo: real binaries on loopback.

Nothing here is simulated: `redis-server` and `prometheus` are the Debian packages that
scripts/setup.sh installs, the S3 server is moto's server mode speaking the S3 protocol
over HTTP, vLLM is the real engine (CPU build) in its own virtual environment; each starts
on a free 127.0.0.1 port in a scratch directory.
"""

from troughfill_dev.localcluster.services import (
    LedgerServer,
    ManagedProcess,
    PrometheusServer,
    RedisServer,
    S3Server,
    VllmServer,
    free_port,
    split_cpus,
    start_ledger,
    start_prometheus,
    start_redis,
    start_s3,
    start_vllm,
    vllm_command,
)

__all__ = [
    "LedgerServer",
    "ManagedProcess",
    "PrometheusServer",
    "RedisServer",
    "S3Server",
    "VllmServer",
    "free_port",
    "split_cpus",
    "start_ledger",
    "start_prometheus",
    "start_redis",
    "start_s3",
    "start_vllm",
    "vllm_command",
]
