"""A template's cold start as measured, not as declared.

The planner starts a worker only where the trough outlasts the worker's cold start plus the
pool's minimum useful time, and counts the cold start out of the time left to a deadline. The
template's `coldStartSeconds` is the admin's guess; each worker the operator starts measures
the real one (pod created -> Ready: scheduling, image, engine load, warm-up). A guess too high
leaves short troughs unused, one too low starts workers that are yielded before they produce
anything. Once a template has `MIN_SAMPLES` measured starts, the estimate is a high quantile
of its last `WINDOW` (slow starts are the ones that cost a trough); until then the template's
own figure. Pure: the controller feeds it the starts it sees.
"""

import math
from collections import deque
from dataclasses import dataclass, field

WINDOW = 20
"""Measured starts kept per template: recent enough to follow a new image or node type."""
MIN_SAMPLES = 3
"""Measured starts before they replace the template's declared figure."""
QUANTILE = 0.9
SEEN_KEPT = 4096
"""Pods already counted (a pod is counted once however many cycles see it Ready)."""


@dataclass
class ColdStarts:
    samples: dict[str, deque[float]] = field(default_factory=dict)
    seen: dict[str, None] = field(default_factory=dict)
    """Pods counted, oldest first (a dict keeps insertion order)."""

    def observe(self, template: str, pod: str, seconds: float) -> bool:
        """Record one worker's start (pod created -> first seen Ready); False if that pod was
        already counted or the figure is not a start (negative: clocks apart)."""
        if pod in self.seen or seconds < 0:
            return False
        self.seen[pod] = None
        if len(self.seen) > SEEN_KEPT:
            del self.seen[next(iter(self.seen))]
        self.samples.setdefault(template, deque(maxlen=WINDOW)).append(seconds)
        return True

    def estimate(self, template: str, declared: float) -> float:
        """The cold start the planner should assume for this template's workers."""
        measured = self.samples.get(template)
        if measured is None or len(measured) < MIN_SAMPLES:
            return declared
        ordered = sorted(measured)
        return ordered[max(0, math.ceil(QUANTILE * len(ordered)) - 1)]  # nearest rank

    def count(self, template: str) -> int:
        return len(self.samples.get(template, ()))
