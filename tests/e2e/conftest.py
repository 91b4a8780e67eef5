"""End-to-end tier: a real Kubernetes control plane.

By default the harness starts one for the session (devenv.cluster: etcd, kube-apiserver,
kube-scheduler and kube-controller-manager v1.37.2 built from their Go modules by
scripts/setup_k8s.sh) and the node agent (devenv.nodeagent: two nodes with 8
`nvidia.com/gpu` each, pods run as local processes). With KUBECONFIG pointing at a file, the
same tests run unchanged against that cluster instead and no harness is started; checks
that only make sense with the node agent (local process ids) are skipped there.
"""

import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kopf.testing import KopfRunner
from kubernetes import client, config
from kubernetes.config import kube_config

from tests.conftest import REPO_ROOT
from troughfill import constants
from troughfill_dev.localcluster.controlplane import (
    ControlPlane,
    k8s_bin_dir,
    start_control_plane,
    start_node_agent,
)
from troughfill_dev.localcluster.nodeagent import GPU_RESOURCE
from troughfill_dev.localcluster.services import LedgerServer, RedisServer, start_ledger
from troughfill_dev.localcluster.services import wait_until as until
from troughfill_dev.localcluster.stack import create_namespace

GPUS_PER_NODE = 8


@dataclass
class Kube:
    kubeconfig: Path
    api: client.ApiClient
    plane: ControlPlane | None
    """None: an external cluster (KUBECONFIG)."""
    agent_workdir: Path | None

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def local(self) -> bool:
        return self.plane is not None

    def kubectl(self) -> str:
        if self.plane is not None:
            return str(k8s_bin_dir() / "kubectl")
        return "kubectl"


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    external = os.environ.get("KUBECONFIG")
    if external and Path(external).is_file():
        yield Kube(Path(external), config.new_client_from_config(config_file=external), None, None)
        return
    workdir = tmp_path_factory.mktemp("cluster")
    plane = start_control_plane(workdir / "plane")
    try:
        agent = start_node_agent(plane, workdir, nodes=2, gpus=GPUS_PER_NODE)
    except BaseException:
        plane.stop()
        raise
    api = config.new_client_from_config(config_file=str(plane.kubeconfig))
    try:
        print(f"\ncontrol plane ready in {plane.started_seconds:.1f}s; nodes ready after it")
        previous = os.environ.get("KUBECONFIG"), kube_config.KUBE_CONFIG_DEFAULT_LOCATION
        # For Kopf in this process and kubectl: the client library reads $KUBECONFIG once, at
        # import (before this fixture ran), so its default location is set too.
        os.environ["KUBECONFIG"] = kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(plane.kubeconfig)
        try:
            yield Kube(plane.kubeconfig, api, plane, workdir / "pods")
        finally:
            if previous[0] is None:
                os.environ.pop("KUBECONFIG", None)
            else:
                os.environ["KUBECONFIG"] = previous[0]
            kube_config.KUBE_CONFIG_DEFAULT_LOCATION = previous[1]
    finally:
        agent.stop(timeout=15)
        plane.stop()


@pytest.fixture
def namespace(kube: Kube) -> Iterator[str]:
    """A fresh namespace, ready for pods (its default service account exists, with a token where needed)."""
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    create_namespace(kube.api, name)
    yield name
    kube.core.delete_namespace(name)


@pytest.fixture
def gpu_node(kube: Kube) -> tuple[str, int]:
    """A schedulable node with GPUs: (name, GPUs allocatable)."""
    for node in kube.core.list_node().items:
        gpus = int((node.status.allocatable or {}).get(GPU_RESOURCE, "0"))
        if gpus > 0 and not node.spec.unschedulable:
            return node.metadata.name, gpus
    pytest.skip(f"no node with {GPU_RESOURCE}")


def kubectl(
    kube: Kube, *args: str, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [kube.kubectl(), "--kubeconfig", str(kube.kubeconfig), *args],
        input=stdin, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


@pytest.fixture(scope="session")
def crds(kube: Kube) -> None:
    """The CRDs as users install them (`kubectl apply --server-side -k manifests/crds`), CEL rules and all."""
    done = kubectl(kube, "apply", "--server-side", "-k", str(REPO_ROOT / "manifests" / "crds"))
    assert done.returncode == 0, done.stderr
    # The install's PriorityClasses (batch workers run at troughfill-batch).
    done = kubectl(kube, "apply", "-f", str(REPO_ROOT / "manifests" / "base" / "priorityclass.yaml"))
    assert done.returncode == 0, done.stderr
    extensions = client.ApiextensionsV1Api(kube.api)
    for name in ("batchinferences", "batchpools", "modeltemplates"):
        until(
            lambda n=name: any(
                c.type == "Established" and c.status == "True"
                for c in extensions.read_custom_resource_definition(
                    f"{n}.{constants.API_GROUP}"
                ).status.conditions
                or []
            ),
            30,
            f"CRD {name} established",
        )


LEDGERS: dict[str, LedgerServer] = {}
"""One ledger service per Redis for the session (started on first use, stopped at exit)."""


def ledger_service(redis_server: RedisServer) -> LedgerServer:
    """The ledger service in front of this Redis: the only way worker pods reach the ledger."""
    running = LEDGERS.get(redis_server.url)
    if running is None or not running.managed.running():
        running = LEDGERS[redis_server.url] = start_ledger(
            Path(tempfile.mkdtemp(prefix="ledger-")), redis_server.url
        )
    return running


def operator_settings(redis_server: RedisServer) -> dict[str, str]:
    """The operator's settings here: this Redis, its ledger service for the workers, half-second
    cycles, worker pods that run `python -m troughfill.cli`, no metrics or health endpoints
    (tests that want one set it)."""
    return {
        "TROUGHFILL_REDIS_URL": redis_server.url,
        "TROUGHFILL_WORKER_LEDGER_URL": ledger_service(redis_server).url,
        "TROUGHFILL_RECONCILE_INTERVAL_SECONDS": "0.5",
        "TROUGHFILL_METRICS_PORT": "0",
        "TROUGHFILL_HEALTH_PORT": "0",
        "TROUGHFILL_WORKER_COMMAND": json.dumps([sys.executable, "-m", "troughfill.cli"]),
    }


@pytest.fixture
def operator(
    kube: Kube, crds: None, namespace: str, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[KopfRunner]:
    for name, value in operator_settings(redis_server).items():
        monkeypatch.setenv(name, value)
    args = ["run", "--standalone", "--all-namespaces", "-m", "troughfill.handlers"]
    with KopfRunner(args, timeout=60) as runner:
        yield runner
    assert runner.exception is None, runner.output
