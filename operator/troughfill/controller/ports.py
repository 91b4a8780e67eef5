"""What the controller needs of the cluster, as a Protocol: kube.adapter.KubeCluster implements it
against the Kubernetes API; unit tests implement it in memory. Calls block (run them in a thread)."""

__all__ = ["Cluster", "Secrets", "WorkerPod"]

from typing import Any, Protocol

from troughfill.api.batchpool import BatchPool
from troughfill.api.modeltemplate import ModelTemplate
from troughfill.kube.podstate import WorkerPod


class Secrets(Protocol):
    def secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        """A Secret's data, decoded (None: no such Secret)."""
        ...


class Cluster(Secrets, Protocol):
    def template(self, name: str) -> ModelTemplate | None: ...

    def pool(self, name: str) -> BatchPool | None: ...

    def jobs(self) -> list[dict[str, Any]]:
        """Every BatchInference, as the API returns it (parsed by the caller)."""
        ...

    def node_gpus(self, node_selector: dict[str, str], resource: str) -> int:
        """Allocatable GPUs of the Ready, schedulable nodes the selector picks."""
        ...

    def online_gpus(self, label_selector: str, namespaces: list[str], resource: str) -> tuple[float, float]:
        """GPUs requested by online pods: (placed on a node, not placed yet)."""
        ...

    def priority_value(self, name: str) -> int: ...

    def missing_priority_classes(self, names: list[str]) -> list[str]: ...

    def worker_pods(self, pool: str) -> list[WorkerPod]: ...

    def create_pod(self, manifest: dict[str, Any]) -> None: ...

    def delete_pod(self, namespace: str, name: str) -> None:
        """A graceful delete (gone already: nothing to do)."""
        ...

    def annotate_pod(self, namespace: str, name: str, annotations: dict[str, str]) -> None: ...

    def delete_pool_workers(self, pool: str) -> int: ...

    def delete_job_workers(self, namespace: str, job_uid: str) -> int: ...

    def create_secret(self, manifest: dict[str, Any]) -> None:
        """Create a Secret (one that exists already is left as it is)."""
        ...
