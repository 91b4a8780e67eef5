"""The Kubernetes adapter: the reads and writes the operator makes besides Kopf's own."""

import threading
import time
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from troughfill import constants
from troughfill.api.batchinference import BatchInference
from troughfill.api.batchpool import BatchPool
from troughfill.api.modeltemplate import ModelTemplate
from troughfill.kube import calls
from troughfill.kube.informer import Informer
from troughfill.kube.podstate import WorkerPod, is_deleting, is_finished, is_ready, ready_since


def api_client() -> client.ApiClient:
    """The operator's credentials: its pod's service account in a cluster (the token the
    kubelet projects), else $KUBECONFIG or ~/.kube/config."""
    try:
        config.load_incluster_config()
        return client.ApiClient()
    except config.ConfigException:
        return config.new_client_from_config()


class KubeCluster:
    """The controller's Cluster (controller.ports) through the Kubernetes API: troughfill's
    cluster-scoped objects, jobs, nodes, online pods and worker pods (blocking; call from a thread)."""

    def __init__(self, api: client.ApiClient) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.scheduling = client.SchedulingV1Api(api)

    def _get_cluster_object(self, plural: str, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self.custom.get_cluster_custom_object(
                constants.API_GROUP, constants.API_VERSION, plural, name
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return found

    def template(self, name: str) -> ModelTemplate | None:
        found = self._get_cluster_object(ModelTemplate.crd.plural, name)
        return ModelTemplate.model_validate(found) if found else None

    def pool(self, name: str) -> BatchPool | None:
        found = self._get_cluster_object(BatchPool.crd.plural, name)
        return BatchPool.model_validate(found) if found else None

    def jobs(self) -> list[dict[str, Any]]:
        listed: dict[str, Any] = self.custom.list_cluster_custom_object(
            constants.API_GROUP, constants.API_VERSION, "batchinferences"
        )
        items: list[dict[str, Any]] = listed.get("items", [])
        return items

    def node_gpus(self, node_selector: dict[str, str], resource: str) -> int:
        selector = ",".join(f"{k}={v}" for k, v in sorted(node_selector.items()))
        return _schedulable_gpus(self.core.list_node(label_selector=selector or None).items, resource)

    def online_gpus(self, label_selector: str, namespaces: list[str], resource: str) -> tuple[float, float]:
        """GPUs requested by matching pods: (placed on a node and not finished, not placed yet)."""
        if not label_selector:
            return 0.0, 0.0
        pods: list[Any] = []
        if namespaces:
            for namespace in namespaces:
                pods += self.core.list_namespaced_pod(namespace, label_selector=label_selector).items
        else:
            pods = self.core.list_pod_for_all_namespaces(label_selector=label_selector).items
        return _requested_gpus(pods, resource)

    def priority_value(self, name: str) -> int:
        try:
            found = self.scheduling.read_priority_class(name)
        except ApiException as error:
            if error.status == 404:
                return 0
            raise
        return int(found.value)

    def _worker_pods(self, pool: str) -> list[Any]:
        selector = f"{constants.LABEL_COMPONENT}={constants.COMPONENT_WORKER},{constants.LABEL_POOL}={pool}"
        pods: list[Any] = self.core.list_pod_for_all_namespaces(label_selector=selector).items
        return pods

    def worker_pods(self, pool: str) -> list[WorkerPod]:
        return [_worker_pod(pod) for pod in self._worker_pods(pool)]

    def patch_job_status(self, namespace: str, name: str, status: dict[str, Any]) -> bool:
        """Merge `status` into a BatchInference's status subresource; False if the job is gone."""
        try:
            self.custom.patch_namespaced_custom_object_status(
                constants.API_GROUP,
                constants.API_VERSION,
                namespace,
                BatchInference.crd.plural,
                name,
                {"status": status},
            )
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        return True

    def create_pod(self, manifest: dict[str, Any]) -> None:
        self.core.create_namespaced_pod(manifest["metadata"]["namespace"], manifest)

    def delete_pod(self, namespace: str, name: str) -> None:
        """A graceful delete: the pod's own terminationGracePeriodSeconds applies."""
        try:
            self.core.delete_namespaced_pod(name, namespace)
        except ApiException as error:
            if error.status != 404:
                raise

    def annotate_pod(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        """Merge annotations into a pod (gone already: nothing to do)."""
        try:
            self.core.patch_namespaced_pod(name, namespace, {"metadata": {"annotations": annotations}})
        except ApiException as error:
            if error.status != 404:
                raise

    def missing_priority_classes(self, names: list[str]) -> list[str]:
        missing = []
        for name in names:
            try:
                self.scheduling.read_priority_class(name)
            except ApiException as error:
                if error.status != 404:
                    raise
                missing.append(name)
        return missing

    def delete_pool_workers(self, pool: str) -> int:
        """Gracefully delete every worker pod of a pool; how many there were."""
        pods = [p for p in self._worker_pods(pool) if not is_deleting(p)]
        for pod in pods:
            self.delete_pod(pod.metadata.namespace, pod.metadata.name)
        return len(pods)

    def delete_job_workers(self, namespace: str, job_uid: str) -> int:
        """Gracefully delete every worker pod of a job; how many there were."""
        selector = (
            f"{constants.LABEL_COMPONENT}={constants.COMPONENT_WORKER},{constants.LABEL_JOB_UID}={job_uid}"
        )
        pods = self.core.list_namespaced_pod(namespace, label_selector=selector).items
        for pod in pods:
            self.delete_pod(namespace, pod.metadata.name)
        return len(pods)

    def secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        return calls.secret_data(self.core, namespace, name)

    def create_secret(self, manifest: dict[str, Any]) -> None:
        try:
            self.core.create_namespaced_secret(manifest["metadata"]["namespace"], manifest)
        except ApiException as error:
            if error.status != 409:
                raise


def _schedulable_gpus(nodes: list[Any], resource: str) -> int:
    """Allocatable GPUs of the Ready nodes that take pods."""
    return sum(
        int((node.status.allocatable or {}).get(resource, "0"))
        for node in nodes
        if not node.spec.unschedulable and is_ready(node)
    )


def _requested_gpus(pods: list[Any], resource: str) -> tuple[float, float]:
    """GPUs the pods request: (placed on a node and not finished, not placed yet)."""
    placed = pending = 0.0
    for pod in pods:
        if is_finished(pod):
            continue
        gpus = sum(
            float(((c.resources.requests or {}) if c.resources else {}).get(resource, "0"))
            for c in pod.spec.containers
        )
        if pod.spec.node_name:
            placed += gpus
        else:
            pending += gpus
    return placed, pending


def _worker_pod(pod: Any) -> WorkerPod:
    meta = pod.metadata
    created = meta.creation_timestamp
    return WorkerPod(
        namespace=meta.namespace,
        name=meta.name,
        phase=(pod.status.phase if pod.status else None) or "Pending",
        ready=is_ready(pod),
        deleting=is_deleting(pod),
        created_at=created.timestamp() if created else time.time(),
        ready_at=ready_since(pod),
        deletion_cost=(meta.annotations or {}).get(constants.ANNOTATION_POD_DELETION_COST),
        owner_uid=next(
            (
                ref.uid
                for ref in meta.owner_references or []
                if ref.controller
                and ref.kind == constants.KIND_BATCH_INFERENCE
                and ref.api_version.split("/")[0] == constants.API_GROUP
            ),
            "",
        ),
    )


class WatchedCluster(KubeCluster):
    """KubeCluster whose reads, made by every pool cycle every few seconds, come from informers
    (kube.informer): one watch per kind instead of listing every job and worker pod of the
    cluster each cycle, so the API calls a cycle makes grow with what changes (pods created,
    deleted, annotated), not with how many objects there are. Until an informer is current (at
    start, or while it lists again after losing its watch) its reads go to the API as before.
    Writes always go to the API."""

    def __init__(self, api: client.ApiClient) -> None:
        super().__init__(api)
        group = {"group": constants.API_GROUP, "version": constants.API_VERSION}
        custom = self.custom.list_cluster_custom_object
        self._jobs = Informer[dict[str, Any]](
            "batchinferences", custom, _same, plural="batchinferences", **group
        )
        self._templates = Informer[dict[str, Any]](
            "modeltemplates", custom, _same, plural=ModelTemplate.crd.plural, **group
        )
        self._pools = Informer[dict[str, Any]](
            "batchpools", custom, _same, plural=BatchPool.crd.plural, **group
        )
        self._workers = Informer[tuple[str, WorkerPod]](
            "worker pods",
            self.core.list_pod_for_all_namespaces,
            _pool_and_worker,
            label_selector=f"{constants.LABEL_COMPONENT}={constants.COMPONENT_WORKER}",
        )
        self._nodes = Informer[Any]("nodes", self.core.list_node, _same)
        self._classes = Informer[tuple[str, int]](
            "priorityclasses", self.scheduling.list_priority_class, _class_value
        )
        self._online: dict[str, Informer[Any]] = {}
        self._online_lock = threading.Lock()

    def informers(self) -> list[Informer[Any]]:
        with self._online_lock:
            online = list(self._online.values())
        return [self._jobs, self._templates, self._pools, self._workers, self._nodes, self._classes, *online]

    def start(self) -> "WatchedCluster":
        for informer in self.informers():
            informer.start()
        return self

    def stop(self) -> None:
        for informer in self.informers():
            informer.stop()

    def jobs(self) -> list[dict[str, Any]]:
        return self._jobs.items() if self._jobs.synced else super().jobs()

    def template(self, name: str) -> ModelTemplate | None:
        """From the cache; one it lacks is looked up in the API (a watch may lag a template
        applied together with its job: "not found" must be the API's answer, not the cache's)."""
        found = self._templates.get(name) if self._templates.synced else None
        return ModelTemplate.model_validate(found) if found else super().template(name)

    def pool(self, name: str) -> BatchPool | None:
        found = self._pools.get(name) if self._pools.synced else None
        return BatchPool.model_validate(found) if found else super().pool(name)

    def create_pod(self, manifest: dict[str, Any]) -> None:
        created = self.core.create_namespaced_pod(manifest["metadata"]["namespace"], manifest)
        self._workers.put(created)  # the next cycle counts it even if the watch has not yet

    def worker_pods(self, pool: str) -> list[WorkerPod]:
        if not self._workers.synced:
            return super().worker_pods(pool)
        return [pod for of_pool, pod in self._workers.items() if of_pool == pool]

    def node_gpus(self, node_selector: dict[str, str], resource: str) -> int:
        if not self._nodes.synced:
            return super().node_gpus(node_selector, resource)
        wanted = node_selector.items()
        return _schedulable_gpus(
            [n for n in self._nodes.items() if wanted <= (n.metadata.labels or {}).items()], resource
        )

    def priority_value(self, name: str) -> int:
        if not self._classes.synced:
            return super().priority_value(name)
        found = self._classes.get(name)
        return found[1] if found else 0

    def missing_priority_classes(self, names: list[str]) -> list[str]:
        if not self._classes.synced:
            return super().missing_priority_classes(names)
        return [name for name in names if self._classes.get(name) is None]

    def online_gpus(self, label_selector: str, namespaces: list[str], resource: str) -> tuple[float, float]:
        """From a watch of the selector's pods, cluster-wide (one per distinct selector, made on
        first use; the namespaces are picked here)."""
        if not label_selector:
            return 0.0, 0.0
        with self._online_lock:
            informer = self._online.get(label_selector)
            if informer is None:
                informer = Informer[Any](
                    f"online pods {label_selector}",
                    self.core.list_pod_for_all_namespaces,
                    _same,
                    label_selector=label_selector,
                ).start()
                self._online[label_selector] = informer
        if not informer.synced:
            return super().online_gpus(label_selector, namespaces, resource)
        pods = informer.items()
        if namespaces:
            pods = [pod for pod in pods if pod.metadata.namespace in namespaces]
        return _requested_gpus(pods, resource)


def _same(item: Any) -> Any:
    return item


def _pool_and_worker(pod: Any) -> tuple[str, WorkerPod]:
    return (pod.metadata.labels or {}).get(constants.LABEL_POOL, ""), _worker_pod(pod)


def _class_value(found: Any) -> tuple[str, int]:
    return found.metadata.name, int(found.value)
