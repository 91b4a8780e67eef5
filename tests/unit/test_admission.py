"""Admission of a job against its template and pool: one row per reason."""

from typing import Any

import pydantic
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
BUCKET = [{"prefix": "s3://bucket/"}]
TWO_CLASSES = pool(
    quotas=[
        {"namespace": "team-a", "maxGPUs": 4, "allowedPriorityClasses": ["batch-urgent"], "storage": BUCKET}
    ]
)


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
            pool(defaultQuota={"maxGPUs": 2, "weight": 3, "storage": BUCKET}),
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


GRANTS = pool(
    quotas=[
        {
            "namespace": "team-a",
            "maxGPUs": 4,
            "storage": [
                {"prefix": "s3://batch/team-a/", "secretName": "team-a-s3"},
                {"prefix": "s3://shared/datasets/", "access": "ReadOnly", "secretName": "team-a-s3"},
                {"prefix": "s3://archive/team-a/", "secretName": "archive-s3"},
                {"prefix": "file:///data/team-a/"},
            ],
        },
        {"namespace": "team-b", "maxGPUs": 4, "storage": [{"prefix": "s3://batch/team-b/"}]},
    ],
    defaultQuota={"maxGPUs": 1, "storage": [{"prefix": "s3://batch/{namespace}/"}]},
)


@pytest.mark.parametrize(
    ("namespace", "input_url", "output_url", "fragment"),
    [
        # Another team's prefixes, and look-alikes of one's own.
        (
            "team-b",
            "s3://batch/team-a/in.jsonl",
            "s3://batch/team-b/out/",
            "inputURL s3://batch/team-a/in.jsonl is not",
        ),
        (
            "team-b",
            "s3://batch/team-b/in.jsonl",
            "s3://batch/team-a/out/",
            "outputURL s3://batch/team-a/out/ is not",
        ),
        (
            "team-b",
            "s3://batch/team-b/in.jsonl",
            "s3://batch/team-b-x/out/",
            "outputURL s3://batch/team-b-x/out/",
        ),
        ("team-a", "s3://batch/team-a/../team-b/in.jsonl", "s3://batch/team-a/o/", "has a . or .. segment"),
        ("team-a", "s3://batch/team-a//in.jsonl", "s3://batch/team-a/o/", "has an empty segment"),
        # file:// only where granted, literally.
        ("team-b", "file:///etc/passwd", "s3://batch/team-b/o/", "inputURL file:///etc/passwd is not under"),
        ("team-a", "file:///data/team-a/%2e%2e/x", "file:///data/team-a/o/", "has a percent-escape"),
        ("team-a", "file://data/team-a/in", "file:///data/team-a/o/", "is not an absolute file URL"),
        # Read-only grants are read-only; segments are troughfill's.
        ("team-a", "s3://shared/datasets/in.jsonl", "s3://shared/datasets/out/", "may write to"),
        ("team-a", "s3://batch/team-a/in.jsonl", "s3://batch/team-a/o/_segments/x/", "inside a _segments"),
        # One job, one set of credentials.
        ("team-a", "s3://batch/team-a/in.jsonl", "s3://archive/team-a/out/", "different credentials"),
        # The default quota's grant is per namespace.
        (
            "team-z",
            "s3://batch/team-y/in.jsonl",
            "s3://batch/team-z/out/",
            "inputURL s3://batch/team-y/in.jsonl",
        ),
    ],
)
def test_storage_outside_the_namespaces_grants_is_refused(
    namespace: str, input_url: str, output_url: str, fragment: str
) -> None:
    job = batch_inference(namespace=namespace, inputURL=input_url, outputURL=output_url)
    decision = decide(job, template(), GRANTS)
    assert decision.reason == Reason.STORAGE_NOT_GRANTED
    assert fragment in decision.message
    assert "BatchPool 'gpus'" in decision.message
    if namespace == "team-b":
        assert "team-a-s3" not in decision.message  # another namespace's grants are never named


@pytest.mark.parametrize(
    ("namespace", "input_url", "output_url", "secret"),
    [
        ("team-a", "s3://shared/datasets/in.jsonl", "s3://batch/team-a/out", "team-a-s3"),
        ("team-a", "file:///data/team-a/in.jsonl", "file:///data/team-a/out/", None),
        ("team-z", "s3://batch/team-z/in.jsonl", "s3://batch/team-z/out/", None),
    ],
)
def test_storage_within_the_grants_is_admitted_with_the_grants_credentials(
    namespace: str, input_url: str, output_url: str, secret: str | None
) -> None:
    job = batch_inference(namespace=namespace, inputURL=input_url, outputURL=output_url)
    decision = decide(job, template(), GRANTS)
    assert decision.allowed, decision.message
    assert decision.storage is not None
    assert decision.storage.secret_name == secret


def test_a_default_grants_secret_is_the_namespaces_own() -> None:
    """Under defaultQuota, {namespace} in secretName is the job's namespace too, and a Secret every
    namespace would share is refused: each job's workers get a copy of their grant's credentials."""
    per_namespace = pool(
        quotas=[],
        defaultQuota={
            "maxGPUs": 1,
            "storage": [{"prefix": "s3://batch/{namespace}/", "secretName": "s3-{namespace}"}],
        },
    )
    job = BatchInference.model_validate(
        batch_inference(
            namespace="team-c", inputURL="s3://batch/team-c/in.jsonl", outputURL="s3://batch/team-c/o/"
        )
    )
    admission = admit(job, ModelTemplate.model_validate(template()), BatchPool.model_validate(per_namespace))
    assert admission.allowed, admission.message
    assert admission.storage is not None
    assert admission.storage.secret_name == "s3-team-c"
    shared = pool(
        quotas=[],
        defaultQuota={
            "maxGPUs": 1,
            "storage": [{"prefix": "s3://batch/{namespace}/", "secretName": "batch-storage"}],
        },
    )
    with pytest.raises(pydantic.ValidationError, match="secretName"):
        BatchPool.model_validate(shared)
