"""A template's cold start as its workers measured it (planner/coldstart.py)."""

from troughfill.planner import ColdStarts
from troughfill.planner.coldstart import MIN_SAMPLES, SEEN_KEPT, WINDOW


def test_the_declared_figure_until_enough_starts_then_their_90th_percentile() -> None:
    starts = ColdStarts()
    for k in range(MIN_SAMPLES - 1):
        assert starts.observe("t", f"ns/p{k}", 30.0)
        assert starts.estimate("t", 120.0) == 120.0
    assert starts.observe("t", "ns/slow", 95.0)
    assert starts.estimate("t", 120.0) == 95.0  # three: the nearest rank of 0.9 is the slowest
    for k in range(10):
        starts.observe("t", f"ns/q{k}", 20.0 + k)
    # 13 starts: 30, 30, 95 and 20..29; the 12th of 13 in order is 30
    assert starts.estimate("t", 120.0) == 30.0
    assert starts.estimate("other", 60.0) == 60.0  # per template


def test_a_pod_counts_once_and_old_starts_age_out() -> None:
    starts = ColdStarts()
    assert starts.observe("t", "ns/a", 500.0)
    assert not starts.observe("t", "ns/a", 500.0)  # seen again next cycle
    assert not starts.observe("t", "ns/skewed", -3.0)  # Ready before created: clocks apart
    for k in range(WINDOW):
        starts.observe("t", f"ns/new{k}", 40.0)
    assert starts.count("t") == WINDOW
    assert starts.estimate("t", 120.0) == 40.0  # the 500 s start fell out of the window
    for k in range(SEEN_KEPT + 10):
        starts.observe("u", f"ns/many{k}", 1.0)
    assert len(starts.seen) == SEEN_KEPT
