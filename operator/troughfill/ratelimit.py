"""Token buckets: how the ledger service limits each job's calls and the Batch API each caller's."""

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class TokenBucket:
    """`rate` calls a second on average, `burst` at once."""

    rate: float
    burst: float
    tokens: float
    at: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> "TokenBucket":
        return cls(rate, burst, burst, now)

    def take(self, now: float) -> float:
        """0 if a call may go now (and it is counted), else the seconds until one may."""
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class KeyedLimits:
    """A bucket per key (a job, a caller), for the `kept` most recent keys (the oldest go)."""

    def __init__(self, rate: float, burst: float, kept: int = 10_000) -> None:
        self.rate, self.burst, self.kept = rate, burst, kept
        self._buckets: OrderedDict[object, TokenBucket] = OrderedDict()

    def take(self, key: object, now: float) -> float:
        """0 if `key` may call now (counted), else the seconds until it may."""
        bucket = self._buckets.pop(key, None) or TokenBucket.full(self.rate, self.burst, now)
        self._buckets[key] = bucket
        while len(self._buckets) > self.kept:
            self._buckets.popitem(last=False)
        return bucket.take(now)
