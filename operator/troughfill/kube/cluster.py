"""The cluster adapter: the few reads and writes the operator makes besides Kopf's own."""

from typing import Any, Protocol

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from troughfill import constants
from troughfill.api.batchpool import BatchPool
from troughfill.api.modeltemplate import ModelTemplate


class Cluster(Protocol):
    def template(self, name: str) -> ModelTemplate | None: ...

    def pool(self, name: str) -> BatchPool | None: ...


class KubeCluster:
    """Cluster-scoped troughfill objects through the Kubernetes API (blocking; call from a thread)."""

    def __init__(self, api: client.ApiClient) -> None:
        self.custom = client.CustomObjectsApi(api)

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
