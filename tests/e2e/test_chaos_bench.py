"""The chaos soak's short run, in the test command: three minutes of jobs on real vLLM workers
while a worker, the operator, Redis, Prometheus and the API server are each killed at least
once, the object store freezes and online traffic takes the GPUs; every job's results
exactly once, no error line."""

from pathlib import Path

import pytest

from troughfill_dev.bench import chaos


@pytest.mark.timeout(900)
def test_jobs_survive_every_kind_of_kill_with_results_exactly_once_and_no_error_line(tmp_path: Path) -> None:
    # The store's outage is 20 s here (60 s in the soak), so that a round of every kind fits.
    result = chaos.run(tmp_path, minutes=3.0, seed=7, gap=12.0, requests=40, store_outage=20.0)
    assert set(result["actions_survived"]) == set(chaos.ACTIONS), result["timeline"]
    assert result["jobs_completed"] >= 1
    assert result["exactly_once"] is True
    assert result["error_lines"] == 0
