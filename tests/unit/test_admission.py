"""Admission of a job against its template and pool: one row per reason."""

from typing import Any

import pytest

from tests.builders import batch_inference, pool, template
from troughfill.api import BatchInference, BatchPool, ModelTemplate, Reason, admit
from troughfill.api.modeltemplate import AllowedEngineArg, EngineArgType


def decide(
    job: dict[str, Any], tmpl: dict[str, Any] | None = None, pool_wire: dict[str, Any] | None = None
) -> Any:
    return admit(
        BatchInference.model_validate(job),
        ModelTemplate.model_validate(tmpl) if tmpl else None,
        BatchPool.model_validate(pool_wire) if pool_wire else None,
    )


SEQS = {"name": "max-num-seqs", "type": "Integer", "minimum": 1, "maximum": 1024}
ALLOWED_ARGS = template(allowedEngineArgs=[SEQS])
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


TYPED = template(
    allowedEngineArgs=[
        SEQS,
        {"name": "gpu-memory-utilization", "type": "Number", "minimum": 0.1, "maximum": 0.95},
        {"name": "enable-prefix-caching", "type": "Boolean"},
        {"name": "enforce-eager", "type": "Boolean"},
        {"name": "kv-cache-dtype", "type": "Enum", "values": ["auto", "fp8"]},
        {"name": "seed", "type": "Integer"},
        {"name": "quantization", "type": "String", "pattern": "[a-z0-9_]{1,32}"},
    ]
)


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("max-num-seqs", "0", "Integer flag of template 'tiny' must be at least 1"),
        ("max-num-seqs", "4096", "must be at most 1024"),
        ("max-num-seqs", "12.5", "must be an integer"),
        ("max-num-seqs", "128 --trust-remote-code", "must be an integer"),
        ("gpu-memory-utilization", "0.99", "must be at most 0.95"),
        ("gpu-memory-utilization", "1e-1", "must be a number"),
        ("enable-prefix-caching", "yes", "must be true or false"),
        ("kv-cache-dtype", "fp4", "must be one of auto, fp8"),
        ("quantization", "awq --model=x", "must match [a-z0-9_]{1,32}"),
    ],
)
def test_flag_values_are_checked_against_their_type(name: str, value: str, problem: str) -> None:
    decision = decide(batch_inference(engineArgs=[{"name": name, "value": value}]), TYPED, pool())
    assert decision.reason == Reason.ENGINE_ARG_NOT_ALLOWED
    assert f"engineArgs {name}={value!r}: " in decision.message
    assert problem in decision.message


def test_admitted_flags_are_one_word_each() -> None:
    job = batch_inference(
        engineArgs=[
            {"name": "max-num-seqs", "value": "64"},
            {"name": "gpu-memory-utilization", "value": "0.8"},
            {"name": "enable-prefix-caching", "value": "true"},
            {"name": "enforce-eager", "value": "false"},
            {"name": "kv-cache-dtype", "value": "fp8"},
            {"name": "seed", "value": "-1"},
            {"name": "quantization", "value": "awq"},
        ]
    )
    decision = decide(job, TYPED, pool())
    assert decision.allowed, decision.message
    assert decision.engine_args == (
        "--max-num-seqs=64",
        "--gpu-memory-utilization=0.8",
        "--enable-prefix-caching",  # a true Boolean is the bare flag (vLLM's booleans take no value)
        "--kv-cache-dtype=fp8",  # a false one is left out: the engine's default
        "--seed=-1",
        "--quantization=awq",
    )


def test_reserved_flags_stay_refused_even_if_a_template_was_stored_without_validation() -> None:
    # A template written while CEL was not enforced (old cluster) cannot hand out --model.
    tmpl = ModelTemplate.model_validate(template())
    smuggled = AllowedEngineArg(name="model", type=EngineArgType.STRING, pattern=".*")
    tmpl.spec.allowed_engine_args.append(smuggled)
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
    decision = decide(job, template(allowedEngineArgs=[SEQS]), pool_wire)
    assert decision.allowed, decision.message
    assert decision.reason == Reason.ADMITTED
    assert (decision.priority_class_name, decision.max_gpus, decision.weight) == (
        priority_class,
        max_gpus,
        weight,
    )
