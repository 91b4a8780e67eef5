"""How many requests to keep in the engine: enough to saturate it, never an unbounded queue.

Pure: the worker feeds it the engine's own gauges (`vllm:num_requests_running`,
`vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`) and gets the next limit.
Additive increase while the engine has room and nothing waits; multiplicative decrease
when requests queue up behind a full batch or the KV cache is nearly full.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineLoad:
    running: float
    waiting: float
    kv_cache_usage: float
    """Fraction of KV-cache blocks in use, 0..1."""


@dataclass(frozen=True)
class ConcurrencyPolicy:
    minimum: int = 1
    maximum: int = 256
    step: int = 4
    backoff: float = 0.75
    kv_high: float = 0.95
    """KV-cache use above which no more requests are added (preemption would follow)."""
    queue_slack: int = 2
    """Waiting requests tolerated: a short queue keeps the next batch slot filled."""


def next_limit(current: int, load: EngineLoad, in_flight: int, policy: ConcurrencyPolicy) -> int:
    """The in-flight limit for the next interval."""
    if load.waiting > policy.queue_slack or load.kv_cache_usage > policy.kv_high:
        proposed = int(current * policy.backoff)
    elif load.waiting == 0 and in_flight >= current:
        # Everything we sent is running and the engine asks for more: grow.
        proposed = current + policy.step
    else:
        proposed = current
    return max(policy.minimum, min(policy.maximum, proposed))
