"""BatchPool (cluster-scoped, admin-owned): the GPUs batch may borrow and the online demand it yields to."""

from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, field_validator

from troughfill import constants
from troughfill.api.base import ApiModel, Rule, StatusModel, list_map, list_set
from troughfill.api.conditions import Condition
from troughfill.api.resource import CrdInfo, PrinterColumn, Resource, Scope
from troughfill.api.types import (
    DnsLabel,
    DnsSubdomain,
    Duration,
    Labels,
    LabelSelector,
    PromQL,
    QualifiedName,
    StoragePrefix,
    duration_rule,
)


class GpuSource(ApiModel):
    """Which GPUs form the pool: those of the selected nodes, or a fixed count."""

    resource_name: QualifiedName = constants.DEFAULT_GPU_RESOURCE
    """Extended resource that counts GPUs on nodes and in pod requests."""
    node_selector: Labels = Field(default_factory=dict)
    """Nodes whose allocatable GPUs belong to the pool."""
    count: int | None = Field(default=None, ge=0, le=1_000_000)
    """A fixed pool size instead of counting node GPUs (e.g. a reserved share of a larger cluster)."""

    rules = (
        Rule(
            cel="(has(self.nodeSelector) && size(self.nodeSelector) > 0) || has(self.count)",
            message="gpus needs a nodeSelector or a count",
            holds=lambda g: bool(g.node_selector) or g.count is not None,
        ),
    )


class PressureSignal(ApiModel):
    """A PromQL query whose value above `threshold` means online serving needs more GPUs now."""

    name: DnsLabel
    query: PromQL
    threshold: float = Field(ge=0)


class OnlineWorkload(ApiModel):
    """The online serving batch must never get in the way of, and how to read its demand."""

    selector: LabelSelector = Field(default_factory=LabelSelector)
    """Pods of online serving (their GPU requests count as online demand when no query is given)."""
    namespaces: list[DnsLabel] = list_set(max_length=256)
    """Namespaces searched for online pods; all when empty."""
    prometheus_url: Annotated[str, StringConstraints(pattern=r"^https?://\S+$", max_length=2048)] | None = (
        Field(default=None, alias="prometheusURL")
    )
    """Prometheus to query; the operator's default when unset."""
    gpus_in_use_query: PromQL | None = Field(default=None, alias="gpusInUseQuery")
    """PromQL for the GPUs online serving holds now."""
    utilization_query: PromQL | None = None
    """PromQL for online GPU utilisation in [0, 1] (e.g. from DCGM), for reporting and trough prediction."""
    pressure: list[PressureSignal] = list_map("name", max_length=16)


class StalePolicy(StrEnum):
    YIELD = "Yield"
    """Stop batch work beyond floorGPUs: without a signal, online demand is assumed to be rising."""
    HOLD = "Hold"
    """Keep current batch workers but start none."""


class SignalPolicy(ApiModel):
    max_staleness: Duration = "30s"
    """A signal older than this is stale."""
    on_stale: StalePolicy = StalePolicy.YIELD
    floor_gpus: int = Field(default=0, ge=0, alias="floorGPUs")
    """GPUs batch may keep while the signal is stale."""

    rules = (duration_rule("maxStaleness", "1s", "1h"),)


class StorageAccess(StrEnum):
    READ_ONLY = "ReadOnly"
    """Inputs may be read from under the prefix."""
    READ_WRITE = "ReadWrite"
    """Inputs may be read and outputs written (and a job's own segments deleted) under the prefix."""


class StorageGrant(ApiModel):
    """A URL prefix a namespace's jobs may use, and the credentials they use it with."""

    prefix: StoragePrefix
    """file:///path/ or s3://bucket/path/, ending in "/"; in defaultQuota, {namespace} stands
    for the job's namespace (e.g. s3://batch/{namespace}/)."""
    access: StorageAccess = StorageAccess.READ_WRITE
    secret_name: DnsSubdomain | None = None
    """Secret in the operator's namespace with the object-store credentials for this prefix
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, optionally AWS_SESSION_TOKEN): the operator uses
    them for the job and hands a copy to the job's workers only. Unset: the operator's and the
    worker pods' own identity."""


StorageGrants = Annotated[list[StorageGrant], Field(default_factory=list, max_length=32)]

PER_NAMESPACE_SECRET_PATTERN = r"^([-a-z0-9.]|\{namespace\})*\{namespace\}([-a-z0-9.]|\{namespace\})*$"
PerNamespaceSecretName = Annotated[
    str, StringConstraints(pattern=PER_NAMESPACE_SECRET_PATTERN, min_length=1, max_length=180)
]


class DefaultStorageGrant(StorageGrant):
    """A storage grant of `defaultQuota`: every namespace without a quota of its own gets it,
    with {namespace} in its prefix and its Secret's name standing for the job's namespace."""

    secret_name: PerNamespaceSecretName | None = None
    """Secret in the operator's namespace with the credentials for this namespace's prefix; it
    must contain {namespace} (e.g. batch-{namespace}): a job's workers get a copy of their grant's
    credentials, so one Secret shared by every namespace would hand each namespace's pods
    credentials that reach every other namespace's prefix. Unset: the pods' own identity."""


DefaultStorageGrants = Annotated[list[DefaultStorageGrant], Field(default_factory=list, max_length=32)]


def _default_when_null(value: object) -> object:
    """maxRequests was nullable (unlimited) before it had a default: a pool stored then reads as
    the default, not as an error."""
    return constants.DEFAULT_MAX_REQUESTS_PER_NAMESPACE if value is None else value


class NamespaceQuota(ApiModel):
    namespace: DnsLabel
    max_gpus: int = Field(ge=0, alias="maxGPUs")
    """GPUs this namespace's batch jobs may hold together."""
    weight: int = Field(default=1, ge=1, le=1000)
    """Share of the trough relative to other namespaces at the same priority."""
    allowed_priority_classes: list[DnsSubdomain] = list_set(max_length=16)
    """PriorityClasses this namespace's jobs may name, besides the pool's default."""
    storage: StorageGrants
    """Where this namespace's jobs may read input and write output; nothing else is allowed."""
    max_requests: int = Field(
        default=constants.DEFAULT_MAX_REQUESTS_PER_NAMESPACE, ge=1, le=constants.MAX_REQUESTS_PER_JOB * 100
    )
    """Unfinished requests this namespace's jobs may hold in the ledger together (its share of
    Redis's memory; an indexed request costs about 30-45 bytes)."""

    _stored_null = field_validator("max_requests", mode="before")(_default_when_null)


class DefaultQuota(ApiModel):
    """Quota for namespaces the quota list does not name; such namespaces are refused without it."""

    max_gpus: int = Field(ge=0, alias="maxGPUs")
    weight: int = Field(default=1, ge=1, le=1000)
    storage: DefaultStorageGrants
    """Storage grants for those namespaces; {namespace} in a prefix or a Secret's name is the
    job's namespace."""
    max_requests: int = Field(
        default=constants.DEFAULT_MAX_REQUESTS_PER_NAMESPACE, ge=1, le=constants.MAX_REQUESTS_PER_JOB * 100
    )
    """Unfinished requests each such namespace's jobs may hold in the ledger together."""

    _stored_null = field_validator("max_requests", mode="before")(_default_when_null)


GPU_HOUR_COST_PATTERN = r"^[0-9]{1,6}(\.[0-9]{1,6})?$"


class BatchPoolSpec(ApiModel):
    gpus: GpuSource
    online: OnlineWorkload
    headroom_gpus: int = Field(default=1, ge=0, alias="headroomGPUs")
    """GPUs left free for online bursts: batch workers never start into them."""
    headroom_lend_gpus: int = Field(default=0, ge=0, alias="headroomLendGPUs")
    """Of the headroom, GPUs that batch workers already running may keep while online moves
    into it, and only while no forecast predicts a rise (none ever starts there). Online then
    finds headroomGPUs - headroomLendGPUs free at once and the rest after a yield (seconds);
    in exchange small rises and falls of online no longer cost a worker's cold start. 0 keeps
    the whole headroom free."""
    signal: SignalPolicy = Field(default_factory=SignalPolicy)
    scale_up_delay: Duration = "60s"
    """How long a trough must last before batch workers grow into it (scale-down is immediate)."""
    min_useful_time: Duration = "5m"
    """No worker starts for a trough predicted shorter than its cold start plus this. A
    prediction needs a forecast of online demand, which the operator does not build yet (the
    simulator measured one costing more trough capture than the interference it saves), so
    today this holds back nothing."""
    drain_grace_period: Duration = "30s"
    """Time a worker gets to finish in-flight requests when it is stopped without urgency."""
    default_priority_class_name: DnsSubdomain = constants.DEFAULT_BATCH_PRIORITY_CLASS
    """PriorityClass for jobs that name none; always allowed."""
    quotas: list[NamespaceQuota] = list_map("namespace", max_length=1024)
    default_quota: DefaultQuota | None = None
    gpu_hourly_cost_usd: Annotated[str, StringConstraints(pattern=GPU_HOUR_COST_PATTERN)] = Field(
        default="0", alias="gpuHourlyCostUSD"
    )
    """Price of one GPU-hour, for realised $/1M tokens (a decimal string, Kubernetes avoids floats)."""

    rules = (
        Rule(
            cel="self.headroomLendGPUs <= self.headroomGPUs",
            message="headroomLendGPUs cannot exceed headroomGPUs",
            holds=lambda s: s.headroom_lend_gpus <= s.headroom_gpus,
        ),
        duration_rule("scaleUpDelay", "0s", "1h"),
        duration_rule("minUsefulTime", "0s", "24h"),
        duration_rule("drainGracePeriod", "0s", "1h"),
    )

    @property
    def gpu_hourly_cost(self) -> Decimal:
        return Decimal(self.gpu_hourly_cost_usd)


class BatchPoolStatus(StatusModel):
    observed_generation: int | None = Field(default=None, ge=0)
    conditions: list[Condition] = list_map("type", max_length=constants.MAX_CONDITIONS)
    capacity_gpus: int = Field(default=0, ge=0, alias="capacityGPUs")
    online_gpus: int = Field(default=0, ge=0, alias="onlineGPUs")
    batch_gpus: int = Field(default=0, ge=0, alias="batchGPUs")
    trough_gpus: int = Field(default=0, ge=0, alias="troughGPUs")
    """GPUs neither online serving nor headroom needs: what batch may fill."""
    active_jobs: int = Field(default=0, ge=0)
    last_signal_time: datetime | None = None


class BatchPool(Resource):
    """GPUs batch work may borrow, the online serving it yields to, and per-namespace quotas."""

    crd = CrdInfo(
        kind=constants.KIND_BATCH_POOL,
        plural="batchpools",
        singular="batchpool",
        scope=Scope.CLUSTER,
        short_names=("bpool",),
        printer_columns=(
            PrinterColumn("Capacity", ".status.capacityGPUs", "integer", "GPUs in the pool"),
            PrinterColumn("Online", ".status.onlineGPUs", "integer", "GPUs held by online serving"),
            PrinterColumn("Batch", ".status.batchGPUs", "integer", "GPUs held by batch workers"),
            PrinterColumn("Trough", ".status.troughGPUs", "integer", "GPUs batch may fill"),
            PrinterColumn("Jobs", ".status.activeJobs", "integer", "Active BatchInferences", 1),
            PrinterColumn("Age", ".metadata.creationTimestamp", "date"),
        ),
    )

    kind: Literal["BatchPool"] = "BatchPool"
    spec: BatchPoolSpec
    status: BatchPoolStatus | None = None
