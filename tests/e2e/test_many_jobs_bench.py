"""The many-BatchInferences benchmark's short run, in the test command: 100 jobs in 10
namespaces on one pool (stand-in workers), on a control plane of its own. With the watch cache
(as shipped) a steady pool cycle lists nothing; restarted without it, the same operator lists
every job and worker pod each cycle. Cycles stay within the goal."""

from pathlib import Path

from troughfill_dev.bench import many_jobs


def test_a_steady_pool_cycle_lists_nothing_with_the_watch_cache_and_stays_fast(tmp_path: Path) -> None:
    result = many_jobs.run(tmp_path, jobs=100, namespaces=10, gpus=4, window=12.0)
    cached, listed = result["watch_cache"], result["list_each_cycle"]
    assert result["worker_pods"] == 4
    assert cached["cycle"]["cycles"] >= 4
    assert cached["cycle"]["p99_at_most_s"] <= many_jobs.GOAL_CYCLE_P99_SECONDS
    calls = cached["by_verb_and_resource_per_s"]
    assert calls.get("LIST batchinferences", 0) < 0.1, cached
    assert calls.get("LIST pods", 0) < 0.1, cached
    # The measurement can tell: without the cache every cycle lists the jobs and the worker pods.
    assert listed["by_verb_and_resource_per_s"]["LIST batchinferences"] >= 0.3, listed
    assert listed["by_verb_and_resource_per_s"]["LIST pods"] >= 0.3, listed
