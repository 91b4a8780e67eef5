"""The demo's pieces that need no cluster: the adapted example objects and the online load."""

import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from troughfill.api import BatchInference, BatchPool, ModelTemplate, admit
from troughfill.demo import NODE_GPUS, ONLINE_METRIC, WORKER_GPUS, DemoOptions, OnlineLoad, local_objects

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


def test_online_load_holds_until_started_then_follows_the_trace_on_metrics() -> None:
    load = OnlineLoad(start_hour=14, seconds_per_hour=0.01, capacity=NODE_GPUS)  # a day in 0.24 s
    try:
        held = load.value
        time.sleep(0.3)
        assert load.value == held  # not started: held
        assert len(load.history) == 1
        assert load.clock() == "14:00"
        load.start_clock()
        seen = set()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(seen) < 3:
            seen.add(load.value)
            time.sleep(0.01)
        assert len(seen) >= 3, seen  # a day of the trace moves online demand through several levels
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
