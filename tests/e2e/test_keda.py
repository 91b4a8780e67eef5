"""The peer, for real: KEDA (built from its Go module) scaling a batch Deployment on the same
online PromQL troughfill reads, through the API server's aggregation layer and the
kube-controller-manager's HorizontalPodAutoscaler, as KEDA's docs set it up.

This is the ground the side-by-side benchmark (bench.peers) stands on: if KEDA did not scale
here, a comparison against it would be a comparison against nothing."""

import json
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from tests.e2e.conftest import Kube, until
from troughfill_dev.localcluster import free_port, start_prometheus
from troughfill_dev.localcluster.keda import Keda, start_keda, wait_scaled_object_ready
from troughfill_dev.localcluster.nodeagent import GPU_RESOURCE

CAPACITY = 4
"""GPUs the batch Deployment may fill: its replicas are the GPUs online leaves idle."""


@pytest.fixture(scope="module")
def keda(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keda]:
    if kube.plane is None:
        pytest.skip("KEDA runs beside the local control plane")
    started = start_keda(kube.plane, tmp_path_factory.mktemp("keda"))
    try:
        yield started
    finally:
        started.stop()


def scaled_object(name: str, target: str, prometheus_url: str, query: str) -> dict[str, Any]:
    """A ScaledObject as KEDA's Prometheus scaler docs write one, with the HPA's scale-down
    stabilisation (300 s by default) set to 0 so the test does not wait five minutes."""
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": name},
        "spec": {
            "scaleTargetRef": {"name": target},
            "pollingInterval": 1,
            "cooldownPeriod": 5,
            "minReplicaCount": 0,
            "maxReplicaCount": CAPACITY,
            "advanced": {
                "horizontalPodAutoscalerConfig": {
                    "behavior": {"scaleDown": {"stabilizationWindowSeconds": 0}}
                }
            },
            "triggers": [
                {
                    "type": "prometheus",
                    "metadata": {"serverAddress": prometheus_url, "query": query, "threshold": "1"},
                }
            ],
        },
    }


def batch_deployment(name: str) -> dict[str, Any]:
    """One GPU a replica; the pod only holds it (the node agent runs its command)."""
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": 2,
                    "containers": [
                        {
                            "name": "worker",
                            "image": "python:3.11-slim",
                            "command": [sys.executable, "-c", "import time; time.sleep(3600)"],
                            "resources": {"limits": {GPU_RESOURCE: "1"}},
                        }
                    ],
                },
            },
        },
    }


def test_keda_scales_a_batch_deployment_on_the_online_metric_through_the_hpa(
    kube: Kube, namespace: str, keda: Keda, tmp_path: Path
) -> None:
    """Online at 0 of 4 GPUs -> 4 batch replicas; online at 3 -> 1; online at 4 -> 0: KEDA's
    Prometheus scaler, its metrics API server behind the aggregation layer, the HPA."""
    suffix = uuid.uuid4().hex[:6]
    metric = f"e2e_keda_online_gpus_{suffix}"
    registry = CollectorRegistry()
    online = Gauge(metric, "GPUs online serving holds", registry=registry)
    online.set(0)
    exporter_port = free_port()
    exporter, _ = start_http_server(exporter_port, addr="127.0.0.1", registry=registry)
    prometheus = start_prometheus(tmp_path / "prometheus", [f"127.0.0.1:{exporter_port}"], "1s")
    apps = client.AppsV1Api(kube.api)
    objects = client.CustomObjectsApi(kube.api)
    try:
        apps.create_namespaced_deployment(namespace, batch_deployment("batch"))
        query = f"{CAPACITY} - max({metric})"
        objects.create_namespaced_custom_object(
            "keda.sh", "v1alpha1", namespace, "scaledobjects",
            scaled_object("batch", "batch", prometheus.url, query),
        )  # fmt: skip
        assert kube.plane is not None
        wait_scaled_object_ready(kube.plane, namespace, "batch")

        def replicas() -> int:
            return int(apps.read_namespaced_deployment("batch", namespace).spec.replicas or 0)

        def running() -> int:
            pods = kube.core.list_namespaced_pod(namespace, label_selector="app=batch").items
            return sum(1 for p in pods if p.status.phase == "Running" and not p.metadata.deletion_timestamp)

        until(
            lambda: replicas() == CAPACITY and running() == CAPACITY,
            120,
            "4 batch replicas in the empty trough",
        )
        # The external metric, read through the API server as the HPA reads it.
        status, body = kube.plane.get(
            f"/apis/external.metrics.k8s.io/v1beta1/namespaces/{namespace}/s0-prometheus"
            f"?labelSelector=scaledobject.keda.sh%2Fname%3Dbatch"
        )
        assert status == 200, body
        values = [item["value"] for item in json.loads(body)["items"]]
        assert values == [str(CAPACITY)], values
        hpa = client.AutoscalingV2Api(kube.api).read_namespaced_horizontal_pod_autoscaler(
            "keda-hpa-batch", namespace
        )
        assert hpa.spec.metrics[0].type == "External"

        risen = time.monotonic()
        online.set(3)
        until(lambda: running() == 1, 120, "batch down to 1 replica once online took 3 GPUs", interval=0.2)
        partial = time.monotonic() - risen
        risen = time.monotonic()
        online.set(CAPACITY)
        until(lambda: running() == 0, 120, "batch down to 0 once online took every GPU", interval=0.2)
        print(
            f"\nKEDA: online 0 -> 3 of 4 GPUs -> batch at 1 replica in {partial:.1f}s; "
            f"online -> 4 -> batch at 0 in {time.monotonic() - risen:.1f}s"
        )
        assert replicas() == 0
    finally:
        exporter.shutdown()
        prometheus.stop()
