"""The operator's full garbage collections: off the automatic schedule, run after pool cycles."""

import asyncio
import gc
from collections.abc import Iterator

import pytest

from troughfill.collection import FullCollections


@pytest.fixture
def generations() -> Iterator[list[int]]:
    """The generation of every collection the interpreter runs while the test does."""
    seen: list[int] = []

    def note(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(note)
    yield seen
    gc.callbacks.remove(note)
    gc.unfreeze()


def survivors(count: int) -> list[list[int]]:
    """Many small containers that stay alive: what makes the interpreter collect in full."""
    return [[k] for k in range(count)]


def test_the_interpreter_collects_in_full_on_its_own_until_the_operator_takes_over(
    generations: list[int],
) -> None:
    kept = survivors(1_000_000)
    assert 2 in generations  # the automatic schedule, as a process without the operator's has it
    collections = FullCollections(interval=60)
    collections.take_over()
    try:
        assert gc.get_freeze_count() >= len(kept)  # what was alive is out of the collector's sight
        generations.clear()
        more = survivors(1_000_000)
        assert generations  # the young generations still run
        assert 2 not in generations, generations
    finally:
        collections.give_back()
    assert gc.get_threshold()[2] < 1_000
    del kept, more


async def test_a_full_collection_follows_the_end_of_a_pool_cycle_once_an_interval() -> None:
    took: list[float] = []
    collections = FullCollections(interval=0.5, collected=took.append)
    runner = asyncio.create_task(collections.run())
    try:
        await asyncio.sleep(0.7)  # the interval passed: it waits for a cycle to end
        assert took == []
        collections.cycle_ended()
        await asyncio.sleep(0.05)
        assert len(took) == 1  # at once
        assert took[0] >= 0
        await asyncio.sleep(1.25)  # no cycle ends: it collects anyway, an interval late (at 1.7 s)
        assert len(took) == 2
    finally:
        runner.cancel()
