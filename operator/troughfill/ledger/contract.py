"""The worker-operator contract, carried by the ledger: how a worker is told to stop, and the
heartbeat it writes. The operator (controller.pools) writes stop modes and reads heartbeats; the
worker (worker.runner) reads stop modes and writes heartbeats; the probe (`troughfill worker
check`) reads heartbeats. Each side goes through these types, never through raw keys or dicts.
"""

from pydantic import BaseModel, ConfigDict

from troughfill.planner import StopMode

__all__ = ["Heartbeat", "StopMode"]


class Heartbeat(BaseModel):
    """What a worker says about itself every lease/3 seconds (the key expires after 3 beats)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    pid: int
    at: float
    """When it was written (the worker's clock, seconds since the epoch)."""
    in_flight: int = 0
    unsaved_tokens: int = 0
    """Tokens generated and not yet checkpointed: what a yield now would lose."""
    limit: int = 0
    """The worker's in-flight bound right now."""
    engine_pid: int | None = None
    engine_url: str | None = None
    engine_alive: bool = True
    results: int = 0
    """Results the worker has committed so far."""
