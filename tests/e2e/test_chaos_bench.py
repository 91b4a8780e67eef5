"""The chaos soak's short run, in the test command: three minutes of jobs on real vLLM workers
while a worker, the operator, Redis, Prometheus and the API server are each killed at least
once and online traffic takes the GPUs; every job's results exactly once, no error line."""

from pathlib import Path

import pytest

from troughfill_dev.bench import chaos


@pytest.mark.timeout(900)
def test_jobs_survive_every_kind_of_kill_with_results_exactly_once_and_no_error_line(tmp_path: Path) -> None:
    result = chaos.run(tmp_path, minutes=3.0, seed=7, gap=12.0, requests=40)
    assert set(result["actions_survived"]) == set(chaos.ACTIONS), result["timeline"]
    assert result["jobs_completed"] >= 1
    assert result["exactly_once"] is True
    assert result["error_lines"] == 0
