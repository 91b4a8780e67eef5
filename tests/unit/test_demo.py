"""The demo's pieces that need no cluster: the adapted example objects and the online load."""

import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from troughfill.api import BatchInference, BatchPool, ModelTemplate, admit
from troughfill_dev import demo
from troughfill_dev.cli import main
from troughfill_dev.demo import (
    AFTERNOON_SHARE,
    NIGHT_SPAN,
    NODE_GPUS,
    ONLINE_METRIC,
    WORKER_GPUS,
    DemoOptions,
    OnlineLoad,
    StallClock,
    TraceClock,
    local_objects,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"


def test_the_example_adapted_to_this_machine_is_still_admitted(tmp_path: Path) -> None:
    options = DemoOptions(EXAMPLES, tmp_path, "/venv/bin/python", tmp_path / "model")
    pool_wire, template_wire, job_wire = local_objects(options, f"max({ONLINE_METRIC})")
    pool = BatchPool.model_validate(pool_wire)
    template = ModelTemplate.model_validate(template_wire)
    job = BatchInference.model_validate(job_wire)
    assert admit(job, template, pool).allowed
    assert pool.spec.online.gpus_in_use_query == f"max({ONLINE_METRIC})"
    assert template.spec.gpus_per_worker == WORKER_GPUS
    assert template.spec.model.uri == str(tmp_path / "model")
    assert job.spec.input_url == (tmp_path / "input" / "requests.jsonl").as_uri()
    assert (tmp_path / "input" / "requests.jsonl").read_bytes() == (EXAMPLES / "requests.jsonl").read_bytes()
    # What users may not choose stayed the admin's: the image and the allowlist.
    assert (
        template.spec.image
        == ModelTemplate.model_validate(
            __import__("yaml").safe_load((EXAMPLES / "template.yaml").read_text())
        ).spec.image
    )


def test_the_trace_clock_moves_with_progress_in_troughs_and_with_the_wall_in_the_evening() -> None:
    hour = 3600
    # 0-6h trough, 6-8h peak, 8-8.5h blip of room, 8.5-10h peak, 10-24h night trough.
    fits = [t < 6 * hour or 8 * hour <= t < 8.5 * hour or t >= 10 * hour for t in range(24 * hour)]
    clock = TraceClock(fits, start=1 * hour, speed=3600.0)  # a trace hour per wall second
    assert (clock.afternoon_end, clock.night_start) == (6 * hour, 10 * hour)  # the blip is no night
    clock.record(0, 0, now=0.0)
    assert clock.trace_seconds(100.0) == 1 * hour  # nothing done: held, however long it takes
    clock.record(20, 100, now=100.0)
    assert clock.trace_seconds(100.0) == 1 * hour + 5 * hour * 20 / (AFTERNOON_SHARE * 100)
    clock.record(int(AFTERNOON_SHARE * 100), 100, now=200.0)
    assert clock.phase == "evening"
    assert clock.trace_seconds(200.0) == 6 * hour  # the squeeze
    assert clock.trace_seconds(202.0) == 8 * hour  # now the wall clock
    clock.record(41, 100, now=205.0)
    assert clock.phase == "night"
    assert clock.trace_seconds(1000.0) == 10 * hour  # progress again: nothing more done
    clock.record(100, 100, now=1000.0)
    # The night runs on past midnight into the next day's 0-6h trough: 20 hours.
    assert clock.trace_seconds(1000.0) == 10 * hour + NIGHT_SPAN * 20 * hour  # done before the morning


def test_online_load_follows_its_clock_on_metrics() -> None:
    load = OnlineLoad(start_hour=14, seconds_per_hour=0.2, capacity=NODE_GPUS)  # an hour in 0.2 s
    try:
        held = load.value
        time.sleep(0.3)
        assert load.value == held  # nothing done: the afternoon holds
        assert len(load.history) == 1
        assert load.time_of_day() == "14:00"
        load.clock.record(100, 100, time.monotonic())  # the afternoon's share done: the evening plays
        seen = set()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(seen) < 2:
            seen.add(load.value)
            time.sleep(0.01)
        assert len(seen) >= 2, seen  # the evening moves online demand up
        assert max(seen) <= NODE_GPUS
        load.stopping.set()  # freeze it, then read what Prometheus would scrape
        load.thread.join(5)
        page = urllib.request.urlopen(f"http://127.0.0.1:{load.port}/metrics", timeout=5).read().decode()
        served = {
            sample.name: sample.value
            for family in text_string_to_metric_families(page)
            for sample in family.samples
        }
        assert served[ONLINE_METRIC] == load.value

    finally:
        load.stop()


def test_a_failure_is_one_line_saying_what_and_where_the_logs_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(self: demo.Demo) -> dict[str, object]:
        raise RuntimeError("kube-apiserver exited with 1:\nE1130 a long log tail\nmore")

    monkeypatch.setattr(demo.Demo, "run", broken)
    args = ["demo", "--workdir", str(tmp_path / "work"), "--vllm-python", "python", "--model", str(tmp_path)]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "troughfill-dev demo: failed: kube-apiserver exited with 1: "
        f"(logs of every process: {tmp_path / 'work'})"
    ]


def test_a_slow_job_is_not_a_stuck_one_and_no_worker_is_not_a_stall() -> None:
    clock = StallClock()
    assert clock.record((0, 0, 0, 0), True, 0.0) == 0
    assert clock.record((0, 0, 0, 0), True, 100.0) == 100  # a ready worker, nothing moves
    assert clock.record((0, 0, 0, 3), True, 101.0) == 0  # one generated token is progress
    assert clock.record((0, 0, 0, 3), False, 400.0) == 0  # no worker ready: the trace decides
    assert clock.record((0, 0, 0, 3), True, 401.0) == 1  # it counts again from there
    assert clock.record((0, 0, 0, 3), True, 701.0) == 301
    assert clock.record((1, 0, 12, 3), True, 702.0) == 0
