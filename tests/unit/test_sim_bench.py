"""The simulator's benchmarks, short: the sweep and the trace matrix run end to end and report
what their docs say they report."""

import json
from pathlib import Path

import pytest

from troughfill_dev.bench import sim as bench


def test_the_sweep_reports_every_point_and_a_plot(tmp_path: Path) -> None:
    png = tmp_path / "tradeoff.png"
    report = bench.sweep(days=0.05, start_day=1.0, workers=1, plot_path=png)
    points = report["points"]
    assert [
        (p["policy"], p["headroom_gpus"], p["headroom_lend_gpus"]) for p in points
    ] == bench.sweep_points()
    for point in points:
        assert 0 < point["harvest_of_idle"] <= 1.0
        assert point["online_interference"] >= 0
    keep = {p["headroom_gpus"]: p for p in points if p["policy"] == "troughfill keep"}
    # a larger headroom never harvests more of what online leaves idle
    assert keep[0]["harvest_of_idle"] >= keep[4]["harvest_of_idle"]
    assert set(report["dominates_keda"]) == {f"keda headroom {h}" for h in range(5)}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(report)


def test_best_below_picks_the_best_harvest_at_no_more_interference() -> None:
    keda = {"policy": "keda-hpa", "harvest_of_idle": 0.9, "online_interference": 1e-4}
    ours = [
        {"policy": "troughfill keep", "headroom_gpus": 1, "headroom_lend_gpus": 0,
         "harvest_of_idle": 0.95, "online_interference": 2e-4},
        {"policy": "troughfill keep", "headroom_gpus": 2, "headroom_lend_gpus": 0,
         "harvest_of_idle": 0.92, "online_interference": 5e-5},
        {"policy": "troughfill lend", "headroom_gpus": 3, "headroom_lend_gpus": 1,
         "harvest_of_idle": 0.91, "online_interference": 4e-5},
    ]  # fmt: skip
    best = bench.best_below([keda, *ours], keda)
    assert best == {
        "policy": "troughfill keep",
        "headroom_gpus": 2,
        "headroom_lend_gpus": 0,
        "harvest_vs_keda": pytest.approx(0.92 / 0.9, abs=1e-4),
        "interference_vs_keda": 0.5,
    }
    assert bench.best_below([keda, ours[0]], keda) is None


def test_the_trace_matrix_covers_both_models_both_burst_profiles_and_two_seeds() -> None:
    scenarios = bench.trace_scenarios(days=0.05)
    assert len(scenarios) == 8
    assert {s.model for s in scenarios.values()} == {"language/m-small", "language/m-mid"}
    assert {s.burst_trace.name for s in scenarios.values() if s.burst_trace} == set(bench.BURSTS.values())
    name, result = bench.compare(("m-mid/code/seed11", scenarios["m-mid/code/seed11"]))
    assert name == "m-mid/code/seed11"
    assert set(result) >= {"troughfill", "keda-hpa", "capture_vs_keda", "interference_vs_keda"}
    assert 0 < result["troughfill"]["trough_capture"] <= 1.0


def test_the_cold_start_sweep_reports_the_bound_and_both_policies_per_cold_start() -> None:
    report = bench.cold_starts([0, 120], days=0.05, workers=1)
    zero, long = report["points"]
    assert (zero["cold_start_seconds"], long["cold_start_seconds"]) == (0, 120)
    # with no cold start the bound is the oracle itself; a long one can only lower it
    assert zero["cold_start_bound_trough_capture"] == 1.0
    assert long["cold_start_bound_trough_capture"] < 1.0
    for point in report["points"]:
        assert point["troughfill"]["trough_capture_vs_cold_start_bound"] <= 1.0
    assert report["longest_cold_start_whose_bound_allows_0.99"] == 0
    json.dumps(report)
