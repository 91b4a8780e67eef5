"""`kubectl troughfill` on the local cluster, found by kubectl on PATH as users' plugins are.

A pool of two GPUs with a price, a namespace quota, a job whose workers (run by the operator
through the node agent) answer with the stand-in engine: the plugin's tables and JSON follow
the job through running, suspended (the pool's WorkerStopped Event with the seconds to free
GPUs), resumed and completed; `results` downloads what it wrote, `cancel` ends another job
with its partial output kept, and errors are one line with exit status 1.
"""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from kopf.testing import KopfRunner

from tests.e2e.conftest import Kube, kubectl, until
from tests.e2e.test_operator import FILES, apply, get_job, instant_pool_and_template, live_pods, submit
from tests.reporting import report

ANSWER_SECONDS = 20
"""The stand-in answers each request after this long: the job has a ready worker for a while."""


def plugin(kube: Kube, *args: str) -> subprocess.CompletedProcess[str]:
    """`kubectl ...` as a user with troughfill installed runs it: kubectl-troughfill on PATH."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "KUBECONFIG": str(kube.kubeconfig),
    }
    return subprocess.run(
        [kube.kubectl(), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ok(kube: Kube, *args: str) -> str:
    done = plugin(kube, "troughfill", *args)
    assert done.returncode == 0, done.stderr
    report(f"\n$ kubectl troughfill {' '.join(args)}\n{done.stdout}")
    return done.stdout


def as_json(kube: Kube, *args: str) -> Any:
    return json.loads(ok(kube, *args, "-o", "json"))


def priced_pool_with_standin(kube: Kube, namespace: str) -> str:
    """A 2-GPU pool at $2.50 a GPU-hour with a quota for `namespace` (weight 3), and a template
    whose workers' engine is the stand-in; returns their suffix."""
    suffix = uuid.uuid4().hex[:6]
    pool, template = instant_pool_and_template(suffix, "")
    pool["spec"].update(
        gpuHourlyCostUSD="2.5",
        quotas=[{"namespace": namespace, "maxGPUs": 2, "weight": 3, "storage": FILES}],
    )
    template["spec"]["engine"] = {
        "command": [sys.executable, "-m", "troughfill_dev.standin"],
        "args": ["--delay-seconds", str(ANSWER_SECONDS)],
    }
    apply(kube, pool, template)
    return suffix


def test_kubectl_troughfill_follows_steers_and_downloads_a_job(
    kube: Kube, namespace: str, operator: KopfRunner, gpu_node: tuple[str, int], tmp_path: Path
) -> None:
    if not kube.local:
        pytest.skip("the workers run through the node agent")
    listed = plugin(kube, "plugin", "list")
    assert "kubectl-troughfill" in listed.stdout, listed.stdout + listed.stderr

    suffix = priced_pool_with_standin(kube, namespace)
    submit(kube, namespace, "tickets", f"tiny-{suffix}", tmp_path, 30)

    def ready_workers() -> int:
        return int(get_job(kube, namespace, "tickets").get("status", {}).get("workers", {}).get("ready", 0))

    until(lambda: ready_workers() >= 1, 90, "a ready worker")

    table = ok(kube, "get", "-n", namespace).splitlines()
    assert table[0].split()[:4] == ["NAME", "PHASE", "PROGRESS", "WORKERS"]
    assert table[1].split()[:2] == ["tickets", "in_progress"]
    view = as_json(kube, "get", "tickets", "-n", namespace)
    assert (view["name"], view["pool"], view["requests"]["total"]) == ("tickets", f"pool-{suffix}", 30)
    assert view["workers"]["ready"] >= 1
    assert view["windowLeftSeconds"] > 23 * 3600
    assert any(v["name"] == "tickets" for v in as_json(kube, "get", "-A"))

    shown = as_json(kube, "pool", f"pool-{suffix}")
    assert (shown["capacityGPUs"], shown["headroomGPUs"]) == (2, 0)
    assert shown["signalAgeSeconds"] is not None
    assert shown["signalAgeSeconds"] <= shown["signalMaxStalenessSeconds"]
    share = next(s for s in shown["namespaces"] if s["namespace"] == namespace)
    assert (share["jobs"], share["maxGPUs"], share["weight"]) == (1, 2, 3)
    assert share["batchGPUs"] >= 1
    assert f"pool-{suffix}" in ok(kube, "pool")

    ok(kube, "suspend", "tickets", "-n", namespace)
    assert get_job(kube, namespace, "tickets")["spec"]["suspend"] is True
    until(lambda: not live_pods(kube, namespace), 60, "the workers stopped")

    def stopped() -> list[dict[str, Any]]:
        return list(as_json(kube, "describe", "tickets", "-n", namespace)["stoppedWorkers"])

    freed = until(stopped, 30, "the pool's WorkerStopped Event about the job's workers")
    assert "GPUs free after the decision to stop" in freed[0]["message"]
    described = ok(kube, "describe", "tickets", "-n", namespace)
    assert "Suspended" in described  # the Running condition's reason
    assert "ScaleUp" in described

    ok(kube, "resume", "tickets", "-n", namespace)
    assert get_job(kube, namespace, "tickets")["spec"]["suspend"] is False
    until(
        lambda: get_job(kube, namespace, "tickets").get("status", {}).get("phase") == "completed", 180, "done"
    )
    done = as_json(kube, "get", "tickets", "-n", namespace)
    assert (done["progressPercent"], done["etaSeconds"]) == (100.0, 0.0)
    assert done["gpuHours"] > 0
    assert done["usdPerMillionTokens"] is not None
    assert done["usdPerMillionTokens"] > 0
    ok(kube, "get", "-n", namespace)

    downloaded = as_json(kube, "results", "tickets", "-n", namespace, "--dir", str(tmp_path / "download"))
    lines = (tmp_path / "download" / "output.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["custom_id"] for line in lines) == sorted(f"ticket-{i}" for i in range(30))
    assert downloaded["output.jsonl"]["bytes"] == (tmp_path / "download" / "output.jsonl").stat().st_size


def test_kubectl_troughfill_cancels_keeping_the_job_then_deletes_it(
    kube: Kube, namespace: str, operator: KopfRunner, gpu_node: tuple[str, int], tmp_path: Path
) -> None:
    if not kube.local:
        pytest.skip("the workers run through the node agent")
    suffix = priced_pool_with_standin(kube, namespace)
    submit(kube, namespace, "doomed", f"tiny-{suffix}", tmp_path, 5)
    until(lambda: get_job(kube, namespace, "doomed").get("status", {}).get("phase"), 30, "doomed admitted")
    early = plugin(kube, "troughfill", "results", "doomed", "-n", namespace)
    assert early.returncode == 1
    assert "has no merged output yet" in early.stderr, early.stderr

    ok(kube, "cancel", "doomed", "-n", namespace)
    refused = kubectl(
        kube, "patch", "batchinferences.troughfill.io/doomed", "-n", namespace,
        "--type=merge", "-p", '{"spec": {"cancel": false}}',
    )  # fmt: skip
    assert refused.returncode != 0
    assert "cancel cannot be undone" in refused.stderr, refused.stderr
    until(
        lambda: get_job(kube, namespace, "doomed").get("status", {}).get("phase") == "cancelled",
        60,
        "cancelled",
    )
    described = as_json(kube, "describe", "doomed", "-n", namespace)
    cancelled_condition = next(c for c in described["conditions"] if c["type"] == "Cancelled")
    assert cancelled_condition["reason"] == "CancelRequested"
    assert described["workers"] == {"ready": 0, "desired": 0}
    download = tmp_path / "download"
    fetched = as_json(kube, "results", "doomed", "-n", namespace, "--dir", str(download))
    answered = (download / "output.jsonl").read_text().splitlines()
    cancelled = [json.loads(line) for line in (download / "errors.jsonl").read_text().splitlines()]
    assert len(answered) + len(cancelled) == 5
    assert {e["error"]["code"] for e in cancelled} <= {"batch_cancelled"}
    assert fetched["errors.jsonl"]["url"].endswith("doomed-out/errors.jsonl")
    until(lambda: not live_pods(kube, namespace), 60, "no worker left")

    ok(kube, "cancel", "doomed", "-n", namespace, "--delete")
    until(lambda: not as_json(kube, "get", "-n", namespace), 60, "the job deleted")

    missing = plugin(kube, "troughfill", "get", "no-such-job", "-n", namespace)
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: batchinference"), missing.stderr
    assert "not found" in missing.stderr, missing.stderr
