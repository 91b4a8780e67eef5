"""Python's full garbage collections, kept out of the pool cycles.

CPython runs a full collection (generation 2) when enough objects have survived the younger
ones; it walks every tracked object the process holds and stops the event loop while it does.
With a thousand BatchInferences the operator holds a few hundred thousand (their watched
objects, their parsed models, Kopf's state of each), and a full collection took 0.3-0.4 s on
a shared 2-CPU machine, once a minute, inside whatever pool cycle allocated the object that
tipped it: the slow cycles of the many-jobs benchmark.

So the operator
- freezes what it loaded at startup (modules, Kopf, the API client's models: some 120,000
  objects that live as long as the process), so no collection walks it again;
- turns the automatic full collections off (the young generations still run as usual);
- runs a full collection itself, once every `interval` seconds, right after a pool cycle has
  ended (the next is seconds away) or, with no pool cycling, when the interval has passed
  again. Cyclic garbage is still freed, at most an interval late.
"""

import asyncio
import contextlib
import gc
import time
from collections.abc import Callable

NEVER = 1_000_000_000
"""A full-collection threshold (young collections in a row) no process reaches."""


class FullCollections:
    def __init__(self, interval: float, collected: Callable[[float], None] = lambda seconds: None) -> None:
        self.interval = interval
        self.collected = collected
        """Told how long each full collection took."""
        self._cycle_ended = asyncio.Event()
        self._startup = gc.get_threshold()

    def take_over(self) -> None:
        """Collect and freeze what is loaded now; from here on, full collections are this object's."""
        gc.collect()
        gc.freeze()
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, NEVER)

    def give_back(self) -> None:
        """Automatic full collections again (the frozen objects stay frozen)."""
        gc.set_threshold(*self._startup)

    def cycle_ended(self) -> None:
        self._cycle_ended.set()

    def collect(self) -> float:
        started = time.perf_counter()
        gc.collect()
        took = time.perf_counter() - started
        self.collected(took)
        return took

    async def run(self) -> None:
        """Every `interval`: wait for the end of a pool cycle (an interval at most), collect."""
        while True:
            await asyncio.sleep(self.interval)
            self._cycle_ended.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._cycle_ended.wait(), self.interval)
            self.collect()
