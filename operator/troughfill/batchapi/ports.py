"""What the Batch API needs from the cluster (blocking calls; the server runs them in threads)."""

from dataclasses import dataclass, field
from typing import Any, Protocol

from troughfill.api.batchpool import StorageGrant

SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"


@dataclass(frozen=True)
class Caller:
    """Who a token belongs to, as TokenReview says."""

    username: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: dict[str, list[str]] = field(default_factory=dict)

    @property
    def own_namespace(self) -> str | None:
        """A ServiceAccount's namespace (system:serviceaccount:<namespace>:<name>); None for others."""
        if not self.username.startswith(SERVICE_ACCOUNT_PREFIX):
            return None
        namespace, _, _ = self.username[len(SERVICE_ACCOUNT_PREFIX) :].partition(":")
        return namespace or None


@dataclass(frozen=True)
class Rejected:
    """A token the cluster did not accept, and why (TokenReview's error)."""

    reason: str


class Reviews(Protocol):
    def authenticate(self, token: str) -> Caller | Rejected: ...

    def allowed(self, caller: Caller, namespace: str, verb: str) -> bool:
        """SubjectAccessReview: may the caller `verb` batchinferences in `namespace`?"""
        ...


class Conflict(Exception):  # noqa: N818 - what the API server said
    """The API server refused a write (HTTP 409/422), with its message."""


class Jobs(Protocol):
    def create(self, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]: ...

    def get(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def in_namespace(self, namespace: str) -> list[dict[str, Any]]: ...

    def cancel(self, namespace: str, name: str, requested_at: int) -> dict[str, Any] | None:
        """Set spec.cancel, noting when it was asked (None: no such job)."""
        ...

    def default_template(self, namespace: str) -> str | None:
        """The template a namespace's batches use unless their metadata names one (an admin's
        annotation on the Namespace)."""
        ...

    def grants(self, namespace: str) -> list[StorageGrant]:
        """The storage grants the pools give the namespace, pools in name order."""
        ...

    def secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        """A Secret's data, decoded (the API reads storage grants' Secrets, in the operator's
        namespace; None: no such Secret)."""
        ...
