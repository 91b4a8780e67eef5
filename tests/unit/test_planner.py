"""The planner, case by case: one table row per rule, in the order the module docstring gives them."""

from dataclasses import replace

import pytest

from tests.plannertools import NOW, at, desired, job, online, pool, snapshot, stop_modes, workers
from troughfill.api import BatchPoolSpec
from troughfill.api.batchpool import StalePolicy
from troughfill.planner import (
    Forecast,
    Limit,
    PlannerMemory,
    PoolPolicy,
    Quota,
    SignalState,
    StopMode,
    WorkerState,
    plan,
    seasonal_forecast,
)
from troughfill.planner.fairshare import fill_levels


@pytest.mark.parametrize(
    ("capacity", "online_gpus", "pending", "pressure", "headroom", "trough"),
    [
        (16, 0, 0, False, 1, 15),
        (16, 4.2, 0, False, 1, 10),  # 4.2 GPUs in use occupy 5
        (16, 4, 3, False, 1, 8),  # pending online pods count as online
        (16, 4, 0, True, 1, 10),  # pressure leaves one more GPU free
        (16, 20, 0, False, 1, 0),  # online beyond capacity: no trough, never negative
        (8, 0, 0, False, 0, 8),
    ],
)
def test_trough_is_capacity_minus_online_minus_headroom(
    capacity: int, online_gpus: float, pending: float, pressure: bool, headroom: int, trough: int
) -> None:
    result = plan(
        snapshot(
            job(),
            pool_policy=pool(capacity, headroom_gpus=headroom),
            signal=online(online_gpus, pending_gpus=pending, pressure=pressure),
        )
    )
    assert result.trough_gpus == trough
    assert result.budget_gpus == trough
    assert desired(result) == {"team-a/job": trough}
    assert result.jobs["team-a/job"].starts == trough


def test_workers_respect_size_cap_and_remaining_requests() -> None:
    result = plan(
        snapshot(
            job("a/big", gpus_per_worker=4),
            job("a/capped", max_workers=2),
            job("a/almost-done", remaining=1),
            job("a/done", remaining=0, workers=workers(2)),
            pool_policy=pool(32, headroom_gpus=0),
        )
    )
    assert desired(result) == {"a/big": 7, "a/capped": 2, "a/almost-done": 1, "a/done": 0}
    assert {s.worker: s.mode for s in result.stops if s.job == "a/done"} == {
        "w0": StopMode.DRAIN,
        "w1": StopMode.DRAIN,
    }


def test_strict_priority_between_classes() -> None:
    result = plan(
        snapshot(
            job("a/low", priority=0, workers=workers(10)),
            job("b/high", priority=100),
            pool_policy=pool(11),
        )
    )
    assert desired(result) == {"b/high": 10, "a/low": 0}
    assert result.jobs["a/low"].limit is Limit.PRIORITY
    # Rebalancing between jobs is not urgent: the low job drains, the high one waits for its GPUs.
    assert set(stop_modes(result).values()) == {StopMode.DRAIN}
    assert result.jobs["b/high"].starts == 0
    assert result.jobs["b/high"].limit is Limit.WAITING_FOR_DRAIN


def test_weighted_fair_share_between_namespaces_and_equal_within() -> None:
    quotas = {"a": Quota(100, weight=3), "b": Quota(100, weight=1)}
    result = plan(
        snapshot(
            job("a/one"),
            job("a/two"),
            job("b/one"),
            pool_policy=pool(17, quotas=quotas),
        )
    )
    assert desired(result) == {"a/one": 6, "a/two": 6, "b/one": 4}
    assert result.jobs["b/one"].limit is Limit.FAIR_SHARE


def test_quota_is_never_exceeded_and_its_leftover_goes_to_others() -> None:
    quotas = {"a": Quota(3), "b": Quota(100)}
    result = plan(snapshot(job("a/x"), job("b/y"), pool_policy=pool(17, quotas=quotas)))
    assert desired(result) == {"a/x": 3, "b/y": 13}
    assert result.jobs["a/x"].limit is Limit.QUOTA


def test_namespaces_without_quota_get_nothing_without_a_default() -> None:
    result = plan(snapshot(job("stranger/x"), pool_policy=pool(8, default_quota=None)))
    assert desired(result) == {"stranger/x": 0}
    assert result.jobs["stranger/x"].limit is Limit.QUOTA


def test_whole_workers_never_split_and_leftovers_fill_smaller_jobs() -> None:
    result = plan(
        snapshot(job("a/four", gpus_per_worker=4), job("b/one"), pool_policy=pool(11, headroom_gpus=0))
    )
    assert desired(result)["a/four"] * 4 + desired(result)["b/one"] <= 11
    assert desired(result) == {"a/four": 1, "b/one": 7} or desired(result) == {"a/four": 2, "b/one": 3}


def test_min_workers_come_first_within_the_class() -> None:
    result = plan(snapshot(job("a/x"), job("b/y", min_workers=6), pool_policy=pool(9, headroom_gpus=1)))
    assert desired(result) == {"a/x": 2, "b/y": 6}


def test_deadline_at_risk_is_flagged_and_favoured() -> None:
    # Needs 100k tokens in ~1000 s at 20 tok/s per worker: 5 workers.
    urgent = job(
        "a/urgent",
        remaining_tokens=100_000,
        worker_tokens_per_second=20,
        deadline=NOW + 1060,
        cold_start_seconds=60,
        workers=workers(1),
    )
    relaxed = job("b/relaxed", remaining_tokens=1e6, worker_tokens_per_second=20, deadline=NOW + 1e7)
    result = plan(snapshot(urgent, relaxed, pool_policy=pool(7)))
    assert result.jobs["a/urgent"].at_risk
    assert not result.jobs["b/relaxed"].at_risk
    assert desired(result) == {"a/urgent": 5, "b/relaxed": 1}


def test_victims_are_the_cheapest_workers() -> None:
    running = (
        WorkerState("old-busy", started_at=NOW - 900, unsaved_tokens=500),
        WorkerState("old-idle", started_at=NOW - 900, unsaved_tokens=0),
        WorkerState("new-idle", started_at=NOW - 60, unsaved_tokens=0),
        WorkerState("cold", started_at=NOW - 5, ready=False),
    )
    result = plan(snapshot(job(workers=running), pool_policy=pool(2, headroom_gpus=0)))
    assert [s.worker for s in result.jobs["team-a/job"].stops] == ["cold", "new-idle"]


def test_online_rising_makes_workers_yield_lowest_priority_first() -> None:
    result = plan(
        snapshot(
            job("a/high", priority=10, max_workers=4, workers=workers(4, prefix="h")),
            job("b/low", priority=0, workers=workers(4, prefix="l")),
            pool_policy=pool(9),
            signal=online(3),
        )
    )
    # trough 5: the high job keeps 4, the low job keeps 1, three yield (not drain: online needs them)
    assert result.trough_gpus == 5
    assert desired(result) == {"a/high": 4, "b/low": 1}
    assert stop_modes(result) == {"l3": StopMode.YIELD, "l2": StopMode.YIELD, "l1": StopMode.YIELD}
    assert result.batch_gpus == 5


def test_unsaved_work_a_worker_reports_orders_only_its_own_jobs_workers() -> None:
    """Two jobs of one priority each have a worker draining, and online needs one more GPU: the
    most recently started yields, whatever either worker says it has unsaved (a tenant's workers
    report that themselves: claiming 10^12 tokens must not make another tenant's yield first)."""
    liar = job("a/liar", max_workers=4, workers=tuple(
        WorkerState(f"a{i}", started_at=NOW - 100 + i, unsaved_tokens=10**12,
                    stopping=StopMode.DRAIN if i == 3 else None)
        for i in range(4)
    ))  # fmt: skip
    honest = job("b/honest", max_workers=4, workers=tuple(
        WorkerState(f"b{i}", started_at=NOW - 900, stopping=StopMode.DRAIN if i == 3 else None)
        for i in range(4)
    ))  # fmt: skip
    result = plan(snapshot(liar, honest, pool_policy=pool(9), signal=online(1)))
    assert stop_modes(result) == {"a3": StopMode.YIELD}


def test_draining_workers_are_told_to_yield_when_online_needs_their_gpus() -> None:
    draining = (WorkerState("d0", started_at=0, stopping=StopMode.DRAIN),)
    running = workers(3)
    steady = plan(snapshot(job(workers=running + draining), pool_policy=pool(5)))
    assert steady.stops == ()  # 3 running + 1 draining fits a trough of 4
    squeezed = plan(snapshot(job(workers=running + draining), pool_policy=pool(5), signal=online(1)))
    assert stop_modes(squeezed) == {"d0": StopMode.YIELD}


def test_starts_wait_for_gpus_still_held_by_stopping_workers() -> None:
    yielding = tuple(WorkerState(f"y{i}", started_at=0, stopping=StopMode.YIELD) for i in range(3))
    result = plan(snapshot(job(workers=yielding), pool_policy=pool(6)))
    assert desired(result) == {"team-a/job": 5}
    assert result.jobs["team-a/job"].starts == 2


@pytest.mark.parametrize(
    ("age", "policy", "floor", "expected_state", "expected_batch"),
    [
        (10.0, StalePolicy.YIELD, 2, SignalState.FRESH, 12),
        (31.0, StalePolicy.YIELD, 2, SignalState.STALE, 2),
        (31.0, StalePolicy.YIELD, 0, SignalState.STALE, 0),
        (31.0, StalePolicy.HOLD, 0, SignalState.STALE, 6),
    ],
)
def test_stale_signal_yields_everything_beyond_the_floor(
    age: float, policy: StalePolicy, floor: int, expected_state: SignalState, expected_batch: int
) -> None:
    result = plan(
        snapshot(
            job(workers=workers(6)),
            pool_policy=pool(16, on_stale=policy, floor_gpus=floor, max_staleness_seconds=30),
            signal=online(3, age=age),
        )
    )
    assert result.signal is expected_state
    assert result.batch_gpus == expected_batch
    modes = set(stop_modes(result).values())
    assert modes <= {StopMode.YIELD}  # without a signal, online may need the GPUs now


def test_missing_signal_counts_as_stale() -> None:
    result = plan(snapshot(job(workers=workers(4)), signal=replace(online(), gpus_in_use=None)))
    assert result.signal is SignalState.MISSING
    assert result.batch_gpus == 0
    assert len(result.stops) == 4


def test_scale_up_waits_for_the_delay_and_scale_down_does_not() -> None:
    policy = pool(16, scale_up_delay_seconds=60)
    memory = PlannerMemory()
    held = workers(2)
    budgets = []
    for t in range(0, 121, 10):
        result = plan(at(snapshot(job(workers=held), pool_policy=policy), t), memory)
        memory = result.memory
        budgets.append(result.budget_gpus)
    # nothing beyond what is held until the signal has been fresh for 60 s, then all of it
    assert budgets[:6] == [2] * 6
    assert budgets[6:] == [15] * 7
    # online rises: the budget drops at once
    squeezed = plan(
        at(snapshot(job(workers=workers(15)), pool_policy=policy, signal=online(10)), 130), memory
    )
    assert squeezed.budget_gpus == 5
    assert squeezed.batch_gpus == 5
    # and falls again: growth waits for the window to forget the dip
    memory = squeezed.memory
    later = []
    for t in (140, 185, 191):
        result = plan(at(snapshot(job(workers=workers(5)), pool_policy=policy), t), memory)
        memory = result.memory
        later.append(result.budget_gpus)
    assert later == [5, 5, 15]


def test_no_worker_starts_into_a_trough_forecast_to_close_before_it_pays_off() -> None:
    policy = pool(16, min_useful_seconds=300)
    # online rises to 12 GPUs in 4 minutes: a worker (60 s cold start + 300 s useful) would not pay off
    closing = Forecast(points=((NOW, 2.0), (NOW + 240, 12.0)))
    result = plan(
        replace(snapshot(job(workers=workers(1)), pool_policy=policy, signal=online(2)), forecast=closing)
    )
    assert result.trough_gpus == 13
    assert result.jobs["team-a/job"].starts == 2  # 16 - 12 - 1 headroom = 3 held through the horizon
    assert result.jobs["team-a/job"].limit is Limit.TROUGH_TOO_SHORT
    # a rise beyond the horizon does not matter
    later = Forecast(points=((NOW, 2.0), (NOW + 3600, 12.0)))
    result = plan(
        replace(snapshot(job(workers=workers(1)), pool_policy=policy, signal=online(2)), forecast=later)
    )
    assert result.jobs["team-a/job"].starts == 12


def test_running_workers_keep_the_lent_headroom_and_none_starts_into_it() -> None:
    lending = pool(16, headroom_gpus=2, headroom_lend_gpus=1)
    # online 10: the trough is 16 - 10 - 2 = 4; a fifth worker may stay in the lent GPU
    kept = plan(snapshot(job(workers=workers(5)), pool_policy=lending, signal=online(10)))
    assert (kept.trough_gpus, kept.keep_gpus) == (4, 5)
    assert not kept.stops
    assert kept.batch_gpus == 5
    # a sixth would leave online less than headroom - lend free: it yields at once
    over = plan(snapshot(job(workers=workers(6)), pool_policy=lending, signal=online(10)))
    assert list(stop_modes(over).values()) == [StopMode.YIELD]
    # growth stops at the trough: nobody starts into the headroom
    growing = plan(snapshot(job(workers=workers(3)), pool_policy=lending, signal=online(10)))
    assert growing.jobs["team-a/job"].starts == 1
    # keep (lend 0): the fifth worker yields
    keeping = plan(
        snapshot(job(workers=workers(5)), pool_policy=pool(16, headroom_gpus=2), signal=online(10))
    )
    assert list(stop_modes(keeping).values()) == [StopMode.YIELD]


@pytest.mark.parametrize(
    "condition",
    ["pressure", "pending", "stale", "forecast rise"],
)
def test_nothing_is_lent_when_online_needs_or_is_about_to_need_the_headroom(condition: str) -> None:
    lending = pool(16, headroom_gpus=2, headroom_lend_gpus=1)
    signal = online(10)
    if condition == "pressure":
        signal = online(10, pressure=True)
    elif condition == "pending":
        signal = online(9, pending_gpus=1)
    elif condition == "stale":
        signal = online(10, age=3600)
    moment = snapshot(job(workers=workers(5)), pool_policy=lending, signal=signal)
    if condition == "forecast rise":
        moment = replace(moment, forecast=Forecast(points=((NOW, 10.0), (NOW + 200, 11.0))))
    result = plan(moment)
    assert result.keep_gpus == result.trough_gpus
    assert result.batch_gpus <= result.trough_gpus
    assert StopMode.YIELD in stop_modes(result).values()
    # a forecast that predicts no rise lends as before
    flat = plan(replace(moment, forecast=Forecast(points=((NOW, 10.0), (NOW + 200, 10.0)))))
    if condition == "forecast rise":
        assert flat.keep_gpus == 5
        assert not flat.stops


def test_the_plan_does_not_depend_on_the_order_of_jobs() -> None:
    jobs = [job(f"ns{i % 3}/j{i}", priority=i % 2, workers=workers(i % 4, prefix=f"j{i}-")) for i in range(9)]
    first = plan(snapshot(*jobs, pool_policy=pool(20)))
    second = plan(snapshot(*reversed(jobs), pool_policy=pool(20)))
    assert first == second


def test_pool_policy_from_the_batchpool_spec() -> None:
    spec = BatchPoolSpec.model_validate(
        {
            "gpus": {"count": 64},
            "online": {"gpusInUseQuery": "sum(x)"},
            "headroomGPUs": 2,
            "scaleUpDelay": "90s",
            "minUsefulTime": "10m",
            "signal": {"maxStaleness": "45s", "onStale": "Hold", "floorGPUs": 4},
            "quotas": [{"namespace": "a", "maxGPUs": 8, "weight": 3}],
        }
    )
    policy = PoolPolicy.from_spec(spec, capacity_gpus=64)
    assert policy.scale_up_delay_seconds == 90
    assert policy.min_useful_seconds == 600
    assert policy.max_staleness_seconds == 45
    assert policy.on_stale is StalePolicy.HOLD
    assert policy.quota("a") == Quota(8, 3)
    assert policy.quota("elsewhere") == Quota(0)


@pytest.mark.parametrize(
    ("floors", "caps", "weights", "budget", "shares"),
    [
        ([0, 0], [10, 10], [1, 1], 10, [5, 5]),
        ([0, 0], [10, 10], [3, 1], 8, [6, 2]),
        ([0, 0], [2, 10], [1, 1], 10, [2, 8]),
        ([4, 0], [10, 10], [1, 1], 6, [4, 2]),
        ([0, 0], [3, 4], [1, 1], 100, [3, 4]),
        ([5, 5], [10, 10], [1, 1], 4, [5, 5]),  # floors hold even past the budget
        ([], [], [], 5, []),
    ],
)
def test_fill_levels(
    floors: list[float], caps: list[float], weights: list[float], budget: float, shares: list[float]
) -> None:
    assert fill_levels(floors, caps, weights, budget) == pytest.approx(shares)


def test_seasonal_forecast_scales_yesterday_to_todays_level() -> None:
    day = 86_400.0
    history = [(t, 10.0 if (t % day) < 7 * 3600 else 30.0) for t in range(0, int(2 * day), 60)]
    now = day + 7 * 3600 - 600.0  # ten minutes before yesterday's ramp
    history = [(t, v) for t, v in history if t <= now]
    history[-1] = (now, 20.0)  # today runs at twice yesterday's trough
    forecast = seasonal_forecast(history, now=now, horizon=1200)
    assert forecast is not None
    assert forecast.peak(now, now + 240) == pytest.approx(20.0)
    # yesterday rose by 20 after this hour; today runs at twice yesterday's level: +40
    assert forecast.peak(now, now + 1200) == pytest.approx(60.0)
    assert seasonal_forecast(history[-100:], now=now, horizon=600) is None  # no day of history


def test_seasonal_forecast_ignores_yesterdays_minute_noise() -> None:
    day = 86_400.0
    noisy = [(float(t), 20.0 + (3.0 if (t // 60) % 2 else -3.0)) for t in range(0, int(day) + 3600, 60)]
    now = noisy[-1][0]
    forecast = seasonal_forecast(noisy, now=now, horizon=600)
    assert forecast is not None
    peak = forecast.peak(now, now + 600)
    assert peak is not None
    assert peak < noisy[-1][1] + 1.0
