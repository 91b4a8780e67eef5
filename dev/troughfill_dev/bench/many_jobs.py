"""The operator with a thousand BatchInferences: what it asks of the API server, and how long
its pool cycles take.

    python -m troughfill_dev.bench.many_jobs [--jobs 1000] [--namespaces 50] [--gpus 8] [--window 30]

Starts Redis, Prometheus (an online-GPUs gauge at 0), the local control plane with one node
of `--gpus` GPUs and `troughfill operator` (its default 2 s cycle), then applies `--jobs`
BatchInferences spread over `--namespaces` namespaces, all on one pool, as users would. The
workers' engine is the stand-in (troughfill_dev.standin) answering after 10 minutes, so the
first `--gpus` jobs hold their workers and the rest wait: a steady state with no changes.

Measured, side by side in one run, each over `--window` seconds of that steady state:
- `watch_cache`: the operator as shipped (informers: TROUGHFILL_WATCH_CACHE=true);
- `list_each_cycle`: the same operator, restarted with TROUGHFILL_WATCH_CACHE=false (every
  pool cycle lists every job and worker pod);
- `baseline`: no operator at all (the node agent, scheduler and controller manager alone).
The operator's API requests are the window's `apiserver_request_total` (the API server's own
metrics) minus the baseline's, per second and per pool cycle, by verb and resource, with the
bytes of the responses (`apiserver_response_sizes`); cycle times come from the operator's
`troughfill_pool_cycle_seconds` histogram (p99 as the bucket bound it falls in), with the
full garbage collections it ran between cycles (`troughfill_full_collection_seconds`). Also the time
from the first apply to all jobs admitted. Prints one JSON object. Needs scripts/setup.sh and
scripts/setup_k8s.sh sourced.
"""

import argparse
import json
import os
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from troughfill import constants
from troughfill_dev.bench import online_gpus_gauge, run_in_scratch
from troughfill_dev.localcluster import free_port, start_prometheus, start_redis
from troughfill_dev.localcluster.services import ManagedProcess, wait_until
from troughfill_dev.localcluster.stack import LocalCluster, start_local_cluster, start_operator

GOAL_CYCLE_P99_SECONDS = 0.2
FULL_COLLECTIONS = "troughfill_full_collection_seconds"
"""Python's full garbage collections, which the operator runs between its cycles."""
ENGINE_DELAY_SECONDS = 600


def api_counts(cluster: LocalCluster) -> tuple[Counter[str], Counter[str]]:
    """(requests, response bytes) by `VERB resource` since the API server started."""
    status, text = cluster.plane.get("/metrics", timeout=30)
    if status != 200:
        raise RuntimeError(f"API server metrics: {status}")
    requests: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = f"{sample.labels.get('verb', '?')} {sample.labels.get('resource', '?')}"
            if sample.name == "apiserver_request_total":
                requests[key] += int(sample.value)
            elif sample.name == "apiserver_response_sizes_sum":
                sizes[key] += int(sample.value)
    return requests, sizes


def cycle_histogram(metrics_port: int, name: str = "troughfill_pool_cycle_seconds") -> dict[float, float]:
    """Cumulative bucket counts of one of the operator's histograms, pool cycles by default
    (le -> count, +inf included; summed over its labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
            elif sample.name.endswith("_sum"):
                buckets[-1.0] = buckets.get(-1.0, 0.0) + sample.value  # the sum, under a key no bucket has
    return buckets


def cycle_summary(
    before: dict[float, float], after: dict[float, float], counted: str = "cycles"
) -> dict[str, Any]:
    delta = {le: after.get(le, 0.0) - before.get(le, 0.0) for le in after}
    total_seconds = delta.pop(-1.0, 0.0)
    count = delta.get(float("inf"), 0.0)
    if not count:
        return {counted: 0}
    p99 = next(le for le in sorted(delta) if delta[le] >= 0.99 * count)
    return {
        counted: int(count),
        "mean_s": round(total_seconds / count, 4),
        "p99_at_most_s": p99,
        "over_goal": int(count - delta.get(GOAL_CYCLE_P99_SECONDS, 0.0)),
        "at_most_s": {str(le): int(n) for le, n in sorted(delta.items()) if n and le != float("inf")},
    }


class Window:
    """API requests and cycles over `seconds` of a steady state."""

    def __init__(self, cluster: LocalCluster, seconds: float, metrics_port: int | None) -> None:
        requests, sizes = api_counts(cluster)
        cycles = cycle_histogram(metrics_port) if metrics_port else {}
        collections = cycle_histogram(metrics_port, FULL_COLLECTIONS) if metrics_port else {}
        time.sleep(seconds)
        requests_after, sizes_after = api_counts(cluster)
        self.seconds = seconds
        self.requests = requests_after - requests
        self.bytes = sizes_after - sizes
        self.cycles = cycle_summary(cycles, cycle_histogram(metrics_port)) if metrics_port else {}
        self.collections = (
            cycle_summary(collections, cycle_histogram(metrics_port, FULL_COLLECTIONS), "collections")
            if metrics_port
            else {}
        )


def operator_share(window: Window, baseline: Window) -> dict[str, Any]:
    """The window's requests less the baseline's (both per second), per second and per cycle."""
    rate = {
        k: v / window.seconds - baseline.requests.get(k, 0) / baseline.seconds
        for k, v in window.requests.items()
    }
    mine = {k: round(v, 2) for k, v in sorted(rate.items(), key=lambda kv: -kv[1]) if v > 0.05}
    per_second = sum(mine.values())
    cycles_per_second = window.cycles.get("cycles", 0) / window.seconds
    list_bytes = {
        k: round(v / window.seconds - baseline.bytes.get(k, 0) / baseline.seconds)
        for k, v in window.bytes.items()
        if k.startswith("LIST") and v / window.seconds > baseline.bytes.get(k, 0) / baseline.seconds
    }
    return {
        "requests_per_s": round(per_second, 2),
        "requests_per_cycle": round(per_second / cycles_per_second, 2) if cycles_per_second else None,
        "by_verb_and_resource_per_s": mine,
        "list_response_bytes_per_s": list_bytes,
        "cycle": window.cycles,
        "full_collections": window.collections,
    }


def manifests(
    root: Path, prometheus_url: str, jobs: int, namespaces: int, gpus: int
) -> tuple[list[Any], list[Any]]:
    """(namespaces, pool and template; the jobs), each namespace with its input."""
    kind = {"apiVersion": constants.GROUP_VERSION}
    setup: list[Any] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"team-{n:02d}"}}
        for n in range(namespaces)
    ]
    setup += [
        {
            **kind, "kind": "BatchPool", "metadata": {"name": "shared"},
            "spec": {
                "gpus": {"nodeSelector": {"troughfill.dev/node-agent": "true"}},
                "online": {"prometheusURL": prometheus_url, "gpusInUseQuery": "sum(online_gpus)"},
                "headroomGPUs": 0, "scaleUpDelay": "0s", "minUsefulTime": "0s",
                "defaultQuota": {
                    "maxGPUs": gpus, "storage": [{"prefix": f"{root.resolve().as_uri()}/{{namespace}}/"}]
                },
            },
        },
        {
            **kind, "kind": "ModelTemplate", "metadata": {"name": "standin"},
            "spec": {
                "poolRef": "shared", "image": "troughfill/standin:bench",
                "model": {"uri": "/models/none", "servedModelName": "standin"},
                "gpusPerWorker": 1, "coldStartSeconds": 5,
                "engine": {
                    "command": [sys.executable, "-m", "troughfill_dev.standin"],
                    "args": ["--delay-seconds", str(ENGINE_DELAY_SECONDS)],
                },
            },
        },
    ]  # fmt: skip
    line = {
        "custom_id": "",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    }
    batch = []
    for n in range(namespaces):
        folder = root / f"team-{n:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "in.jsonl").write_text(
            "".join(json.dumps({**line, "custom_id": f"r{i}"}) + "\n" for i in range(10))
        )
    for k in range(jobs):
        namespace = f"team-{k % namespaces:02d}"
        batch.append(
            {
                **kind, "kind": "BatchInference",
                "metadata": {"name": f"job-{k:04d}", "namespace": namespace},
                "spec": {
                    "inputURL": (root / namespace / "in.jsonl").resolve().as_uri(),
                    "outputURL": f"{(root / namespace).resolve().as_uri()}/out-{k:04d}/",
                    "templateRef": "standin", "completionWindow": "24h",
                },
            }
        )  # fmt: skip
    return setup, batch


def admitted_count(custom: client.CustomObjectsApi) -> int:
    listed = custom.list_cluster_custom_object(constants.API_GROUP, constants.API_VERSION, "batchinferences")
    return sum(
        1
        for item in listed["items"]
        for c in item.get("status", {}).get("conditions", [])
        if c["type"] == "Admitted" and c["status"] == "True"
    )


def run(workdir: Path, jobs: int, namespaces: int, gpus: int, window: float) -> dict[str, Any]:
    processes: list[Any] = []
    try:
        _, exporter = online_gpus_gauge()
        store = start_redis(workdir / "redis", appendonly=False)
        processes.append(store)
        prometheus = start_prometheus(workdir / "prometheus", [exporter], "1s")
        processes.append(prometheus)
        cluster = start_local_cluster(workdir / "cluster", nodes=1, gpus=gpus)
        processes.append(cluster)
        setup, batch = manifests(workdir / "data", prometheus.url, jobs, namespaces, gpus)
        cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(setup))

        def operator(watch_cache: bool) -> tuple[ManagedProcess, int]:
            port = free_port()
            started = start_operator(
                workdir / f"operator-{'cache' if watch_cache else 'list'}",
                cluster,
                redis_url=store.url,
                prometheus_url=prometheus.url,
                interval=2.0,
                metrics_port=port,
                extra_env={"TROUGHFILL_WATCH_CACHE": str(watch_cache).lower()},
            )
            processes.append(started)
            return started, port

        shipped, port = operator(watch_cache=True)
        custom = client.CustomObjectsApi(cluster.api)
        applied = time.monotonic()
        for first in range(0, len(batch), 250):
            cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(batch[first : first + 250]))
        wait_until(lambda: admitted_count(custom) >= jobs, 1800, "every job admitted", interval=2.0)
        admit_seconds = time.monotonic() - applied
        time.sleep(15)  # settled: workers started, every job refreshed at least once
        cached = Window(cluster, window, port)
        shipped.stop(timeout=30)
        processes.remove(shipped)
        time.sleep(5)
        baseline = Window(cluster, window, None)
        _, port = operator(watch_cache=False)
        time.sleep(20)  # Kopf resumes every job, then the steady state again
        listed = Window(cluster, window, port)
        pods = cluster.core.list_pod_for_all_namespaces(
            label_selector=f"{constants.LABEL_COMPONENT}={constants.COMPONENT_WORKER}"
        )
        return {
            "what": "the operator's API requests and pool cycle times with many BatchInferences on one pool",
            "jobs": jobs,
            "namespaces": namespaces,
            "gpus": gpus,
            "worker_pods": len(pods.items),
            "cpus": os.cpu_count(),
            "window_s": window,
            "seconds_to_admit_all": round(admit_seconds, 1),
            "watch_cache": operator_share(cached, baseline),
            "list_each_cycle": operator_share(listed, baseline),
            "baseline_requests_per_s": round(sum(baseline.requests.values()) / baseline.seconds, 2),
            "goal_cycle_p99_s": GOAL_CYCLE_P99_SECONDS,
        }
    finally:
        for process in reversed(processes):
            process.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--namespaces", type=int, default=50)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--window", type=float, default=30.0, help="seconds each side is measured")
    args = parser.parse_args()
    run_in_scratch(
        "troughfill-many-", lambda scratch: run(scratch, args.jobs, args.namespaces, args.gpus, args.window)
    )


if __name__ == "__main__":
    main()
