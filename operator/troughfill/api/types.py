"""Constrained scalar types shared by the three resources, and the Kubernetes shapes they reuse."""

import functools
import re
from datetime import timedelta
from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, StringConstraints

from troughfill.api.base import ApiModel, Rule, attribute_for_alias, list_set

DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A label key or extended-resource name: optional DNS prefix, then a name.
QUALIFIED_NAME_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
# Go's time.ParseDuration subset that CEL's duration() also accepts.
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
STORAGE_URL_PATTERN = r"^(file|s3)://\S+$"
STORAGE_PREFIX_PATTERN = r"^(file:///|s3://[a-z0-9][-a-z0-9.]{1,61}[a-z0-9]/)(\S*/)?$"
ENGINE_ARG_PATTERN = r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$"
ENGINE_ARG_VALUE_PATTERN = r"^(-[0-9]+(\.[0-9]+)?|[^-].*)?$"
"""An engine flag's value never looks like a flag (`--trust-remote-code` as the value of an
allowed flag would reach the engine as a flag of its own); a negative number is a value."""

DnsLabel = Annotated[str, StringConstraints(pattern=DNS_LABEL_PATTERN, min_length=1, max_length=63)]
DnsSubdomain = Annotated[str, StringConstraints(pattern=DNS_SUBDOMAIN_PATTERN, min_length=1, max_length=253)]
QualifiedName = Annotated[
    str, StringConstraints(pattern=QUALIFIED_NAME_PATTERN, min_length=1, max_length=316)
]
LabelValue = Annotated[str, StringConstraints(pattern=LABEL_VALUE_PATTERN, max_length=63)]
Duration = Annotated[str, StringConstraints(pattern=DURATION_PATTERN, max_length=32)]
QuantityString = Annotated[str, StringConstraints(pattern=QUANTITY_PATTERN, max_length=64)]
Quantity = Annotated[int | QuantityString, Field(json_schema_extra={"x-kubernetes-int-or-string": True})]
StorageURL = Annotated[str, StringConstraints(pattern=STORAGE_URL_PATTERN, max_length=2048)]
"""Where input and output live: file:// (a path the workers mount) or s3:// (any S3-protocol store)."""
StoragePrefix = Annotated[str, StringConstraints(pattern=STORAGE_PREFIX_PATTERN, max_length=2048)]
"""A storage grant's prefix: a directory (file:///...) or a bucket and key prefix, ending in "/"."""
EngineArgName = Annotated[str, StringConstraints(pattern=ENGINE_ARG_PATTERN, max_length=64)]
"""A vLLM command-line flag without its leading dashes, e.g. `max-num-seqs`."""
PromQL = Annotated[str, StringConstraints(min_length=1, max_length=4096)]
Labels = Annotated[dict[QualifiedName, LabelValue], Field(max_length=64)]

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@functools.lru_cache(maxsize=1024)
def parse_duration(text: str) -> timedelta:
    """Go-style duration ("90s", "1h30m") as a timedelta; the same strings CEL's duration() reads."""
    if not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 5m, 24h)")
    return timedelta(seconds=sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text)))


def duration_between(value: str, low: str, high: str) -> bool:
    return parse_duration(low) <= parse_duration(value) <= parse_duration(high)


def duration_rule(field: str, low: str, high: str) -> Rule:
    """A bound on a duration field, as CEL and as Python (the field is read by its wire name)."""

    def holds(model: Any) -> bool:
        value = getattr(model, attribute_for_alias(type(model), field))
        return value is None or duration_between(value, low, high)

    return Rule(
        cel=f"!has(self.{field}) || (duration(self.{field}) >= duration('{low}') "
        f"&& duration(self.{field}) <= duration('{high}'))",
        message=f"{field} must be between {low} and {high}",
        holds=holds,
    )


class SelectorOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class LabelSelectorRequirement(ApiModel):
    key: QualifiedName
    operator: SelectorOperator
    values: list[Annotated[str, StringConstraints(max_length=63)]] = list_set(max_length=64)

    rules = (
        Rule(
            cel="(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)",
            message="values must be non-empty for In and NotIn, and empty for Exists and DoesNotExist",
            holds=lambda r: (r.operator in (SelectorOperator.IN, SelectorOperator.NOT_IN)) == bool(r.values),
        ),
    )


class LabelSelector(ApiModel):
    """A Kubernetes label selector; all terms must match."""

    match_labels: Labels = Field(default_factory=dict)
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list, max_length=32)


class Toleration(ApiModel):
    key: QualifiedName | None = None
    operator: str | None = Field(default=None, pattern="^(Exists|Equal)$")
    value: LabelValue | None = None
    effect: str | None = Field(default=None, pattern="^(NoSchedule|PreferNoSchedule|NoExecute)$")
    toleration_seconds: int | None = None


# GPU device-plugin resources; a template gets GPUs only through gpusPerWorker and its pool.
GPU_RESOURCE_NAMES: tuple[str, ...] = (
    "nvidia.com/gpu",
    "amd.com/gpu",
    "gpu.intel.com/i915",
    "gpu.intel.com/xe",
)


class ResourceRequirements(ApiModel):
    """CPU, memory and other non-GPU resources per worker (GPUs come from gpusPerWorker)."""

    requests: dict[QualifiedName, Quantity] = Field(default_factory=dict, max_length=16)
    limits: dict[QualifiedName, Quantity] = Field(default_factory=dict, max_length=16)

    rules = (
        Rule(
            cel=" && ".join(
                f"!(has(self.{side}) && '{gpu}' in self.{side})"
                for side in ("requests", "limits")
                for gpu in GPU_RESOURCE_NAMES
            ),
            message="GPUs are set by gpusPerWorker, not in resources",
            holds=lambda r: not set(GPU_RESOURCE_NAMES) & {*r.requests, *r.limits},
        ),
    )


class KeyRef(ApiModel):
    """A key of a Secret or ConfigMap in the job's namespace (pods read only their own namespace's)."""

    name: DnsSubdomain
    key: Annotated[str, StringConstraints(pattern=r"^[-._a-zA-Z0-9]+$", max_length=253)]
    optional: bool = False


class EnvVarSource(ApiModel):
    secret_key_ref: KeyRef | None = None
    config_map_key_ref: KeyRef | None = None

    rules = (
        Rule(
            cel="has(self.secretKeyRef) != has(self.configMapKeyRef)",
            message="valueFrom takes exactly one of secretKeyRef and configMapKeyRef",
            holds=lambda s: (s.secret_key_ref is None) != (s.config_map_key_ref is None),
        ),
    )


class EnvVar(ApiModel):
    """An engine environment variable: a literal value, or a key of a Secret or ConfigMap that
    every namespace using the template holds (tokens never sit in the cluster-scoped template)."""

    name: Annotated[str, StringConstraints(pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", max_length=256)]
    value: Annotated[str, StringConstraints(max_length=32768)] | None = None
    value_from: EnvVarSource | None = None

    rules = (
        Rule(
            cel="!(has(self.value) && has(self.valueFrom))",
            message="an env entry has a value or a valueFrom, not both",
            holds=lambda e: e.value is None or e.value_from is None,
        ),
    )

    def manifest(self) -> dict[str, Any]:
        """The entry as a container's env takes it."""
        if self.value_from is not None:
            return {
                "name": self.name,
                "valueFrom": self.value_from.model_dump(by_alias=True, exclude_none=True),
            }
        return {"name": self.name, "value": self.value or ""}
