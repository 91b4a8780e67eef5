"""KEDA on the local control plane: the peer troughfill is measured against, unmodified.

Its operator (`keda`) and its metrics API server (`keda-adapter`), built from the
github.com/kedacore/keda/v2 module by scripts/setup_keda.sh, run as processes on this host (as
Prometheus does in the e2e tier), with the admin's kubeconfig. What they serve goes through the
same paths as in a real cluster: KEDA's CRDs (its own `config/crd/bases`), the APIService
`v1beta1.external.metrics.k8s.io` behind the API server's aggregation layer (a Service and an
EndpointSlice in front of the adapter), and the kube-controller-manager's HorizontalPodAutoscaler
controller reading external metrics through it, every `--horizontal-pod-autoscaler-sync-period`.

The aggregation layer dials the APIService's endpoint, which may not be a loopback address: the
control plane's node address is put on the loopback interface while KEDA runs (root needed,
as for the pod network), unless a pod network's bridge already holds it.
"""

import atexit
import base64
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from troughfill_dev.localcluster.controlplane import ControlPlane
from troughfill_dev.localcluster.services import LOOPBACK, ManagedProcess, free_port, wait_until

KEDA_NAMESPACE = "keda"
ADAPTER_SERVICE = "keda-metrics-apiserver"
EXTERNAL_METRICS_API = "v1beta1.external.metrics.k8s.io"
SCALED_OBJECT_CRD = "scaledobjects.keda.sh"


def keda_bin_dir() -> Path:
    """Where scripts/setup_keda.sh left `keda`, `keda-adapter` and `crds/` ($TROUGHFILL_KEDA_BIN)."""
    found = os.environ.get("TROUGHFILL_KEDA_BIN")
    if not found:
        raise FileNotFoundError("TROUGHFILL_KEDA_BIN is not set: source scripts/setup_keda.sh")
    return Path(found)


@dataclass
class Keda:
    plane: ControlPlane
    operator: ManagedProcess
    adapter: ManagedProcess
    address_added: str | None
    """The node address this put on the loopback interface (removed on stop), if any."""

    def stop(self) -> None:
        for process in (self.adapter, self.operator):
            process.stop(timeout=10)
        for path in (
            f"/apis/apiregistration.k8s.io/v1/apiservices/{EXTERNAL_METRICS_API}",
            f"/api/v1/namespaces/{KEDA_NAMESPACE}/services/{ADAPTER_SERVICE}",
        ):
            self.plane.delete(path)
        if self.address_added:
            _ip("addr", "del", f"{self.address_added}/32", "dev", "lo")


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


def _hold_node_address(address: str) -> str | None:
    """Put `address` on lo unless some interface has it already; returns it if it was added."""
    shown = _ip("-o", "addr", "show")
    if f"inet {address}/" in shown.stdout:
        return None
    done = _ip("addr", "add", f"{address}/32", "dev", "lo")
    if done.returncode != 0:
        raise RuntimeError(
            f"cannot put {address} on lo for KEDA's APIService endpoint: {done.stderr.strip()}"
        )
    atexit.register(_ip, "addr", "del", f"{address}/32", "dev", "lo")  # even if stop() never runs
    return address


def _adapter_endpoint(plane: ControlPlane, address: str, port: int) -> None:
    """The Service and EndpointSlice the aggregation layer resolves, and the APIService."""
    service = f"/api/v1/namespaces/{KEDA_NAMESPACE}/services"
    plane.apply_json(
        service,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": ADAPTER_SERVICE, "namespace": KEDA_NAMESPACE},
            "spec": {"ports": [{"name": "https", "port": 443, "targetPort": port}]},
        },
    )
    plane.apply_json(
        f"/apis/discovery.k8s.io/v1/namespaces/{KEDA_NAMESPACE}/endpointslices",
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{ADAPTER_SERVICE}-host",
                "namespace": KEDA_NAMESPACE,
                "labels": {"kubernetes.io/service-name": ADAPTER_SERVICE},
            },
            "addressType": "IPv4",
            "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [address], "conditions": {"ready": True}}],
        },
    )
    plane.apply_json(
        "/apis/apiregistration.k8s.io/v1/apiservices",
        {
            "apiVersion": "apiregistration.k8s.io/v1",
            "kind": "APIService",
            "metadata": {"name": EXTERNAL_METRICS_API},
            "spec": {
                "service": {"name": ADAPTER_SERVICE, "namespace": KEDA_NAMESPACE, "port": 443},
                "group": "external.metrics.k8s.io",
                "version": "v1beta1",
                "caBundle": _b64_file(plane.ca),
                "groupPriorityMinimum": 100,
                "versionPriority": 100,
            },
        },
    )


def _b64_file(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def start_keda(plane: ControlPlane, workdir: Path, timeout: float = 120) -> Keda:
    """KEDA's CRDs, operator and metrics API server; returns once the external metrics API answers
    through the API server (APIService Available)."""
    bin_dir = keda_bin_dir()
    workdir.mkdir(parents=True, exist_ok=True)
    plane.kubectl("apply", "--server-side", "-f", str(bin_dir / "crds"))
    plane.wait_established([SCALED_OBJECT_CRD])
    if plane.get(f"/api/v1/namespaces/{KEDA_NAMESPACE}", timeout=15, attempts=3)[0] == 404:
        plane.apply_json(
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": KEDA_NAMESPACE}},
        )

    address = plane.node_address
    added = _hold_node_address(address)
    # One certificate for both ends of the operator <-> adapter gRPC link (mutual TLS, KEDA's
    # `--cert-dir` layout: ca.crt, tls.crt, tls.key) and for the adapter's serving port, which
    # the aggregation layer verifies as <service>.<namespace>.svc against the APIService's caBundle.
    certs = workdir / "certs"
    certs.mkdir(exist_ok=True)
    identity = plane.pki.issue(
        "keda",
        "/CN=keda",
        server=True,
        client=True,
        sans=(
            f"IP:{address}",
            f"DNS:{ADAPTER_SERVICE}.{KEDA_NAMESPACE}.svc",
            f"DNS:{ADAPTER_SERVICE}.{KEDA_NAMESPACE}.svc.cluster.local",
        ),
    )
    (certs / "ca.crt").write_bytes(plane.ca.read_bytes())
    (certs / "tls.crt").write_bytes(identity.cert.read_bytes())
    (certs / "tls.key").write_bytes(identity.key.read_bytes())
    authorities = workdir / "ca"  # CAs its scalers trust: the cluster's (every file is read as one)
    authorities.mkdir(exist_ok=True)
    (authorities / "ca.crt").write_bytes(plane.ca.read_bytes())

    grpc_port, adapter_port = free_port(), free_port()
    env = {
        "KUBECONFIG": str(plane.kubeconfig),
        "POD_NAMESPACE": KEDA_NAMESPACE,
        "KEDA_CLUSTER_OBJECT_NAMESPACE": KEDA_NAMESPACE,
        "WATCH_NAMESPACE": "",
    }
    operator = ManagedProcess(
        "keda-operator",
        [
            str(bin_dir / "keda"),
            f"--kubeconfig={plane.kubeconfig}",
            f"--metrics-bind-address={LOOPBACK}:{free_port()}",
            f"--health-probe-bind-address={LOOPBACK}:{free_port()}",
            f"--metrics-service-bind-address={LOOPBACK}:{grpc_port}",
            f"--cert-dir={certs}",
            "--enable-cert-rotation=false",
            "--enable-webhook-patching=false",
            "--enable-apiservice-patching=false",
            "--leader-elect=false",
            "--zap-log-level=info",
            "--zap-encoder=console",
            f"--ca-dir={authorities}",
        ],
        workdir / "operator",
        env=env,
    )
    try:
        adapter = ManagedProcess(
            "keda-adapter",
            [
                str(bin_dir / "keda-adapter"),
                f"--lister-kubeconfig={plane.kubeconfig}",
                f"--authentication-kubeconfig={plane.kubeconfig}",
                f"--authorization-kubeconfig={plane.kubeconfig}",
                f"--bind-address={address}",
                f"--secure-port={adapter_port}",
                f"--tls-cert-file={certs / 'tls.crt'}",
                f"--tls-private-key-file={certs / 'tls.key'}",
                f"--cert-dir={certs}",
                f"--metrics-service-address={LOOPBACK}:{grpc_port}",
                f"--port={free_port()}",
                "--zap-log-level=info",
            ],
            workdir / "adapter",
            env=env,
        )
    except BaseException:
        operator.stop()
        raise
    keda = Keda(plane, operator, adapter, added)
    try:
        _adapter_endpoint(plane, address, adapter_port)

        def available() -> bool:
            operator.check_alive()
            adapter.check_alive()
            # A slow API server (KEDA starting on a busy machine) is asked again.
            return plane.get("/apis/external.metrics.k8s.io/v1beta1", timeout=15, attempts=3)[0] == 200

        wait_until(
            available, timeout, "KEDA's external metrics API through the aggregation layer", interval=0.5
        )
    except BaseException:
        keda.stop()
        raise
    return keda


def wait_scaled_object_ready(plane: ControlPlane, namespace: str, name: str, timeout: float = 60) -> None:
    """Until KEDA reports the ScaledObject Ready (its HPA made, its trigger read)."""

    def ready() -> bool:
        status, body = plane.get(f"/apis/keda.sh/v1alpha1/namespaces/{namespace}/scaledobjects/{name}")
        if status != 200:
            return False
        conditions = (json.loads(body).get("status") or {}).get("conditions") or []
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

    wait_until(ready, timeout, f"ScaledObject {namespace}/{name} Ready", interval=0.5)
