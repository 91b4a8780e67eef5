"""A whole local troughfill cluster for the demo and the benchmarks: the control plane, the node
agent, the CRDs and PriorityClasses applied with kubectl, and the operator as its own process."""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from kubernetes import client, config

from troughfill_dev import paths
from troughfill_dev.localcluster.controlplane import (
    ControlPlane,
    start_control_plane,
    start_node_agent,
)
from troughfill_dev.localcluster.services import (
    LedgerServer,
    ManagedProcess,
    http_ok,
    start_ledger,
    wait_until,
)


@dataclass
class LocalCluster:
    plane: ControlPlane
    agent: ManagedProcess
    api: client.ApiClient

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        return self.plane.kubectl(*args, stdin=stdin, timeout=60)

    def stop(self) -> None:
        self.agent.stop(timeout=15)  # its pods first: they are processes of this machine
        self.plane.stop()


def create_namespace(api: client.ApiClient, name: str, timeout: float = 30) -> None:
    """A namespace ready for pods: its default service account exists (the ServiceAccount
    admission plugin refuses pods until the controller manager has made it)."""
    core = client.CoreV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))

    def ready() -> bool:
        return bool(core.list_namespaced_service_account(name, field_selector="metadata.name=default").items)

    wait_until(ready, timeout, f"the default service account in {name}", interval=0.1)


def start_local_cluster(workdir: Path, *, nodes: int, gpus: int) -> LocalCluster:
    """Control plane, `nodes` Ready nodes of `gpus` GPUs, troughfill's CRDs (applied as users
    apply them: `kubectl apply --server-side -k manifests/crds`) and PriorityClasses, established."""
    plane = start_control_plane(workdir / "plane")
    try:
        agent = start_node_agent(plane, workdir / "node", nodes=nodes, gpus=gpus, python=sys.executable)
    except BaseException:
        plane.stop()
        raise
    cluster = LocalCluster(plane, agent, config.new_client_from_config(config_file=str(plane.kubeconfig)))
    try:
        cluster.kubectl("apply", "--server-side", "-k", str(paths.manifests() / "crds"))
        cluster.kubectl("apply", "-f", str(paths.manifests() / "base" / "priorityclass.yaml"))
        cluster.plane.wait_established()
    except BaseException:
        cluster.stop()
        raise
    return cluster


@dataclass
class OperatorProcess(ManagedProcess):
    """The operator's process, and the ledger service it started for its workers (stopped with it)."""

    ledger: LedgerServer | None = None

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        if self.ledger is not None:
            self.ledger.stop()


def start_operator(
    workdir: Path,
    cluster: LocalCluster,
    *,
    redis_url: str,
    prometheus_url: str,
    interval: float,
    metrics_port: int = 0,
    extra_env: dict[str, str] | None = None,
    ledger: LedgerServer | None = None,
) -> OperatorProcess:
    """`troughfill operator --standalone` on this cluster, its worker pods running
    `python -m troughfill.cli` of this interpreter and calling `ledger` (a ledger service of the
    operator's own when None, stopped with it); returns once it serves (or has started)."""
    serving = ledger if ledger is not None else start_ledger(workdir / "ledger", redis_url)
    env = {
        "KUBECONFIG": str(cluster.plane.kubeconfig),
        "TROUGHFILL_REDIS_URL": redis_url,
        "TROUGHFILL_WORKER_LEDGER_URL": serving.url,
        "TROUGHFILL_PROMETHEUS_URL": prometheus_url,
        "TROUGHFILL_RECONCILE_INTERVAL_SECONDS": str(interval),
        "TROUGHFILL_METRICS_PORT": str(metrics_port),
        "TROUGHFILL_HEALTH_PORT": "0",
        "TROUGHFILL_WORKER_COMMAND": json.dumps([sys.executable, "-m", "troughfill.cli"]),
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    operator = OperatorProcess(
        "operator",
        [sys.executable, "-m", "troughfill.cli", "operator", "--standalone"],
        workdir,
        env=env,
        ledger=None if ledger is not None else serving,
    )

    def started() -> bool:
        operator.check_alive()
        if metrics_port:
            return http_ok(f"http://127.0.0.1:{metrics_port}/metrics")
        return "Activity 'configure' succeeded" in operator.log_tail(200)

    try:
        wait_until(started, 60, "the operator", interval=0.2)
    except BaseException:
        operator.stop(timeout=30)
        raise
    return operator
