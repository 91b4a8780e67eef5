"""How fast batch gives GPUs back, on a real control plane.

    python -m troughfill_dev.bench.yield_latency [--iterations 10] [--interval 0.5]

Starts Redis, Prometheus (scraping a metrics endpoint this script serves, every second), the
local control plane with the node agent (one node, 2 GPUs) and `troughfill operator`. A pool
of that node's 2 GPUs, a template whose worker runs the local vLLM engine with the tiny test
model on both GPUs, and a long job. Then, per iteration, once the worker is Ready (its engine
up and working):

- signal: the online GPUs gauge goes from 0 to 2 (what online serving reports through
  Prometheus); latency = gauge set -> worker pod gone (its GPUs free for the scheduler);
- pending pod: an online pod of a higher PriorityClass asking for the 2 GPUs is created and
  stays Pending (the node is full); latency = pod created -> worker pod gone. Both the
  operator (pending online GPUs count as demand) and kube-scheduler's preemption race to free
  them, as in a cluster.

Each iteration also gives where the seconds went: when Prometheus first answered the query
with the new value (signal only), when the worker pod was marked for deletion (the operator's
yield, or the scheduler's preemption), when it was gone.

Workers stop in yield mode (online needs the GPUs now: checkpoint, exit within 2 s). Prints
one JSON object. Needs scripts/setup.sh, setup_vllm.sh and setup_k8s.sh sourced.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from kubernetes.client.exceptions import ApiException
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from troughfill import constants
from troughfill.kube.podstate import is_ready
from troughfill_dev.localcluster import free_port, start_prometheus, start_redis
from troughfill_dev.localcluster.services import VLLM_ENV, wait_until
from troughfill_dev.localcluster.stack import start_local_cluster, start_operator

POLL = 0.02
"""Seconds between checks while a latency is being measured."""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[rank]


def phase_summary(runs: list[dict[str, float]]) -> dict[str, Any]:
    """The total (start to pod gone) summarised, and each iteration's phases."""
    report = summary([r["gone_s"] for r in runs])
    report["phases"] = runs
    return report


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50_s": round(statistics.median(values), 3),
        "p99_s": round(percentile(values, 0.99), 3),
        "max_s": round(max(values), 3),
        "all_s": [round(v, 3) for v in values],
    }


class Bench:
    def __init__(self, workdir: Path, interval: float) -> None:
        self.workdir = workdir
        self.interval = interval
        self.processes: list[Any] = []

    def start(self) -> None:
        python, model = os.environ.get("TROUGHFILL_VLLM_PYTHON"), os.environ.get("TROUGHFILL_TINY_MODEL")
        if not python or not model:
            raise SystemExit("source scripts/setup.sh, scripts/setup_vllm.sh and scripts/setup_k8s.sh first")
        registry = CollectorRegistry()
        self.online = Gauge("online_gpus", "GPUs online serving holds", registry=registry)
        exporter_port = free_port()
        start_http_server(exporter_port, addr="127.0.0.1", registry=registry)
        self.redis = start_redis(self.workdir / "redis", appendonly=False)
        self.processes.append(self.redis)
        self.prometheus = start_prometheus(self.workdir / "prometheus", [f"127.0.0.1:{exporter_port}"], "1s")
        self.processes.append(self.prometheus)
        self.cluster = start_local_cluster(self.workdir / "cluster", nodes=1, gpus=2)
        self.processes.append(self.cluster)
        self.core = self.cluster.core
        online_class = {
            "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
            "metadata": {"name": "online-serving"}, "value": 1000,
        }  # fmt: skip
        requests = self.workdir / "requests.jsonl"
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 200,
            "ignore_eos": True,
        }
        requests.write_text(
            "".join(
                json.dumps(
                    {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
                )
                + "\n"
                for i in range(20_000)
            )
        )
        workdir_uri = self.workdir.resolve().as_uri()
        pool = {
            "apiVersion": constants.GROUP_VERSION, "kind": "BatchPool", "metadata": {"name": "bench"},
            "spec": {
                "gpus": {"nodeSelector": {"troughfill.dev/node-agent": "true"}},
                "online": {
                    "prometheusURL": self.prometheus.url, "gpusInUseQuery": "sum(online_gpus)",
                    "selector": {"matchLabels": {"app": "online"}},
                },
                "headroomGPUs": 0, "scaleUpDelay": "0s", "minUsefulTime": "0s", "drainGracePeriod": "5s",
                "signal": {"maxStaleness": "10s"},
                "defaultQuota": {"maxGPUs": 2, "storage": [{"prefix": f"{workdir_uri}/"}]},
            },
        }  # fmt: skip
        template = {
            "apiVersion": constants.GROUP_VERSION, "kind": "ModelTemplate", "metadata": {"name": "tiny"},
            "spec": {
                "poolRef": "bench", "image": "troughfill/vllm-cpu:bench",
                "model": {"uri": model, "servedModelName": "tiny"},
                "gpusPerWorker": 2, "coldStartSeconds": 60,
                "engine": {
                    "command": [python, "-m", "vllm.entrypoints.openai.api_server"],
                    "args": ["--enforce-eager", "--max-model-len", "1024", "--max-num-seqs", "32"],
                    "env": [{"name": k, "value": v} for k, v in VLLM_ENV.items()],
                },
            },
        }  # fmt: skip
        job = {
            "apiVersion": constants.GROUP_VERSION, "kind": "BatchInference",
            "metadata": {"name": "long", "namespace": "default"},
            "spec": {"inputURL": requests.as_uri(), "outputURL": (self.workdir / "out").as_uri() + "/",
                     "templateRef": "tiny"},
        }  # fmt: skip
        self.online.set(0)
        self.cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all([online_class, pool, template]))
        operator = start_operator(
            self.workdir / "operator",
            self.cluster,
            redis_url=self.redis.url,
            prometheus_url=self.prometheus.url,
            interval=self.interval,
        )
        self.processes.append(operator)
        self.cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(job))

    def workers(self) -> list[Any]:
        selector = f"{constants.LABEL_COMPONENT}={constants.COMPONENT_WORKER}"
        pods: list[Any] = self.core.list_namespaced_pod("default", label_selector=selector).items
        return pods

    def wait_worker_ready(self) -> None:
        def ready() -> bool:
            return any(not p.metadata.deletion_timestamp and is_ready(p) for p in self.workers())

        wait_until(ready, 600, "a Ready worker", 0.2)
        time.sleep(2)  # working, not just up

    def prometheus_sees(self, value: float) -> bool:
        query = urllib.parse.urlencode({"query": "sum(online_gpus)"})
        try:
            with urllib.request.urlopen(f"{self.prometheus.url}/api/v1/query?{query}", timeout=2) as response:
                result = json.load(response)["data"]["result"]
        except OSError:
            return False
        return bool(result) and float(result[0]["value"][1]) >= value

    def follow(self, started: float, *, signal: bool) -> dict[str, float]:
        """Poll until the worker pod is gone; the seconds from `started` to each phase's start:
        Prometheus answering with the new value (signal only), the worker pod marked for
        deletion (the operator's yield or the scheduler's preemption), the pod gone."""
        phases: dict[str, float] = {}
        deadline = started + 120
        while time.monotonic() < deadline:
            now = time.monotonic() - started
            if signal and "prometheus_sees_s" not in phases and self.prometheus_sees(2):
                phases["prometheus_sees_s"] = now
            pods = self.workers()
            if not pods:
                phases.setdefault("deleting_s", now)
                phases["gone_s"] = now
                return {k: round(v, 3) for k, v in phases.items()}
            if "deleting_s" not in phases and all(p.metadata.deletion_timestamp for p in pods):
                phases["deleting_s"] = now
            time.sleep(POLL)
        raise TimeoutError("gave up waiting for the worker to go")

    def signal_yield(self) -> dict[str, float]:
        self.wait_worker_ready()
        started = time.monotonic()
        self.online.set(2)
        phases = self.follow(started, signal=True)
        self.online.set(0)
        return phases

    def pending_pod_yield(self) -> dict[str, float]:
        self.wait_worker_ready()
        pod = {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "online", "labels": {"app": "online"}},
            "spec": {
                "priorityClassName": "online-serving", "terminationGracePeriodSeconds": 1,
                "containers": [{
                    "name": "serve", "image": "python:3.11-slim",
                    "command": [sys.executable, "-c", "import time; time.sleep(3600)"],
                    "resources": {"requests": {"nvidia.com/gpu": "2"}, "limits": {"nvidia.com/gpu": "2"}},
                }],
            },
        }  # fmt: skip
        started = time.monotonic()
        for attempt in range(5):  # a loaded API server can time out its quota admission (500)
            try:
                self.core.create_namespaced_pod("default", pod)
                break
            except ApiException as error:
                if error.status < 500 or attempt == 4:
                    raise
                time.sleep(0.2)
        phases = self.follow(started, signal=False)
        self.core.delete_namespaced_pod("online", "default", grace_period_seconds=0)
        wait_until(
            lambda: not self.core.list_namespaced_pod("default", label_selector="app=online").items,
            60,
            "gone",
        )
        return phases

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--iterations", type=int, default=10, help="yields per trigger (the worst is reported)"
    )
    parser.add_argument("--interval", type=float, default=0.5, help="operator reconcile interval, seconds")
    args = parser.parse_args()
    # A SIGTERM stops everything this started, as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    scratch = Path(tempfile.mkdtemp(prefix="troughfill-yield-"))
    bench = Bench(scratch, args.interval)
    try:
        bench.start()
        by_signal = [bench.signal_yield() for _ in range(args.iterations)]
        by_pending_pod = [bench.pending_pod_yield() for _ in range(args.iterations)]
    except BaseException:
        print(f"failed; logs kept in {scratch}", file=sys.stderr)
        raise
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    finally:
        bench.stop()
    print(
        json.dumps(
            {
                "what": "seconds from online demand to the batch worker's pod gone (its 2 GPUs free)",
                "reconcile_interval_s": args.interval,
                "prometheus_scrape_interval_s": 1.0,
                "stop_mode": "yield (drain grace configured 5s, not used: online needed the GPUs now)",
                "signal_crossing": phase_summary(by_signal),
                "online_pod_pending": phase_summary(by_pending_pod),
                "goal_p99_s": 3.0,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
