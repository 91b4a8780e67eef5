"""What the three custom resources have in common: object metadata and their CRD identity."""

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from troughfill import constants
from troughfill.api.base import ApiModel
from troughfill.api.types import DnsSubdomain


class Scope(StrEnum):
    NAMESPACED = "Namespaced"
    CLUSTER = "Cluster"


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    json_path: str
    type: str = "string"
    description: str = ""
    priority: int = 0


@dataclass(frozen=True)
class CrdInfo:
    """The parts of a CustomResourceDefinition that are not the schema."""

    kind: str
    plural: str
    singular: str
    scope: Scope
    short_names: tuple[str, ...] = ()
    printer_columns: tuple[PrinterColumn, ...] = ()
    categories: tuple[str, ...] = field(default=("troughfill",))

    @property
    def name(self) -> str:
        return f"{self.plural}.{constants.API_GROUP}"


class ObjectMeta(BaseModel):
    """The subset of metav1.ObjectMeta troughfill reads; everything else passes through untouched."""

    model_config = ConfigDict(extra="allow")

    name: DnsSubdomain
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    resourceVersion: str | None = None  # noqa: N815 - Kubernetes' own spelling
    creationTimestamp: datetime | None = None  # noqa: N815
    deletionTimestamp: datetime | None = None  # noqa: N815
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @property
    def ns(self) -> str:
        """The namespace, "default" when the object was read without one (as the API server defaults it)."""
        return self.namespace or "default"

    @property
    def key(self) -> str:
        """namespace/name: how the planner, metrics and logs name a namespaced object."""
        return f"{self.ns}/{self.name}"

    @property
    def uid_text(self) -> str:
        """The uid ("" for an object not yet stored: such an object has no ledger and no workers)."""
        return self.uid or ""


class Resource(ApiModel):
    """A whole custom object: apiVersion, kind, metadata, spec, status."""

    crd: ClassVar[CrdInfo]

    api_version: str = Field(default=constants.GROUP_VERSION, pattern=f"^{constants.GROUP_VERSION}$")
    kind: str
    metadata: ObjectMeta
