"""Install tier: troughfill installed the way the README tells users to, on a local cluster.

Real: the control plane (kube-apiserver, scheduler, controller manager, etcd), the operator's
and Redis' pods run from manifests/base by the node agent (each in a network namespace with
its own address, its Service reached by name, the operator authenticated as its
ServiceAccount with a token from the TokenRequest API, Redis on a provisioned volume), the
worker pods the operator creates (troughfill worker + the real vLLM CPU engine on
SmolLM2-135M-Instruct), Prometheus, an S3-protocol object store.

Stand-ins, each what a real cluster already has before troughfill arrives: images are local
(devenv.podfs.LocalImage: the operator image is this checkout's environment, the worker image
the vLLM environment plus it, with the model mounted where the template says); kube-state-
metrics is an exporter reporting no online pods; Prometheus and the object store run on this
host behind selectorless Services; the site's settings and the team's object-store
credentials are a ConfigMap and Secrets an admin creates.
"""

import json
import os
import socket
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pytest
from kubernetes import client, config
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from tests.conftest import REPO_ROOT
from troughfill_dev.localcluster import start_prometheus, start_s3
from troughfill_dev.localcluster.controlplane import (
    ControlPlane,
    k8s_bin_dir,
    start_control_plane,
    start_node_agent,
)
from troughfill_dev.localcluster.services import LOOPBACK, VLLM_ENV, PrometheusServer, S3Server, free_port

GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
"""What the example pool selects."""
NODE_GPUS = 2
"""The example pool keeps one GPU of headroom: one worker of one GPU."""
EXAMPLE_MODEL_PATH = "/models/SmolLM2-135M-Instruct"
BUCKET = "team-a-batches"
S3_URL = "http://s3.object-store.svc"
"""The object store as pods reach it: a Service in front of this host's."""


@dataclass
class Site:
    """The cluster and what the site provides around troughfill."""

    plane: ControlPlane
    api: client.ApiClient
    pods_dir: Path
    prometheus: PrometheusServer
    s3: S3Server

    def kubectl_args(self) -> list[str]:
        return [str(k8s_bin_dir() / "kubectl"), "--kubeconfig", str(self.plane.kubeconfig)]

    def pod_log(self, namespace: str, pod: str, container: str) -> str:
        found = sorted(self.pods_dir.glob(f"{namespace}_{pod}_*/{container}.log"))
        return found[-1].read_text(errors="replace") if found else ""

    def diagnostics(self) -> str:
        """What says why the site misbehaves: the node agent's warnings (a Service it could not
        proxy), the operator's last log lines, and what Prometheus scrapes and answers."""
        agent_log = self.pods_dir.parent / "agent" / "node-agent.log"
        warnings = [
            line
            for line in (agent_log.read_text(errors="replace") if agent_log.exists() else "").splitlines()
            if "WARNING" in line or "ERROR" in line
        ]
        operators = sorted(self.pods_dir.glob("troughfill-system_troughfill-operator-*/operator.log"))
        operator_tail = operators[-1].read_text(errors="replace").splitlines()[-40:] if operators else []
        try:
            with urllib.request.urlopen(f"{self.prometheus.url}/api/v1/targets", timeout=5) as answer:
                targets = [
                    (t["scrapeUrl"], t["health"], t["lastError"])
                    for t in json.load(answer)["data"]["activeTargets"]
                ]
            query = urllib.parse.quote('up{job="kube-state-metrics"}')
            with urllib.request.urlopen(
                f"{self.prometheus.url}/api/v1/query?query={query}", timeout=5
            ) as answer:
                up = json.load(answer)["data"]["result"]
            scraped = f"targets: {targets}\nup: {up}"
        except OSError as error:
            scraped = f"Prometheus unreadable from the host: {error!r}"
        return "\n".join(
            ["node agent warnings:", *warnings[-30:], "operator log (last lines):", *operator_tail, scraped]
        )

    def s3_fs(self) -> Any:
        return fsspec.filesystem(
            "s3", endpoint_url=self.s3.url, key=self.s3.access_key, secret=self.s3.secret_key
        )


def local_images() -> dict[str, Any]:
    """The images the manifests name, as this machine has them."""
    troughfill_bin = str(Path(sys.executable).parent)
    vllm_python = os.environ.get("TROUGHFILL_VLLM_PYTHON")
    model = os.environ.get("TROUGHFILL_DEMO_MODEL")
    if not vllm_python or not model:
        pytest.fail("TROUGHFILL_VLLM_PYTHON and TROUGHFILL_DEMO_MODEL are set by scripts/test.sh")
    return {
        "images": {
            "troughfill/operator:0.1.0": {"path": [troughfill_bin]},
            "redis:7.2": {"path": []},
            # images/worker.Containerfile: vLLM's image (its python3 first) plus troughfill.
            "troughfill/worker:0.1.0-vllm-v0.11.0": {
                "path": [str(Path(vllm_python).parent), troughfill_bin],
                "env": dict(VLLM_ENV),
                "mounts": {EXAMPLE_MODEL_PATH: model},
            },
        }
    }


def host_service(
    core: client.CoreV1Api, namespace: str, name: str, port: int, target: int, node: str
) -> None:
    """A selectorless Service in front of something on this host (its endpoint: the node address)."""
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    core.create_namespaced_service(
        namespace,
        {
            "metadata": {"name": name},
            "spec": {"ports": [{"name": "http", "port": port, "targetPort": target}]},
        },
    )
    client.DiscoveryV1Api(core.api_client).create_namespaced_endpoint_slice(
        namespace,
        {
            "metadata": {"name": f"{name}-host", "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [node], "conditions": {"ready": True}}],
            "ports": [{"name": "http", "port": target, "protocol": "TCP"}],
        },
    )


SERVICE_PORTS = (80, 6379, 8000, 9090)
"""Ports of the Services this tier makes (the object store, Redis, the Batch API, Prometheus and
the operator's metrics): the node agent listens on each Service's ClusterIP at its port."""


def assert_service_ports_free() -> None:
    """A listener on 0.0.0.0 at a Service's port (a leftover metrics server of an earlier test in
    this process, say) keeps the node agent from proxying that Service: fail saying so, before
    a job stalls on it."""
    for port in SERVICE_PORTS:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("0.0.0.0", port))
            except OSError as error:
                pytest.fail(
                    f"port {port} is taken on this host ({error}; see `ss -ltnp`): "
                    "the node agent could not proxy this tier's Services on it"
                )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    if os.geteuid() != 0:
        pytest.fail("the install tier runs pods in network and mount namespaces: run it as root")
    assert_service_ports_free()
    workdir = tmp_path_factory.mktemp("install")
    images = workdir / "images.json"
    images.write_text(json.dumps(local_images()))
    # kube-state-metrics' stand-in: the example pool's query sees it up, and no online pods.
    registry = CollectorRegistry()
    Gauge("kube_state_metrics_build_info", "kube-state-metrics stand-in", registry=registry).set(1)
    exporter_port = free_port()
    exporter, _ = start_http_server(exporter_port, addr=LOOPBACK, registry=registry)
    prometheus = start_prometheus(
        workdir / "prometheus", [f"{LOOPBACK}:{exporter_port}"], job_name="kube-state-metrics"
    )
    s3 = start_s3(workdir / "s3", [S3_URL])
    plane = start_control_plane(workdir / "plane")
    agent = None
    try:
        agent = start_node_agent(
            plane,
            workdir / "node",
            nodes=1,
            gpus=NODE_GPUS,
            python=sys.executable,
            pod_network=True,
            images=images,
            gpu_product=GPU_PRODUCT,
            storage_class="standard",
        )
        api = config.new_client_from_config(config_file=str(plane.kubeconfig))
        core = client.CoreV1Api(api)
        node = plane.node_address
        host_service(core, "monitoring", "prometheus-operated", 9090, prometheus.port, node)
        host_service(core, "object-store", "s3", 80, s3.port, node)
        yield Site(plane, api, workdir / "node" / "pods", prometheus, s3)
    finally:
        if agent is not None:
            agent.stop(timeout=30)
        plane.stop()
        s3.stop()
        prometheus.stop()
        exporter.shutdown()


def read_example(name: str) -> str:
    return (REPO_ROOT / "manifests" / "examples" / name).read_text()
