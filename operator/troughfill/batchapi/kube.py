"""The Batch API's cluster calls (troughfill.batchapi.ports) through the Kubernetes API.

The API's own ServiceAccount reviews tokens and access (tokenreviews, subjectaccessreviews:
create), reads and writes batchinferences, reads pools and namespaces, and reads the grant
Secrets in its own namespace. What a caller may do is decided by SubjectAccessReview before any
of these runs on its behalf.
"""

import hashlib
import threading
import time
from collections import OrderedDict
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from troughfill import constants
from troughfill.api.batchinference import BatchInference
from troughfill.api.batchpool import BatchPool, StorageGrant
from troughfill.api.storage import effective
from troughfill.batchapi.mapping import CANCEL_ANNOTATION, DEFAULT_TEMPLATE_ANNOTATION
from troughfill.batchapi.ports import Caller, Conflict, Rejected
from troughfill.kube.calls import api_message, secret_data

REVIEW_CACHE_SECONDS = 10.0
"""A token's review and a caller's access are reused this long: one API call per client
request would double the API server's load under a polling client; a revoked token or a
removed RoleBinding takes effect within this."""


CACHE_ENTRIES = 10_000


class TimedCache:
    """Answers kept `ttl` seconds, at most `size` of them: past that the oldest goes (a flood of
    new tokens evicts old answers one by one, instead of clearing every caller's at once)."""

    def __init__(self, ttl: float, size: int = CACHE_ENTRIES) -> None:
        self.ttl = ttl
        self.size = size
        self._items: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Any:
        with self._lock:
            found = self._items.get(key)
            if found is None or time.monotonic() - found[0] > self.ttl:
                return None
            return found[1]

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._items.pop(key, None)
            self._items[key] = (time.monotonic(), value)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class KubeReviews:
    def __init__(self, api: client.ApiClient, cache_seconds: float = REVIEW_CACHE_SECONDS) -> None:
        self.auth = client.AuthenticationV1Api(api)
        self.authz = client.AuthorizationV1Api(api)
        self._tokens = TimedCache(cache_seconds)
        self._access = TimedCache(cache_seconds)

    def authenticate(self, token: str) -> Caller | Rejected:
        key = hashlib.sha256(token.encode()).hexdigest()
        cached = self._tokens.get(key)
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        review = self.auth.create_token_review(
            client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token))
        )
        status = review.status
        found: Caller | Rejected
        if status is None or not status.authenticated or status.user is None:
            found = Rejected((status.error if status else None) or "the cluster did not accept the token")
        else:
            user = status.user
            found = Caller(
                username=user.username or "",
                uid=user.uid or "",
                groups=tuple(user.groups or ()),
                extra={k: list(v) for k, v in (user.extra or {}).items()},
            )
        self._tokens.put(key, found)
        return found

    def allowed(self, caller: Caller, namespace: str, verb: str) -> bool:
        key = "\x00".join((caller.username, caller.uid, ",".join(caller.groups), namespace, verb))
        cached = self._access.get(key)
        if cached is not None:
            return bool(cached)
        review = self.authz.create_subject_access_review(
            client.V1SubjectAccessReview(
                spec=client.V1SubjectAccessReviewSpec(
                    user=caller.username,
                    uid=caller.uid or None,
                    groups=list(caller.groups),
                    extra=caller.extra or None,
                    resource_attributes=client.V1ResourceAttributes(
                        namespace=namespace,
                        verb=verb,
                        group=constants.API_GROUP,
                        resource=BatchInference.crd.plural,
                    ),
                )
            )
        )
        allowed = bool(review.status and review.status.allowed)
        self._access.put(key, allowed)
        return allowed


class KubeJobs:
    def __init__(self, api: client.ApiClient) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)

    def create(self, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
        try:
            made: dict[str, Any] = self.custom.create_namespaced_custom_object(
                constants.API_GROUP, constants.API_VERSION, namespace, BatchInference.crd.plural, manifest
            )
        except ApiException as error:
            if error.status in {409, 422, 403}:
                raise Conflict(api_message(error)) from error
            raise
        return made

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self.custom.get_namespaced_custom_object(
                constants.API_GROUP, constants.API_VERSION, namespace, BatchInference.crd.plural, name
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return found

    def in_namespace(self, namespace: str) -> list[dict[str, Any]]:
        listed: dict[str, Any] = self.custom.list_namespaced_custom_object(
            constants.API_GROUP, constants.API_VERSION, namespace, BatchInference.crd.plural
        )
        return list(listed.get("items", []))

    def cancel(self, namespace: str, name: str, requested_at: int) -> dict[str, Any] | None:
        try:
            patched: dict[str, Any] = self.custom.patch_namespaced_custom_object(
                constants.API_GROUP,
                constants.API_VERSION,
                namespace,
                BatchInference.crd.plural,
                name,
                {
                    "metadata": {"annotations": {CANCEL_ANNOTATION: str(requested_at)}},
                    "spec": {"cancel": True},
                },
            )
        except ApiException as error:
            if error.status == 404:
                return None
            if error.status in {409, 422}:
                raise Conflict(api_message(error)) from error
            raise
        return patched

    def default_template(self, namespace: str) -> str | None:
        try:
            found = self.core.read_namespace(namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        annotations = found.metadata.annotations or {}
        return annotations.get(DEFAULT_TEMPLATE_ANNOTATION) or None

    def grants(self, namespace: str) -> list[StorageGrant]:
        listed: dict[str, Any] = self.custom.list_cluster_custom_object(
            constants.API_GROUP, constants.API_VERSION, BatchPool.crd.plural
        )
        pools = sorted(
            (BatchPool.model_validate(item) for item in listed.get("items", [])),
            key=lambda p: p.metadata.name,
        )
        found: list[StorageGrant] = []
        for pool in pools:
            quota = next((q for q in pool.spec.quotas if q.namespace == namespace), None)
            if quota is not None:
                found += quota.storage
            elif pool.spec.default_quota is not None:
                found += effective(pool.spec.default_quota.storage, namespace)
        return found

    def secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        return secret_data(self.core, namespace, name)
