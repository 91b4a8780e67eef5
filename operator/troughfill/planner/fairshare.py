"""Weighted max-min fair shares, continuous and then in whole workers."""

from collections.abc import Sequence


def fill_levels(
    floors: Sequence[float], caps: Sequence[float], weights: Sequence[float], budget: float
) -> list[float]:
    """Shares s_i = clamp(level * w_i, floor_i, cap_i) with the highest level whose total fits `budget`.

    Floors are already promised (they are always met, even past the budget); caps are what an
    entity can use. Weighted max-min fairness: nobody below its cap could gain without taking
    from someone whose share per weight is no larger. O(n log n): one sweep over breakpoints.
    """
    count = len(floors)
    shares = [min(max(f, 0.0), c) for f, c in zip(floors, caps, strict=True)]
    total = sum(shares)
    if total >= budget or count == 0:
        return shares
    # total(level) is piecewise linear in level, breakpoints where an entity leaves its floor or hits its cap
    events: list[tuple[float, int, int]] = []  # (level, +1 starts growing / -1 stops, index)
    for i in range(count):
        weight = weights[i]
        if shares[i] >= caps[i] or weight <= 0:
            continue
        events.append((shares[i] / weight, 1, i))
        events.append((caps[i] / weight, -1, i))
    events.sort()
    slope = 0.0  # sum of weights of the entities growing with the level
    level = 0.0
    growing: set[int] = set()
    for at, kind, i in events:
        if slope > 0 and total + slope * (at - level) >= budget:
            break
        total += slope * (at - level)
        level = at
        if kind == 1:
            slope += weights[i]
            growing.add(i)
        else:
            slope -= weights[i]
            growing.discard(i)
            shares[i] = caps[i]
    else:
        return shares  # every entity reached its cap within the budget
    if slope > 0:
        level += (budget - total) / slope
    for i in growing:
        shares[i] = min(caps[i], max(shares[i], level * weights[i]))
    return shares
