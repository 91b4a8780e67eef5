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
from troughfill.api.storage import Granted, effective, find_grants


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
    max_requests: int | None = None
    """Unfinished requests the namespace's jobs may hold together (None: no cap)."""
    engine_args: tuple[str, ...] = ()
    """The job's engine flags as admitted: one `--name=value` word each (worker pods get these)."""
    storage: Granted | None = None
    """The storage grants its input and output fall under (their credentials are the job's)."""


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

    engine_args = _engine_args(job, template)
    if isinstance(engine_args, Admission):
        return engine_args

    namespace = job.metadata.ns
    pool_spec = pool.spec
    quota = next((q for q in pool_spec.quotas if q.namespace == namespace), None)
    if quota is not None:
        max_gpus, weight, extra_classes = quota.max_gpus, quota.weight, set(quota.allowed_priority_classes)
        grants, max_requests = quota.storage, quota.max_requests
    elif pool_spec.default_quota is not None:
        max_gpus, weight, extra_classes = (
            pool_spec.default_quota.max_gpus,
            pool_spec.default_quota.weight,
            set(),
        )
        grants = effective(pool_spec.default_quota.storage, namespace)
        max_requests = pool_spec.default_quota.max_requests
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

    storage = find_grants(grants, spec.input_url, spec.output_url)
    if isinstance(storage, str):
        return _refuse(
            Reason.STORAGE_NOT_GRANTED,
            f"{storage}; storage grants are set per namespace in BatchPool {pool.metadata.name!r}",
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
        engine_args=engine_args,
        storage=storage,
        max_requests=max_requests,
    )


def _engine_args(job: BatchInference, template: ModelTemplate) -> tuple[str, ...] | Admission:
    """The job's engine flags as command-line words, or the refusal naming the first bad one.

    Each flag becomes one word, `--name=value`: a value can never be read as a flag of its own.
    """
    allowed = {a.name: a for a in template.spec.allowed_engine_args if a.name not in RESERVED_ENGINE_ARGS}
    name = job.spec.template_ref
    refused = sorted({arg.name for arg in job.spec.engine_args} - set(allowed))
    if refused:
        return _refuse(
            Reason.ENGINE_ARG_NOT_ALLOWED,
            f"engineArgs {', '.join(refused)} not allowed by template {name!r}"
            f" (allowed: {', '.join(sorted(allowed)) or 'none'})",
        )
    words = []
    for arg in job.spec.engine_args:
        rule = allowed[arg.name]
        problem = rule.problem(arg.value)
        if problem is not None:
            return _refuse(
                Reason.ENGINE_ARG_NOT_ALLOWED,
                f"engineArgs {arg.name}={arg.value!r}: {rule.type.value} flag of template {name!r} {problem}",
            )
        word = rule.token(arg.value)
        if word is not None:
            words.append(word)
    return tuple(words)
