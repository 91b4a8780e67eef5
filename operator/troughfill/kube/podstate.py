"""What a Pod's (or a Node's) status says, written once: ready, finished, being deleted; and a
batch worker pod as the controller sees it."""

from dataclasses import dataclass
from typing import Any

FINISHED_PHASES = frozenset({"Succeeded", "Failed"})


def is_ready(obj: Any) -> bool:
    """The Ready condition is True (a kubernetes client V1Pod or V1Node)."""
    conditions = (obj.status.conditions if obj.status else None) or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def ready_since(obj: Any) -> float | None:
    """When the Ready condition last turned True (seconds since the epoch), None when it is not
    True or says no time."""
    conditions = (obj.status.conditions if obj.status else None) or []
    for c in conditions:
        if c.type == "Ready" and c.status == "True" and c.last_transition_time is not None:
            return float(c.last_transition_time.timestamp())
    return None


def is_finished(pod: Any) -> bool:
    """The pod's containers have all ended for good: Succeeded or Failed."""
    return bool(pod.status and pod.status.phase in FINISHED_PHASES)


def is_deleting(obj: Any) -> bool:
    """A graceful delete is under way."""
    return obj.metadata.deletion_timestamp is not None


@dataclass(frozen=True)
class WorkerPod:
    """A batch worker pod as the controller sees it (the adapter reads it from the API)."""

    namespace: str
    name: str
    phase: str
    ready: bool
    deleting: bool
    created_at: float
    """Seconds since the epoch."""
    ready_at: float | None = None
    """When its Ready condition last turned True (seconds since the epoch; None: not Ready)."""
    deletion_cost: str | None = None
    """Its controller.kubernetes.io/pod-deletion-cost annotation."""
    owner_uid: str = ""
    """The uid of the BatchInference that controls it (its ownerReference; "" when none). Owner
    references never cross namespaces, so (namespace, owner_uid) names the job a pod works for:
    a label alone can be set by anyone who may create pods."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED_PHASES

    @property
    def serving(self) -> bool:
        """Ready and not being stopped."""
        return self.ready and not self.deleting
