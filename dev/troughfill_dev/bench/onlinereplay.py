"""What the cluster benches (bench.replay, bench.peers) share: the pool, the stand-in template, the
batch, online serving as a gauge and as pods, and playing a demand series on both while counting
the GPU-seconds batch holds."""

import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from kubernetes import client
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from troughfill import constants
from troughfill.kube.podstate import is_ready
from troughfill_dev.localcluster import free_port, start_prometheus, start_redis
from troughfill_dev.localcluster.services import wait_until
from troughfill_dev.localcluster.stack import start_local_cluster, start_operator

NAMESPACE = "default"
GPU = "nvidia.com/gpu"
ONLINE = "online"
ONLINE_PRIORITY_CLASS = "online-serving"
ONLINE_QUERY = "max(online_gpus)"
SAMPLE_SECONDS = 0.25
P = TypeVar("P")


def pool_manifest(
    name: str, *, prometheus_url: str, gpus: int, storage_prefix: str, scale_up_delay: int, drain_grace: int
) -> dict[str, Any]:
    """A pool of the node agent's node reading online demand as `max(online_gpus)`; no headroom,
    no minimum useful time."""
    return {
        "apiVersion": constants.GROUP_VERSION, "kind": "BatchPool", "metadata": {"name": name},
        "spec": {
            "gpus": {"nodeSelector": {"troughfill.dev/node-agent": "true"}},
            "online": {
                "prometheusURL": prometheus_url, "gpusInUseQuery": ONLINE_QUERY,
                "selector": {"matchLabels": {"app": ONLINE}},
            },
            "headroomGPUs": 0, "scaleUpDelay": f"{scale_up_delay}s", "minUsefulTime": "0s",
            "drainGracePeriod": f"{drain_grace}s", "signal": {"maxStaleness": "10s"},
            "defaultQuota": {"maxGPUs": gpus, "storage": [{"prefix": storage_prefix}]},
        },
    }  # fmt: skip


def standin_template(
    name: str, *, pool: str, load_seconds: float, engine_args: Sequence[str]
) -> dict[str, Any]:
    """A one-GPU template whose engine is the stand-in (troughfill_dev.standin), listening after
    `load_seconds`."""
    return {
        "apiVersion": constants.GROUP_VERSION, "kind": "ModelTemplate", "metadata": {"name": name},
        "spec": {
            "poolRef": pool, "image": "troughfill/standin:bench",
            "model": {"uri": "/models/none", "servedModelName": "m"},
            "gpusPerWorker": 1, "coldStartSeconds": max(1, round(load_seconds)),
            "engine": {
                "command": [sys.executable, "-m", "troughfill_dev.standin"],
                "args": ["--load-seconds", str(load_seconds), *engine_args],
            },
        },
    }  # fmt: skip


def batch_job(
    name: str, workdir: Path, *, template: str, requests: int, max_tokens: int, max_workers: int
) -> dict[str, Any]:
    """A BatchInference of `requests` identical chat requests, written to workdir/requests.jsonl."""
    path = workdir / "requests.jsonl"
    body = {"model": "m", "messages": [{"role": "user", "content": "go"}], "max_tokens": max_tokens}
    line = {"method": "POST", "url": "/v1/chat/completions", "body": body}
    path.write_text("".join(json.dumps({"custom_id": f"r{i}", **line}) + "\n" for i in range(requests)))
    return {
        "apiVersion": constants.GROUP_VERSION, "kind": "BatchInference",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"inputURL": path.as_uri(), "outputURL": (workdir / "out").as_uri() + "/",
                 "templateRef": template, "maxWorkers": max_workers},
    }  # fmt: skip


def deployment(name: str, replicas: int, pod_spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "replicas": replicas, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": pod_spec},
        },
    }  # fmt: skip


def online_manifests() -> list[dict[str, Any]]:
    """Online serving's pods: a Deployment of one-GPU pods at a PriorityClass above batch, so that
    online takes GPUs batch has not given back yet (the scheduler preempts batch for them)."""
    priority_class = {
        "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
        "metadata": {"name": ONLINE_PRIORITY_CLASS}, "value": 1000,
    }  # fmt: skip
    serving = deployment(ONLINE, 0, {
        "priorityClassName": ONLINE_PRIORITY_CLASS, "terminationGracePeriodSeconds": 1,
        "containers": [{
            "name": "serve", "image": "python:3.11-slim",
            "command": [sys.executable, "-c", "import time; time.sleep(86400)"],
            "resources": {"requests": {GPU: "1"}, "limits": {GPU: "1"}},
        }],
    })  # fmt: skip
    return [priority_class, serving]


class OnlineServing:
    """Online demand as Prometheus sees it (the `online_gpus` gauge, served here) and as pods (the
    `online` Deployment's replicas)."""

    def __init__(self, initial: int) -> None:
        registry = CollectorRegistry()
        self.gauge = Gauge("online_gpus", "GPUs online serving holds", registry=registry)
        self.gauge.set(initial)
        self.port = free_port()
        self.server, _ = start_http_server(self.port, addr="127.0.0.1", registry=registry)
        self.apps: client.AppsV1Api | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def bind(self, api: client.ApiClient) -> None:
        self.apps = client.AppsV1Api(api)

    def set(self, gpus: int) -> None:
        self.gauge.set(gpus)
        if self.apps is not None:
            self.apps.patch_namespaced_deployment_scale(ONLINE, NAMESPACE, {"spec": {"replicas": gpus}})

    def running(self, core: client.CoreV1Api) -> int:
        pods = core.list_namespaced_pod(NAMESPACE, label_selector=f"app={ONLINE}").items
        return sum(1 for p in pods if p.status.phase == "Running" and not p.metadata.deletion_timestamp)

    def stop(self) -> None:
        self.server.shutdown()


def preempted_by_scheduler(pod: Any) -> bool:
    return any(
        c.type == "DisruptionTarget" and c.reason == "PreemptionByScheduler"
        for c in pod.status.conditions or []
    )


@dataclass
class Tally:
    """What a replay measured: GPU-seconds batch pods held (bound, not finished) and were Ready
    (and not being deleted), online GPU-seconds displaced (pods wanted, not Running), and the batch
    pods the scheduler preempted."""

    held: float = 0.0
    ready: float = 0.0
    displaced: float = 0.0
    preempted: set[str] = field(default_factory=set)


def play(
    demand: Sequence[int],
    online: OnlineServing,
    batch_pods: Callable[[], list[Any]],
    online_running: Callable[[], int],
) -> Tally:
    """Publish `demand` (online GPUs per wall second) second by second, sampling batch and online
    pods every SAMPLE_SECONDS meanwhile."""
    tally = Tally()
    stop = threading.Event()
    wanted = [demand[0]]
    online.set(demand[0])
    started = time.monotonic()

    def publish() -> None:
        for k, value in enumerate(demand):
            if value != wanted[0]:
                online.set(value)
                wanted[0] = value
            if stop.wait(max(0.0, started + k + 1 - time.monotonic())):
                return

    publisher = threading.Thread(target=publish, name=ONLINE, daemon=True)
    publisher.start()
    last = time.monotonic()
    try:
        while (now := time.monotonic()) < started + len(demand):
            pods = batch_pods()
            running = online_running()
            step, last = now - last, now
            tally.held += step * len(pods)
            tally.ready += step * sum(1 for p in pods if is_ready(p) and not p.metadata.deletion_timestamp)
            tally.displaced += step * max(0, wanted[0] - running)
            tally.preempted.update(p.metadata.name for p in pods if preempted_by_scheduler(p))
            time.sleep(SAMPLE_SECONDS)
    finally:
        stop.set()
        publisher.join(5)
    return tally


def bound_pods(core: client.CoreV1Api, selector: str) -> list[Any]:
    """Pods matching `selector` that hold their GPUs: bound to a node and not finished."""
    pods = core.list_namespaced_pod(NAMESPACE, label_selector=selector).items
    return [p for p in pods if p.spec.node_name and p.status.phase not in ("Succeeded", "Failed")]


@dataclass
class StandinJob:
    """The batch a bench runs: a pool, a stand-in template and a job of identical requests."""

    job: str
    pool: str
    template: str
    requests: int
    max_tokens: int
    engine_args: Sequence[str]
    load_seconds: float
    scale_up_delay: int
    drain_grace: int


class StandinStack:
    """One bench run's services, started in order and stopped in reverse: online serving (gauge
    and pods), Redis, Prometheus (scraping the gauge, and the operator's /metrics if
    `metrics_port`), a one-node local cluster of `gpus` GPUs, `troughfill operator` and the job,
    returned from start() once indexed."""

    def __init__(
        self,
        workdir: Path,
        gpus: int,
        spec: StandinJob,
        *,
        online_gpus: int,
        interval: float = 1.0,
        metrics_port: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.gpus = gpus
        self.spec = spec
        self.online_gpus = online_gpus
        self.interval = interval
        self.metrics_port = metrics_port
        self.processes: list[Any] = []

    def add(self, process: P) -> P:
        """Stop `process` with the rest (before what was started earlier)."""
        self.processes.append(process)
        return process

    def start(self) -> None:
        spec = self.spec
        self.online = self.add(OnlineServing(self.online_gpus))
        self.redis = self.add(start_redis(self.workdir / "redis", appendonly=False))
        targets = [self.online.target]
        if self.metrics_port is not None:
            targets.append(f"127.0.0.1:{self.metrics_port}")
        self.prometheus = self.add(start_prometheus(self.workdir / "prometheus", targets, "1s"))
        self.cluster = self.add(start_local_cluster(self.workdir / "cluster", nodes=1, gpus=self.gpus))
        self.core = self.cluster.core
        self.apps = client.AppsV1Api(self.cluster.api)
        self.objects = client.CustomObjectsApi(self.cluster.api)
        self.online.bind(self.cluster.api)
        pool = pool_manifest(
            spec.pool, prometheus_url=self.prometheus.url, gpus=self.gpus,
            storage_prefix=f"{self.workdir.resolve().as_uri()}/",
            scale_up_delay=spec.scale_up_delay, drain_grace=spec.drain_grace,
        )  # fmt: skip
        template = standin_template(
            spec.template, pool=spec.pool, load_seconds=spec.load_seconds, engine_args=spec.engine_args
        )
        self.cluster.kubectl(
            "apply", "-f", "-", stdin=yaml.safe_dump_all([*online_manifests(), pool, template])
        )
        operator = start_operator(
            self.workdir / "operator", self.cluster, redis_url=self.redis.url,
            prometheus_url=self.prometheus.url, interval=self.interval, metrics_port=self.metrics_port or 0,
        )  # fmt: skip
        self.operator = self.add(operator)
        job = batch_job(
            spec.job, self.workdir, template=spec.template, requests=spec.requests,
            max_tokens=spec.max_tokens, max_workers=self.gpus,
        )  # fmt: skip
        self.cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(job))
        wait_until(lambda: self.job_status().get("phase") == "in_progress", 300, "the job indexed", 0.5)

    def job_status(self) -> dict[str, Any]:
        found = self.objects.get_namespaced_custom_object(
            constants.API_GROUP, constants.API_VERSION, NAMESPACE, "batchinferences", self.spec.job
        )
        return dict(found.get("status") or {})

    def online_running(self) -> int:
        return self.online.running(self.core)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
