"""Local stand-ins for a cluster's services, for tests and the demo: real binaries on loopback.

Nothing here is simulated: `redis-server` and `prometheus` are the Debian packages that
scripts/setup.sh installs, started on free 127.0.0.1 ports in a scratch directory.
"""

from troughfill.devenv.services import (
    ManagedProcess,
    PrometheusServer,
    RedisServer,
    free_port,
    start_prometheus,
    start_redis,
)

__all__ = [
    "ManagedProcess",
    "PrometheusServer",
    "RedisServer",
    "free_port",
    "start_prometheus",
    "start_redis",
]
