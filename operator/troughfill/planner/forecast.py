"""A seasonal-naive forecast of online demand: the same time one period ago, scaled to today's level.

Online LLM traffic repeats daily; how demand moved after 07:10 yesterday is the best cheap
guess for how it moves after 07:10 today. The planner only uses the forecast's peak over a
horizon that starts now (never below the current level): it exists to stop workers starting
into a trough that is about to close, not to start them early.
"""

import bisect
from collections.abc import Sequence

from troughfill.planner.model import Forecast

DAY_SECONDS = 86_400.0
MAX_LEVEL_RATIO = 2.0


def level_at(times: Sequence[float], prefix: Sequence[float], at: float, half_width: float) -> float | None:
    """Mean of the samples within `half_width` of `at` (prefix: running sums of the values)."""
    low = bisect.bisect_left(times, at - half_width)
    high = bisect.bisect_right(times, at + half_width)
    if high <= low:
        return None
    return (prefix[high] - prefix[low]) / (high - low)


def seasonal_forecast(
    history: Sequence[tuple[float, float]],
    now: float,
    horizon: float,
    *,
    period: float = DAY_SECONDS,
    step: float = 60.0,
    smoothing: float = 600.0,
) -> Forecast | None:
    """Online GPUs over [now, now + horizon] from `history` ((time, GPUs), sorted by time).

    The shape comes from one period ago, smoothed over `smoothing` seconds (yesterday's
    minute-to-minute noise says nothing about today's), as a change from yesterday's level at
    this hour, scaled to today's level. None when the history does not reach back one period
    (no forecast then: the planner assumes the present lasts)."""
    if not history:
        return None
    times = [at for at, _ in history]
    prefix = [0.0]
    for _, value in history:
        prefix.append(prefix[-1] + value)
    current = history[-1][1]
    half = max(smoothing, step) / 2
    then = level_at(times, prefix, now - period, half)
    if then is None:
        return None
    ratio = current / then if then > 0 else 1.0
    ratio = min(MAX_LEVEL_RATIO, max(1.0 / MAX_LEVEL_RATIO, ratio))
    points: list[tuple[float, float]] = [(now, current)]
    offset = step
    while offset <= horizon + 1e-9:
        past = level_at(times, prefix, now + offset - period, half)
        if past is not None:
            points.append((now + offset, max(0.0, current + (past - then) * ratio)))
        offset += step
    return Forecast(points=tuple(points))
