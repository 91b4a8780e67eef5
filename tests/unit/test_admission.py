"""Admission of a job against its template and pool: one row per reason."""

from typing import Any

import pytest

from tests.builders import batch_inference, pool, template
from troughfill.api import BatchInference, BatchPool, ModelTemplate, Reason, admit


def decide(
    job: dict[str, Any], tmpl: dict[str, Any] | None = None, pool_wire: dict[str, Any] | None = None
) -> Any:
    return admit(
        BatchInference.model_validate(job),
        ModelTemplate.model_validate(tmpl) if tmpl else None,
        BatchPool.model_validate(pool_wire) if pool_wire else None,
    )


ALLOWED_ARGS = template(allowedEngineArgs=["max-num-seqs"])
TWO_CLASSES = pool(quotas=[{"namespace": "team-a", "maxGPUs": 4, "allowedPriorityClasses": ["batch-urgent"]}])


@pytest.mark.parametrize(
    ("job", "tmpl", "pool_wire", "reason", "fragment"),
    [
        (batch_inference(), None, pool(), Reason.TEMPLATE_NOT_FOUND, "ModelTemplate 'tiny' does not exist"),
        (batch_inference(), template(), None, Reason.POOL_NOT_FOUND, "BatchPool 'gpus'"),
        (batch_inference(), template(pool_ref="other"), pool(), Reason.POOL_NOT_FOUND, "BatchPool 'other'"),
        (
            batch_inference(engineArgs=[{"name": "max-model-len", "value": "4096"}]),
            ALLOWED_ARGS,
            pool(),
            Reason.ENGINE_ARG_NOT_ALLOWED,
            "engineArgs max-model-len not allowed by template 'tiny' (allowed: max-num-seqs)",
        ),
        (
            batch_inference(engineArgs=[{"name": "max-num-seqs", "value": "1"}]),
            template(),
            pool(),
            Reason.ENGINE_ARG_NOT_ALLOWED,
            "(allowed: none)",
        ),
        (
            batch_inference(namespace="team-z"),
            template(),
            pool(),
            Reason.NAMESPACE_NOT_IN_QUOTA,
            "namespace 'team-z' has no quota in BatchPool 'gpus'",
        ),
        (
            batch_inference(priorityClassName="system-cluster-critical"),
            template(),
            pool(),
            Reason.PRIORITY_CLASS_NOT_ALLOWED,
            "priorityClassName 'system-cluster-critical' not allowed for namespace 'team-a'",
        ),
        (
            batch_inference(namespace="team-z", priorityClassName="batch-urgent"),
            template(),
            pool(defaultQuota={"maxGPUs": 2}, quotas=TWO_CLASSES["spec"]["quotas"]),
            Reason.PRIORITY_CLASS_NOT_ALLOWED,
            "(allowed: troughfill-batch)",
        ),
        (
            batch_inference(minWorkers=3),
            template(gpusPerWorker=2),
            pool(),
            Reason.QUOTA_EXCEEDED,
            "minWorkers 3 x 2 GPUs = 6 GPUs exceeds the quota of 4 GPUs",
        ),
    ],
)
def test_refusals_name_the_reason(
    job: dict[str, Any],
    tmpl: dict[str, Any] | None,
    pool_wire: dict[str, Any] | None,
    reason: Reason,
    fragment: str,
) -> None:
    decision = decide(job, tmpl, pool_wire)
    assert not decision.allowed
    assert decision.reason == reason
    assert fragment in decision.message


def test_reserved_flags_stay_refused_even_if_a_template_was_stored_without_validation() -> None:
    # A template written while CEL was not enforced (old cluster) cannot hand out --model.
    tmpl = ModelTemplate.model_validate(template())
    tmpl.spec.allowed_engine_args.append("model")
    job = BatchInference.model_validate(batch_inference(engineArgs=[{"name": "model", "value": "/other"}]))
    decision = admit(job, tmpl, BatchPool.model_validate(pool()))
    assert decision.reason == Reason.ENGINE_ARG_NOT_ALLOWED


@pytest.mark.parametrize(
    ("job", "pool_wire", "priority_class", "max_gpus", "weight"),
    [
        (batch_inference(), pool(), "troughfill-batch", 4, 1),
        (batch_inference(priorityClassName="batch-urgent"), TWO_CLASSES, "batch-urgent", 4, 1),
        (
            batch_inference(namespace="team-z", minWorkers=2),
            pool(defaultQuota={"maxGPUs": 2, "weight": 3}),
            "troughfill-batch",
            2,
            3,
        ),
    ],
)
def test_admitted_jobs_get_their_class_and_quota(
    job: dict[str, Any], pool_wire: dict[str, Any], priority_class: str, max_gpus: int, weight: int
) -> None:
    decision = decide(job, template(allowedEngineArgs=["max-num-seqs"]), pool_wire)
    assert decision.allowed, decision.message
    assert decision.reason == Reason.ADMITTED
    assert (decision.priority_class_name, decision.max_gpus, decision.weight) == (
        priority_class,
        max_gpus,
        weight,
    )
