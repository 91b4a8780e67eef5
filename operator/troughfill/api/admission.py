"""Checks that need more than one object: a job against its template and its pool.

The CRD schema and pydantic catch everything a single object can get wrong; what is left
is whether this namespace may use this template, these engine flags and this priority.
Pure: the caller looks the objects up and turns a refusal into a condition and an Event.
"""

from dataclasses import dataclass

from troughfill.api.batchinference import BatchInference
from troughfill.api.batchpool import BatchPool
from troughfill.api.conditions import Reason
from troughfill.api.modeltemplate import RESERVED_ENGINE_ARGS, ModelTemplate


@dataclass(frozen=True)
class Admission:
    allowed: bool
    reason: Reason
    message: str
    priority_class_name: str | None = None
    """The PriorityClass workers run at, once admitted."""
    max_gpus: int | None = None
    """The namespace's GPU quota in the pool, once admitted."""
    weight: int | None = None


def _refuse(reason: Reason, message: str) -> Admission:
    return Admission(allowed=False, reason=reason, message=message)


def admit(job: BatchInference, template: ModelTemplate | None, pool: BatchPool | None) -> Admission:
    """Whether `job` may run; `template` and `pool` are what its references resolve to (None: missing)."""
    spec = job.spec
    if template is None:
        return _refuse(Reason.TEMPLATE_NOT_FOUND, f"ModelTemplate {spec.template_ref!r} does not exist")
    if pool is None or pool.metadata.name != template.spec.pool_ref:
        return _refuse(
            Reason.POOL_NOT_FOUND,
            f"BatchPool {template.spec.pool_ref!r} of template {spec.template_ref!r} does not exist",
        )

    allowed_args = set(template.spec.allowed_engine_args) - set(RESERVED_ENGINE_ARGS)
    refused_args = sorted({arg.name for arg in spec.engine_args} - allowed_args)
    if refused_args:
        return _refuse(
            Reason.ENGINE_ARG_NOT_ALLOWED,
            f"engineArgs {', '.join(refused_args)} not allowed by template {spec.template_ref!r}"
            f" (allowed: {', '.join(sorted(allowed_args)) or 'none'})",
        )

    namespace = job.metadata.ns
    pool_spec = pool.spec
    quota = next((q for q in pool_spec.quotas if q.namespace == namespace), None)
    if quota is not None:
        max_gpus, weight, extra_classes = quota.max_gpus, quota.weight, set(quota.allowed_priority_classes)
    elif pool_spec.default_quota is not None:
        max_gpus, weight, extra_classes = (
            pool_spec.default_quota.max_gpus,
            pool_spec.default_quota.weight,
            set(),
        )
    else:
        return _refuse(
            Reason.NAMESPACE_NOT_IN_QUOTA,
            f"namespace {namespace!r} has no quota in BatchPool {pool.metadata.name!r}",
        )

    priority_class = spec.priority_class_name or pool_spec.default_priority_class_name
    allowed_classes = extra_classes | {pool_spec.default_priority_class_name}
    if priority_class not in allowed_classes:
        return _refuse(
            Reason.PRIORITY_CLASS_NOT_ALLOWED,
            f"priorityClassName {priority_class!r} not allowed for namespace {namespace!r}"
            f" (allowed: {', '.join(sorted(allowed_classes))})",
        )

    min_gpus = spec.min_workers * template.spec.gpus_per_worker
    if min_gpus > max_gpus:
        return _refuse(
            Reason.QUOTA_EXCEEDED,
            f"minWorkers {spec.min_workers} x {template.spec.gpus_per_worker} GPUs = {min_gpus} GPUs"
            f" exceeds the quota of {max_gpus} GPUs for namespace {namespace!r}",
        )

    return Admission(
        allowed=True,
        reason=Reason.ADMITTED,
        message=f"runs on pool {pool.metadata.name!r} at priority class {priority_class!r}",
        priority_class_name=priority_class,
        max_gpus=max_gpus,
        weight=weight,
    )
