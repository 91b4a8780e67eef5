"""The replay benchmark's short run, in the test command: half an hour of the simulator's online
demand, twelve times faster, on the local cluster (real operator, Prometheus, node agent,
stand-in engines) and in the simulator calibrated with the timings the operator measured."""

from pathlib import Path

import pytest

from troughfill_dev.bench import replay


@pytest.mark.timeout(600)
def test_the_cluster_and_the_simulator_replay_the_same_demand(tmp_path: Path) -> None:
    result = replay.run(
        tmp_path, gpus=6, start_hour=18.5, hours=0.5, speed=12, load_seconds=3.0, interval=1.0
    )
    segment, measured, simulated = result["segment"], result["measured"], result["simulated"]
    assert segment["wall_seconds"] == 150
    assert segment["trough_changes"] >= 1, segment  # online moves inside the segment
    assert measured["starts"] >= 1
    assert measured["cold_starts_measured"] >= 1
    assert measured["batch_held_gpu_seconds"] > measured["batch_ready_gpu_seconds"] > 0
    # The simulator ran with the cold start the operator measured (pod created -> Ready),
    # which includes the stand-in's 3 s load.
    cold = measured["timings"]["cold_start_mean_s"]
    assert cold >= 3
    assert simulated["timings"]["cold_start_s"] == round(cold)
    assert simulated["batch_held_gpu_seconds"] > 0
    assert measured["stops_for_online"] == measured["yields"] + measured["preemptions"]
    for key, value in result["simulated_over_measured"].items():
        assert value is None or value > 0, (key, value)
