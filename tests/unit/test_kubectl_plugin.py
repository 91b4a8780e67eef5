"""The kubectl plugin's views and tables: pure functions of the objects it reads."""

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.builders import batch_inference, pool, template, with_path
from troughfill.api.batchinference import BatchInference
from troughfill.api.batchpool import BatchPool
from troughfill.api.modeltemplate import ModelTemplate
from troughfill.kubectl import (
    build_parser,
    describe_text,
    describe_view,
    job_view,
    jobs_table,
    pool_view,
    pools_table,
)

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def running_job(name: str = "job", namespace: str = "team-a", **status: Any) -> BatchInference:
    wire = batch_inference(name, namespace, completionWindow="24h")
    wire["metadata"]["creationTimestamp"] = (NOW - timedelta(hours=2)).isoformat()
    wire["status"] = {
        "phase": "in_progress",
        "requestCounts": {"total": 1000, "completed": 240, "failed": 10},
        "workers": {"ready": 2, "desired": 3},
        "tokens": {"prompt": 50_000, "completion": 200_000, "wasted": 120},
        "gpuSeconds": 7200.0,
        "startedAt": (NOW - timedelta(hours=1)).isoformat(),
        **status,
    }
    return BatchInference.model_validate(wire)


def priced_pool(**spec: Any) -> BatchPool:
    return BatchPool.model_validate(with_path(pool(**spec), "spec.gpuHourlyCostUSD", "2.5"))


def test_a_job_shows_progress_cost_and_an_eta_at_its_rate_so_far() -> None:
    view = job_view(running_job(), priced_pool(), NOW)
    assert view["progressPercent"] == 25.0
    assert view["requests"] == {"total": 1000, "done": 250, "failed": 10}
    assert view["workers"] == {"ready": 2, "desired": 3}
    assert view["gpuHours"] == 2.0
    # 2 GPU-hours at $2.50 for 0.2M completion tokens
    assert view["usdPerMillionTokens"] == 25.0
    # 250 done in an hour: 750 more take three hours, inside the 22 hours the window has left
    assert view["etaSeconds"] == 3 * 3600
    assert view["windowLeftSeconds"] == 22 * 3600
    assert view["onTrack"] is True


def test_a_job_slower_than_its_window_is_shown_at_risk() -> None:
    job = running_job(startedAt=(NOW - timedelta(hours=20)).isoformat())
    view = job_view(job, priced_pool(), NOW)
    assert view["etaSeconds"] == 60 * 3600
    assert view["onTrack"] is False
    assert "(at risk)" in jobs_table([view], all_namespaces=False)


def test_a_job_not_started_or_without_a_priced_pool_has_no_eta_or_cost() -> None:
    fresh = BatchInference.model_validate(batch_inference())
    view = job_view(fresh, None, NOW)
    assert (view["phase"], view["etaSeconds"], view["usdPerMillionTokens"], view["onTrack"]) == (
        "pending",
        None,
        None,
        None,
    )
    assert job_view(running_job(), BatchPool.model_validate(pool()), NOW)["usdPerMillionTokens"] is None
    finished = running_job(finishedAt=NOW.isoformat(), phase="completed")
    assert job_view(finished, None, NOW)["etaSeconds"] == 0.0


def test_the_jobs_table_has_kubectls_shape() -> None:
    views = [job_view(running_job("b", "team-b"), None, NOW), job_view(running_job("a"), priced_pool(), NOW)]
    text = jobs_table(views, all_namespaces=True).splitlines()
    assert text[0].split()[:4] == ["NAMESPACE", "NAME", "PHASE", "PROGRESS"]
    assert text[1].split()[:5] == ["team-b", "b", "in_progress", "250/1000", "(25.0%)"]
    assert "25.0000" in text[2]  # $/1M
    assert text[1].split()[-1] == "22h"  # window left
    assert "NAMESPACE" not in jobs_table(views, all_namespaces=False)


def _templates() -> dict[str, ModelTemplate]:
    return {
        "tiny": ModelTemplate.model_validate(template("tiny", "gpus")),
        "big": ModelTemplate.model_validate(with_path(template("big", "gpus"), "spec.gpusPerWorker", 4)),
        "elsewhere": ModelTemplate.model_validate(template("elsewhere", "other")),
    }


def test_a_pool_shows_each_namespaces_share_against_its_quota() -> None:
    wire = pool(
        quotas=[
            {"namespace": "team-a", "maxGPUs": 8, "weight": 3, "storage": []},
            {"namespace": "idle", "maxGPUs": 2, "storage": []},
        ],
        defaultQuota={"maxGPUs": 1, "storage": []},
        headroomGPUs=2,
    )
    wire["status"] = {
        "capacityGPUs": 16, "onlineGPUs": 5, "troughGPUs": 9, "batchGPUs": 9, "activeJobs": 3,
        "lastSignalTime": (NOW - timedelta(seconds=4)).isoformat(),
        "conditions": [{"type": "SignalReady", "status": "True", "reason": "SignalFresh", "message": "fresh",
                        "lastTransitionTime": NOW.isoformat()}],
    }  # fmt: skip
    jobs = [
        running_job("a1"),  # tiny: 2 ready workers x 1 GPU
        with_template(running_job("a2"), "big"),  # 2 ready x 4 GPUs
        running_job("b1", "team-b"),  # default quota
        with_template(running_job("c1", "team-c"), "elsewhere"),  # another pool's
    ]  # fmt: skip
    view = pool_view(BatchPool.model_validate(wire), jobs, _templates(), NOW)
    assert (view["capacityGPUs"], view["onlineGPUs"], view["troughGPUs"], view["headroomGPUs"]) == (
        16,
        5,
        9,
        2,
    )
    assert view["signalAgeSeconds"] == 4.0
    assert view["signalReady"] is True
    shares = {s["namespace"]: s for s in view["namespaces"]}
    assert shares["team-a"] == {"namespace": "team-a", "jobs": 2, "batchGPUs": 10, "maxGPUs": 8, "weight": 3}
    assert shares["team-b"] == {"namespace": "team-b", "jobs": 1, "batchGPUs": 2, "maxGPUs": 1, "weight": 1}
    assert shares["idle"]["jobs"] == 0
    assert "team-c" not in shares
    text = pools_table([view])
    assert "4s (max 30s)" in text
    assert "QUOTA GPUS" in text


def with_template(job: BatchInference, name: str) -> BatchInference:
    wire = job.model_dump(by_alias=True, mode="json", exclude_none=True)
    wire["spec"]["templateRef"] = name
    return BatchInference.model_validate(wire)


def test_describe_keeps_only_the_pools_decisions_about_this_jobs_workers() -> None:
    job = running_job("classify")
    pool_events = [
        {"reason": "ScaleUp", "message": "starting classify-w-abc123; trough 2 GPUs", "lastTimestamp": "t1"},
        {"reason": "ScaleUp", "message": "starting other-w-def456; trough 2 GPUs", "lastTimestamp": "t2"},
        {
            "reason": "WorkerStopped",
            "message": "GPUs free after the decision to stop: team-a/classify-w-abc123 (yield) 1.84s",
            "lastTimestamp": "t3",
        },
        {"reason": "SignalStale", "message": "classify-w-abc123", "lastTimestamp": "t4"},
    ]
    view = describe_view(job, None, [], pool_events, NOW)
    assert [d["time"] for d in view["decisions"]] == ["t1", "t3"]
    assert [d["message"][-5:] for d in view["stoppedWorkers"]] == ["1.84s"]
    text = describe_text(view)
    assert "WorkerStopped" in text
    assert "Events:\n  <none>" in text


def test_what_a_tenant_wrote_reaches_the_terminal_as_text_never_as_control_sequences() -> None:
    """A condition message, an Event and a URL carrying an escape sequence (clear the screen,
    retitle the window), a carriage return that would overwrite the line, and a right-to-left
    override: describe and get print each as visible escapes."""
    hostile = "done\x1b[2J\x1b]0;owned\x07\rFAKE \u202etxt.exe"
    job = running_job(
        "classify",
        outputURL="s3://bucket/out\x1b[31m/output.jsonl",
        conditions=[
            {"type": "Failed", "status": "True", "reason": "InputChanged", "message": hostile,
             "lastTransitionTime": NOW.isoformat()},
        ],
    )  # fmt: skip
    events = [{"type": "Warning", "reason": "X", "message": hostile, "count": 1, "lastTimestamp": "t"}]
    text = describe_text(describe_view(job, None, events, [], NOW))
    table_text = jobs_table([job_view(job, None, NOW)], all_namespaces=True)
    for shown in (text, table_text):
        assert not any(c in shown for c in "\x1b\x07\r\u202e")
    assert "done\\x1b[2J\\x1b]0;owned\\x07\\rFAKE \\u202etxt.exe" in text
    assert "out\\x1b[31m" in text


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["get", "-A", "-o", "json"], "get"),
        (["describe", "job", "-n", "team-a"], "describe"),
        (["pool"], "pool"),
        (["resume", "job"], "resume"),
        (["results", "job", "--dir", "/tmp/x"], "results"),
    ],
)
def test_the_command_line_parses(argv: list[str], command: str) -> None:
    assert build_parser().parse_args(argv).command == command
