"""The Grafana dashboard's queries against a real Prometheus scraping a live operator: every
panel's every query, with its variables filled in, answers, is not empty, and says what the
cluster did (the pool's GPUs, a yield and its latency, the job's progress, tokens and cost).

One node of 3 GPUs, the stand-in engine (each answer after 2 s), online
serving as the gauge the pool reads and as pods: batch fills the node, online's demand rises to
all of it (the workers yield) and its pods take it, online leaves and batch fills it again; then
the queries run."""

import json
import math
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT
from troughfill import constants
from troughfill.kube.podstate import is_ready
from troughfill_dev.bench.onlinereplay import StandinJob, StandinStack, bound_pods
from troughfill_dev.localcluster import free_port
from troughfill_dev.localcluster.services import wait_until

DASHBOARD = REPO_ROOT / "manifests" / "monitoring" / "dashboards" / "troughfill.json"
GPUS = 3
POOL = "dash"
VARIABLES = {"$pool": POOL, "$namespace": "default", "$__rate_interval": "5m"}
WORKERS = f"{constants.LABEL_COMPONENT}={constants.COMPONENT_WORKER}"


def queries() -> dict[str, str]:
    """ "panel title: legend" -> PromQL with the dashboard's variables filled in, for every target."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"{panel['title']}: a variable the test does not fill: {expr}"
            found[f"{panel['title']}: {target['legendFormat']}"] = expr
    return found


def instant(prometheus: str, expr: str) -> list[dict[str, Any]]:
    url = f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    answer = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert answer["status"] == "success", (expr, answer)
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def values(prometheus: str, expr: str) -> list[float]:
    return [float(series["value"][1]) for series in instant(prometheus, expr)]


@pytest.mark.timeout(600)
def test_every_dashboard_query_answers_with_what_the_cluster_did(tmp_path: Path) -> None:
    spec = StandinJob(
        job="dash", pool=POOL, template="standin", requests=20_000, max_tokens=16,
        engine_args=["--delay-seconds", "2"], load_seconds=2.0,
        scale_up_delay=0, drain_grace=5,
    )  # fmt: skip
    stack = StandinStack(tmp_path, GPUS, spec, online_gpus=0, metrics_port=free_port())
    try:
        stack.start()
        stack.objects.patch_cluster_custom_object(
            constants.API_GROUP,
            constants.API_VERSION,
            "batchpools",
            POOL,
            {"spec": {"gpuHourlyCostUSD": "2.5"}},
        )

        def ready_workers() -> int:
            return sum(
                1
                for p in bound_pods(stack.core, WORKERS)
                if is_ready(p) and not p.metadata.deletion_timestamp
            )

        wait_until(lambda: ready_workers() == GPUS, 180, "batch on every GPU", 0.5)
        time.sleep(10)  # work done, tokens counted
        # Online's demand rises to the whole node (what the pool's query reads) before its pods
        # come, so the workers yield for it rather than being preempted by the scheduler.
        stack.online.gauge.set(GPUS)
        wait_until(lambda: not bound_pods(stack.core, WORKERS), 60, "the workers gone", 0.25)
        stack.online.set(GPUS)
        wait_until(lambda: stack.online_running() == GPUS, 120, "online on every GPU", 0.25)
        stack.online.set(0)
        wait_until(lambda: stack.online_running() == 0, 60, "online gone", 0.25)
        wait_until(lambda: ready_workers() == GPUS, 180, "batch back on every GPU", 0.5)
        prometheus = stack.prometheus.url
        # the operator's cycle after the refill, scraped
        wait_until(
            lambda: values(prometheus, f'troughfill_pool_ready_batch_gpus{{pool="{POOL}"}}') == [GPUS],
            30, "the ready GPUs scraped", 0.5,
        )  # fmt: skip

        answers: dict[str, list[dict[str, Any]]] = {}
        for panel, expr in queries().items():
            got = instant(prometheus, expr)
            assert got, f"{panel}: no series for {expr}"
            assert all(math.isfinite(float(s["value"][1])) for s in got), f"{panel}: {expr} = {got}"
            answers[panel] = got
            for series in got:  # shown with pytest -s (docs/observability.md quotes a run)
                print(f"{panel} | {series['metric']} | {float(series['value'][1]):.4g}")

        def value(panel: str, **labels: str) -> float:
            (match,) = [s for s in answers[panel] if labels.items() <= s["metric"].items()]
            return float(match["value"][1])

        gpus = "GPUs: capacity, online, trough, batch: {{pool}} "
        assert value(gpus + "capacity") == GPUS
        assert value(gpus + "online") == 0
        assert value(gpus + "trough (batch may hold)") == GPUS
        assert value(gpus + "batch ready") == GPUS
        assert value("Trough captured: {{pool}}") == 1.0  # every trough GPU harvested
        per_minute = "Starts, drains and yields per minute: {{pool}} {{action}}"
        assert value(per_minute, action="start") > 0
        assert value(per_minute, action="yield") > 0
        latency = "Yield latency (decision to GPUs free): {{pool}} "
        assert 0 < value(latency + "p50") <= value(latency + "p99") < 30  # seconds
        age = "Online demand signal age: {{pool}} "
        assert value(age + "age") < value(age + "limit (maxStaleness)") == 10
        assert value("Planning cycle p99: {{pool}}") > 0
        job = "{{namespace}}/{{batchinference}}"
        assert 0 < value(f"Progress: {job}", batchinference="dash") < 100
        assert value(f"Completion tokens per second: {job}") > 0
        assert value(f"GPUs held by ready workers: {job}") == GPUS
        assert value(f"Realised $ per 1M completion tokens: {job}") > 0
        risk = "At risk of missing the window / workers crash-looping: "
        assert value(f"{risk}{job} at risk") == value(f"{risk}{job} crash loop") == 0
    finally:
        stack.stop()
