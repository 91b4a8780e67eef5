"""A seasonal-naive forecast of online demand: the same time one period ago, scaled to today's level.

Online LLM traffic repeats daily; what happened at 07:10 yesterday is the best cheap guess for
07:10 today. The forecast never predicts less than the current level: it exists to stop
workers starting into a trough that is about to close, not to start them early.
"""

import bisect
from collections.abc import Sequence

from troughfill.planner.model import Forecast

DAY_SECONDS = 86_400.0
MAX_LEVEL_RATIO = 2.0


def value_at(
    history: Sequence[tuple[float, float]], times: Sequence[float], at: float, tolerance: float
) -> float | None:
    """The sample nearest `at` within `tolerance` seconds."""
    index = bisect.bisect_left(times, at)
    best: float | None = None
    best_distance = tolerance
    for candidate in (index - 1, index):
        if 0 <= candidate < len(times):
            distance = abs(times[candidate] - at)
            if distance <= best_distance:
                best, best_distance = history[candidate][1], distance
    return best


def seasonal_forecast(
    history: Sequence[tuple[float, float]],
    now: float,
    horizon: float,
    period: float = DAY_SECONDS,
    step: float = 60.0,
) -> Forecast | None:
    """Online GPUs over [now, now + horizon] from `history` ((time, GPUs), sorted by time).

    None when the history does not reach back one period (no forecast then: the planner
    assumes the present lasts)."""
    if not history:
        return None
    times = [at for at, _ in history]
    current = history[-1][1]
    tolerance = max(step, 1.0)
    then = value_at(history, times, now - period, tolerance)
    if then is None:
        return None
    ratio = current / then if then > 0 else 1.0
    ratio = min(MAX_LEVEL_RATIO, max(1.0 / MAX_LEVEL_RATIO, ratio))
    points: list[tuple[float, float]] = [(now, current)]
    offset = step
    while offset <= horizon + 1e-9:
        past = value_at(history, times, now + offset - period, tolerance)
        if past is not None:
            points.append((now + offset, max(current, past * ratio)))
        offset += step
    return Forecast(points=tuple(points))
