"""The simulator: trace handling, cluster mechanics on hand-made demand, and short scenarios.
The planner inside it is the real one."""

import itertools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from troughfill.cli import main as cli_main
from troughfill.planner import StopMode
from troughfill.sim import Scenario, plot, run
from troughfill.sim.fleet import QUEUE, Actions, Cluster, ClusterParams, ClusterView, SimJob
from troughfill.sim.policies import KedaPolicy, TroughfillPolicy, pool_policy
from troughfill.sim.scenario import cold_start_bound, run_oracle, trough_gpus
from troughfill.sim.trace import load_burst_profile, load_rate_trace, online_demand, sliding_max

PARAMS = ClusterParams(
    capacity_gpus=16,
    headroom_gpus=1,
    tokens_per_gpu_second=100.0,
    cold_start_seconds=30,
    yield_seconds=2,
    drain_seconds=10,
    preemption_seconds=1,
    scrape_interval_seconds=5,
    in_flight_per_worker=10,
    checkpoint_tokens=20,
    mean_output_tokens=200,
)


def write_trace(path: Path, rates: list[float], model: str = "m") -> Path:
    lines = ["ts,rate_rps,active_clients,model"] + [f"{i * 600},{r},3,{model}" for i, r in enumerate(rates)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_zero_windows_are_gaps_and_get_interpolated(tmp_path: Path) -> None:
    trace = load_rate_trace(write_trace(tmp_path / "t.csv", [10, 0, 0, 40, 50]))
    assert trace.window_seconds == 600
    assert trace.gaps == 2
    assert trace.rates.tolist() == [10, 20, 30, 40, 50]


def test_a_model_is_chosen_from_a_mixed_file(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("ts,rate_rps,active_clients,model\n0,5,1,a\n0,7,1,b\n600,6,1,a\n600,8,1,b\n")
    assert load_rate_trace(path, "b").rates.tolist() == [7, 8]
    with pytest.raises(ValueError, match="fewer than two"):
        load_rate_trace(path, "c")


@given(st.lists(st.integers(-50, 50), min_size=1, max_size=60), st.integers(1, 12))
def test_sliding_max_matches_the_definition(values: list[int], width: int) -> None:
    array = np.array(values, dtype=np.int64)
    expected = [max(values[max(0, i - width + 1) : i + 1]) for i in range(len(values))]
    assert sliding_max(array, width).tolist() == expected


def test_online_demand_in_gpus_follows_the_rate_and_holds_peaks(tmp_path: Path) -> None:
    trace = load_rate_trace(write_trace(tmp_path / "t.csv", [100, 100, 400, 400, 100, 100]))
    demand = online_demand(
        trace, None, per_gpu_rps=10, target_peak_gpus=0, days=None, seed=1, online_scale_down_seconds=300
    )
    assert len(demand.gpus) == 3600
    assert demand.gpus[0] == 10
    assert demand.gpus[2 * 600 + 300] == 40  # centre of a 400 rps window
    # releases lag the rate by the online autoscaler's 300 s stabilisation
    falling = int(np.argmax(demand.rps[1800:] < 390)) + 1800
    assert demand.gpus[falling + 100] == 40
    assert demand.gpus[falling + 400] < 40


def test_burstiness_keeps_each_windows_mean_rate(tmp_path: Path) -> None:
    profile = load_burst_profile(Path(str(Scenario().burst_trace)), smooth_seconds=60)
    assert profile.mean() == pytest.approx(1.0)
    assert profile.min() > 0.3
    assert profile.max() < 2.5
    trace = load_rate_trace(write_trace(tmp_path / "t.csv", [100] * 8))
    demand = online_demand(trace, profile, per_gpu_rps=None, target_peak_gpus=20, days=None, seed=3)
    assert demand.rps[:4800].mean() == pytest.approx(100, rel=0.01)
    assert demand.rps.std() > 5  # bursty, not flat
    assert int(np.quantile(np.ceil(demand.rps / demand.per_gpu_rps), 0.999)) == 20


@dataclass
class Fixed:
    """Keeps `count` queue workers; yields everything when told to."""

    count: int
    interval_seconds: int = 1
    name: str = "fixed"
    resumes_partials: bool = False
    stop_at: int | None = None
    mode: StopMode = StopMode.YIELD
    seen: list[ClusterView] = field(default_factory=list)

    def decide(self, view: ClusterView) -> Actions:
        self.seen.append(view)
        live = [w for w in view.workers if w.stopping is None]
        if self.stop_at is not None and view.now >= self.stop_at:
            return Actions(stops=[(w.name, self.mode) for w in live])
        return Actions(starts={QUEUE: self.count - len(live)} if len(live) < self.count else {})


def test_cold_start_then_production() -> None:
    cluster = Cluster(PARAMS, [0] * 100, [SimJob("a/j", "a", 0, tokens=1e12)], Fixed(4))
    totals = cluster.run()
    # started at t=0, placed at t=1 (the next scheduling pass), productive from t=31 on
    assert totals.batch_held_gpu_seconds == 4 * 99
    assert totals.batch_productive_gpu_seconds == 4 * 69
    assert totals.tokens_generated == 4 * 69 * 100


def test_online_rising_preempts_batch_and_counts_displaced_gpu_time() -> None:
    demand = [2] * 100 + [14] * 100
    policy = Fixed(12)
    totals = Cluster(PARAMS, demand, [SimJob("a/j", "a", 0, tokens=1e12)], policy).run()
    # at t=100 online needs 14 of 16 GPUs, batch holds 12: 10 are preempted and free after
    # preemption (1 s) + stop (2 s); online waits for them meanwhile
    assert totals.preemptions == 10
    assert totals.online_displaced_gpu_seconds == 10 * 3
    # the policy restarts workers that cannot be placed while online holds the GPUs
    assert max(len(v.workers) for v in policy.seen[-10:]) <= 12
    assert totals.wasted_tokens == 10 * PARAMS.in_flight_per_worker * PARAMS.mean_output_tokens / 2


def test_drain_loses_nothing_yield_loses_in_flight_work() -> None:
    for mode, waste in ((StopMode.DRAIN, 0.0), (StopMode.YIELD, 4 * 10 * 100.0)):
        totals = Cluster(
            PARAMS, [0] * 100, [SimJob("a/j", "a", 0, tokens=1e12)], Fixed(4, stop_at=50, mode=mode)
        ).run()
        assert totals.wasted_tokens == waste
        held_after = 10 if mode is StopMode.DRAIN else 2
        assert totals.batch_held_gpu_seconds == 4 * (49 + held_after)  # placed at t=1


def test_a_finished_job_releases_its_workers() -> None:
    job = SimJob("a/j", "a", 0, tokens=4 * 100 * 10)  # ten seconds of four workers
    totals = Cluster(PARAMS, [0] * 100, [job], Fixed(4)).run()
    assert job.finished_at == 31 + 9
    assert totals.tokens_generated == job.tokens


def test_troughfill_yields_before_kubernetes_has_to_preempt_and_keda_does_not() -> None:
    # online rises slowly from 2 to 12 GPUs over 400 s, stays, then falls back
    demand = [2] * 600 + [2 + (10 * i) // 400 for i in range(400)] + [12] * 600 + [2] * 1200
    jobs = [SimJob("research/j", "research", 0, tokens=1e15)]
    troughfill = TroughfillPolicy(
        PARAMS, pool_policy(PARAMS, scale_up_delay=30, min_useful=0, weights={"research": 1})
    )
    ours = Cluster(PARAMS, demand, jobs, troughfill).run()
    theirs = Cluster(
        PARAMS, demand, [SimJob("research/j", "research", 0, tokens=1e15)], KedaPolicy(PARAMS)
    ).run()
    oracle = run_oracle(Scenario(params=PARAMS), demand).totals
    assert ours.preemptions < theirs.preemptions
    assert ours.online_displaced_gpu_seconds < theirs.online_displaced_gpu_seconds
    assert ours.wasted_tokens < theirs.wasted_tokens
    assert ours.batch_in_trough_gpu_seconds > 0.85 * oracle.batch_in_trough_gpu_seconds
    assert ours.headroom_intrusion_gpu_seconds < theirs.headroom_intrusion_gpu_seconds


def test_short_scenario_report_and_plot(tmp_path: Path) -> None:
    scenario = replace(Scenario(), days=0.5, start_day=2.25, policies=("troughfill", "keda-hpa", "static"))
    report, series = run(scenario)
    policies = report["policies"]
    assert set(policies) == {"oracle", "troughfill", "keda-hpa", "static"}
    assert policies["oracle"]["trough_capture"] == 1.0
    for name in ("troughfill", "keda-hpa", "static"):
        assert 0 <= policies[name]["trough_capture"] <= 1.0
    assert policies["troughfill"]["trough_capture"] > policies["static"]["trough_capture"]
    assert policies["troughfill"]["online_interference"] < 0.002
    assert (
        policies["troughfill"]["pool_usd_per_million_tokens"]
        < report["scenario"]["online_only_pool_usd_per_million_tokens"]
    )
    assert len(series["online_gpus"]) == len(series["batch_gpus"]["troughfill"]) == 72
    png = tmp_path / "sim.png"
    plot(series, png, "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_command_writes_json_and_plot(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "trace.csv", [300, 100, 50, 50, 100, 300], model="x")
    out, png = tmp_path / "report.json", tmp_path / "plot.png"
    code = cli_main(
        ["simulate", "--trace", str(trace), "--model", "x", "--no-burst", "--days", "1", "--capacity", "16",
         "--per-gpu-rps", "25", "--policies", "troughfill,static", "--output", str(out), "--plot", str(png)]
    )  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert report["scenario"]["simulated_hours"] == 1.0
    assert set(report["policies"]) == {"oracle", "troughfill", "static"}
    assert png.stat().st_size > 1000


def test_the_cold_start_bound_counts_each_level_of_the_trough_less_one_cold_start_per_stretch() -> None:
    params = ClusterParams(capacity_gpus=4, headroom_gpus=1, cold_start_seconds=3)
    demand = [0] * 10 + [2] * 5 + [0] * 10  # trough 3 GPUs, then 1, then 3
    # level 1: one stretch of 25 s (22 productive); levels 2 and 3: two of 10 s each (7 + 7)
    assert cold_start_bound(demand, params) == 22 + 14 + 14
    assert (
        cold_start_bound(demand, replace(params, cold_start_seconds=0)) == trough_gpus(demand, params).sum()
    )
    assert cold_start_bound([9] * 5, params) == 0  # online beyond capacity: no trough at all


def _productive_in_trough(trough: list[int], cold: int, choices: list[int]) -> int:
    """A policy that stays in the trough: each second it stops workers until it fits (which ones
    `choices` decides), then starts up to `choices` new ones into what is free."""
    alive: list[int] = []  # start times
    productive = 0
    picks = itertools.cycle(choices)
    for now, room in enumerate(trough):
        while len(alive) > room:
            alive.pop(next(picks) % len(alive))
        alive.extend([now] * min(room - len(alive), next(picks) % 3))
        productive += sum(1 for started in alive if now - started >= cold)
    return productive


@given(
    trough=st.lists(st.integers(0, 4), min_size=1, max_size=60),
    cold=st.integers(0, 8),
    choices=st.lists(st.integers(0, 7), min_size=1, max_size=10),
)
def test_no_policy_that_stays_in_the_trough_beats_the_cold_start_bound(
    trough: list[int], cold: int, choices: list[int]
) -> None:
    params = ClusterParams(capacity_gpus=4, headroom_gpus=0, cold_start_seconds=cold)
    demand = [4 - t for t in trough]
    bound = cold_start_bound(demand, params)
    assert _productive_in_trough(trough, cold, choices) <= bound
    # and it is reached: start into every free GPU at once, stop the youngest first
    alive: list[int] = []
    reached = 0
    for now, room in enumerate(trough):
        del alive[room:]
        alive.extend([now] * (room - len(alive)))
        reached += sum(1 for started in alive if now - started >= cold)
    assert reached == bound
