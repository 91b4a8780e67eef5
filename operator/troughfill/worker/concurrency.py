"""How many requests to keep in the engine: enough to saturate it, never an unbounded queue,
and few enough that requests turn into results within a short trough.

Pure: the worker feeds it the engine's own gauges (`vllm:num_requests_running`,
`vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`), its measured pace (tokens generated
per second, mean completion length), and gets the next limit.

- Growth by half while the engine has room and nothing waits; multiplicative decrease when
  requests queue up behind a full batch or the KV cache is nearly full.
- A time-to-result bound (Little's law): with C requests in flight, an engine generating T
  tokens/s and requests of L completion tokens on average, a request takes about C·L/T to come
  back. A worker yielded before its requests come back commits nothing of them, so C is kept at
  T·target/L. Only requests that a yield would lose count for L: the long ones are streamed and
  checkpointed every second (a yield costs them a second, whenever it comes), so a job of long
  generations is not bounded at all. Off by default (`result_seconds = 0`): on an engine whose
  step time hardly grows with the batch, throughput grows with the requests in flight, so T
  measured at a small C is small and T·target/L keeps C small: a feedback loop that held a CPU
  engine at four requests in flight and a fraction of its throughput (docs/worker.md). It is
  for engines past their throughput knee (a GPU at its largest batches), where it costs
  nothing but the wait it removes.
"""

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineLoad:
    running: float
    waiting: float
    kv_cache_usage: float
    """Fraction of KV-cache blocks in use, 0..1."""
    generated_tokens: float | None = None
    """The engine's counter of tokens generated since it started (None: it has none)."""


@dataclass(frozen=True)
class Pace:
    """What the worker measured: its engine's throughput and its requests' length."""

    tokens_per_second: float
    """Tokens generated per second lately (smoothed)."""
    completion_tokens: float
    """Mean completion tokens of the requests a yield would lose (of their recent results;
    before any, their budgets); 0 when none is in flight."""
    stalled: bool = False
    """The engine generated nothing since the last reading (a long prefill step, or no rate
    yet): nothing to judge the limit by, so it holds."""

    def seconds_to_result(self, in_flight: int) -> float:
        return in_flight * self.completion_tokens / self.tokens_per_second


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
    result_seconds: float = 0.0
    """Target time from a request's start to its result; 0 (the default) turns the bound off."""


def result_bound(pace: Pace | None, policy: ConcurrencyPolicy) -> int | None:
    """The most requests in flight that come back within the target, or None (no bound)."""
    if pace is None or pace.stalled or policy.result_seconds <= 0:
        return None
    if pace.tokens_per_second <= 0 or pace.completion_tokens <= 0:
        return None
    return max(
        policy.minimum, math.ceil(pace.tokens_per_second * policy.result_seconds / pace.completion_tokens)
    )


def next_limit(
    current: int, load: EngineLoad, in_flight: int, policy: ConcurrencyPolicy, pace: Pace | None = None
) -> int:
    """The in-flight limit for the next interval."""
    bound = result_bound(pace, policy)
    if load.waiting > policy.queue_slack or load.kv_cache_usage > policy.kv_high:
        proposed = int(current * policy.backoff)
    elif pace is not None and pace.stalled:
        proposed = current
    elif bound is not None and current > bound:
        proposed = max(bound, int(current * policy.backoff))
    elif load.waiting == 0 and in_flight >= current:
        # Everything we sent is running and the engine asks for more: grow, by half at a time
        # (from a small start, a GPU's batch of hundreds is seconds away).
        grown = current + max(policy.step, current // 2)
        proposed = grown if bound is None else min(bound, grown)
    else:
        proposed = current
    return max(policy.minimum, min(policy.maximum, proposed))


class PaceMeter:
    """Smooths what the worker sees into a `Pace`: the engine's generated-tokens counter read
    at each tuning tick, and the completion tokens of each result a yield would have lost."""

    SMOOTHING = 0.3
    """Weight of the newest throughput reading (ticks are a second apart)."""
    LENGTH_SMOOTHING = 0.05
    """Weight of the newest result in the mean completion length."""

    def __init__(self) -> None:
        self.tokens_per_second = 0.0
        self.completion_tokens: float | None = None
        self.counted = False
        """The engine has a generated-tokens counter (a stand-in engine may not)."""
        self.moved = False
        """The counter moved in the last interval."""
        self._last: tuple[float, float] | None = None

    def observe(self, generated_tokens: float | None, now: float) -> None:
        if generated_tokens is None:
            return
        self.counted = True
        last, self._last = self._last, (generated_tokens, now)
        if last is None or now <= last[1] or generated_tokens < last[0]:
            self.moved = False  # the first reading, or an engine that restarted: no rate yet
            return
        rate = (generated_tokens - last[0]) / (now - last[1])
        self.moved = rate > 0
        if self.tokens_per_second == 0:
            self.tokens_per_second = rate
        else:
            self.tokens_per_second += self.SMOOTHING * (rate - self.tokens_per_second)

    def result(self, completion_tokens: int) -> None:
        if self.completion_tokens is None:
            self.completion_tokens = float(completion_tokens)
        else:
            self.completion_tokens += self.LENGTH_SMOOTHING * (completion_tokens - self.completion_tokens)

    def pace(self, budgets: list[int]) -> Pace | None:
        """None for an engine without the counter (the limit follows its gauges alone).
        `budgets`: the token budgets of the requests in flight that a yield would lose; they
        stand for the length until the first results, and none means nothing to bound."""
        if not self.counted:
            return None
        length = 0.0
        if budgets:
            length = (
                self.completion_tokens if self.completion_tokens is not None else sum(budgets) / len(budgets)
            )
        stalled = not self.moved or self.tokens_per_second <= 0
        return Pace(self.tokens_per_second, length, stalled=stalled)
