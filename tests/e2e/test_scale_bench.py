"""The scale benchmark's short run, in the test command: a 20,000-request job end to end on a
local cluster of its own (operator, two worker pods with stand-in engines, Redis, merge),
checked exactly once, with the memory bounds the full million-request run is held to."""

from pathlib import Path

from troughfill_dev.bench import scale


def test_a_20000_request_job_runs_end_to_end_exactly_once_within_the_memory_bounds(tmp_path: Path) -> None:
    result = scale.run(tmp_path, requests=20_000, workers=2, max_tokens=4)
    assert result["exactly_once"] is True
    assert result["status_counts"] == {"completed": 20_000, "failed": 0, "resumed": 0, "total": 20_000}
    assert len(result["peak_rss_mb"]["workers"]) == 2  # both worker pods ran and were measured
    assert 0 < result["peak_rss_mb"]["operator"] < scale.GOALS["operator_peak_rss_mb"]
    bound = scale.GOALS["redis_bytes_per_request_after_finalize"]
    assert 0 < result["redis_bytes_per_request"]["job_keys_after_finalize"] < bound
    assert result["requests_per_s"]["end_to_end"] > 0
