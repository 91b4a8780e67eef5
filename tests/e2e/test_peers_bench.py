"""The side-by-side benchmark's short run, in the test command: troughfill and a real KEDA
(built from its Go module, behind the aggregation layer) scaling the same worker on the same
online PromQL, two online rises each and five trace minutes replayed twelve times faster."""

from pathlib import Path

import pytest

from troughfill_dev.bench import peers


@pytest.mark.timeout(1200)
def test_troughfill_and_keda_measured_side_by_side(tmp_path: Path) -> None:
    result = peers.run(tmp_path, triggers=2, minutes=5, start_hour=18.5, speed=12, gpus=3, load_seconds=3.0)
    print(result)
    assert result["setup"]["segment"]["wall_seconds"] == 25
    for arm in peers.ARMS:
        triggers, replay = result[arm]["triggers"], result[arm]["replay"]
        assert triggers["n"] == 2
        freed = triggers["online_rise_to_batch_gpus_free_s"]
        assert freed["n"] == 2, (arm, freed)
        assert 0 < freed["max"] < peers.FREE_TIMEOUT, (arm, freed)
        assert triggers["fill_s"]["n"] == 2
        # Every stop, the operator's yield or the scheduler's preemption of KEDA's pod, is a
        # SIGTERM the worker answers by saving its requests' partial output: nothing wasted,
        # and the next worker resumes them.
        assert triggers["wasted_tokens"] == 0, (arm, triggers)
        assert triggers["requests_resumed_from_saved_partials"] > 0, (arm, triggers)
        assert replay["batch_held_gpu_seconds"] >= replay["batch_ready_gpu_seconds"] >= 0
        assert replay["online_displaced_gpu_seconds"] >= 0
    # troughfill's own verdict (its pool leaves batch no GPU) follows the metric within seconds
    # of every rise (a 1 s scrape, a 1 s reconcile); KEDA's default HPA behaviour keeps the
    # replicas for 300 s after its metric falls, so its Deployment is still scaled up when the
    # scheduler's preemption has freed the GPUs, and 20 s after.
    ours = result["troughfill"]["triggers"]
    assert ours["online_rise_to_scaler_stopped_batch_s"]["n"] == 2, ours
    assert ours["online_rise_to_scaler_stopped_batch_s"]["max"] < 15, ours
    keda = result["keda"]["triggers"]
    assert keda["scaler_had_not_stopped_batch_after_gpus_free"]["count"] == 2, keda
    assert result["keda_over_troughfill"]["online_rise_to_batch_gpus_free_median"] is not None
