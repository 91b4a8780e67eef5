"""Every validation rule of the three resources, as a table: one broken thing per row, and the message."""

from typing import Any

import pytest
from pydantic import ValidationError

from tests.builders import batch_inference, pool, template, with_path
from troughfill.api import BatchInference, BatchPool, ModelTemplate, immutable_changes
from troughfill.api.resource import Resource

SEQS = {"name": "max-num-seqs", "type": "Integer", "minimum": 1, "maximum": 1024}

VALID_CASES = [
    (BatchInference, batch_inference()),
    (BatchInference, batch_inference(minWorkers=2, maxWorkers=2, completionWindow="1m")),
    (BatchInference, batch_inference(completionWindow="168h", endpoint="/v1/embeddings")),
    (BatchInference, batch_inference(engineArgs=[{"name": "max-num-seqs", "value": "64"}])),
    (BatchInference, batch_inference(engineArgs=[{"name": "seed", "value": "-1"}])),
    (BatchInference, batch_inference(metadata={"k" * 64: "v" * 512})),
    (BatchInference, batch_inference(inputURL="file:///data/in.jsonl", outputURL="file:///data/out/")),
    (BatchPool, pool()),
    (BatchPool, pool(gpus={"nodeSelector": {"nvidia.com/gpu.product": "H100"}})),
    (BatchPool, pool(defaultQuota={"maxGPUs": 2}, quotas=[])),
    (BatchPool, pool(gpuHourlyCostUSD="2.49")),
    (BatchPool, pool(online={"selector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]}})),
    (ModelTemplate, template()),
    (ModelTemplate, template(allowedEngineArgs=[SEQS], resources={"requests": {"cpu": 4}})),
    (ModelTemplate, template(resources={"limits": {"memory": "16Gi", "cpu": "500m"}})),
]


@pytest.mark.parametrize(("model", "wire"), VALID_CASES)
def test_valid_objects_parse(model: type[Resource], wire: dict[str, Any]) -> None:
    model.model_validate(wire)


INVALID_CASES = [
    # BatchInference
    (BatchInference, with_path(batch_inference(), "spec.inputURL", ...), "spec.inputURL", "Field required"),
    (BatchInference, batch_inference(inputURL="http://x/in.jsonl"), "spec.inputURL", "should match pattern"),
    (BatchInference, batch_inference(outputURL="s3://"), "spec.outputURL", "should match pattern"),
    (BatchInference, batch_inference(endpoint="/v1/images"), "spec.endpoint", "Input should be"),
    (BatchInference, batch_inference(templateRef="Not_A_Name"), "spec.templateRef", "should match pattern"),
    (
        BatchInference,
        batch_inference(minWorkers=3, maxWorkers=2),
        "spec",
        "minWorkers must not exceed maxWorkers",
    ),
    (BatchInference, batch_inference(maxWorkers=0), "spec.maxWorkers", "greater than or equal to 1"),
    (
        BatchInference,
        batch_inference(completionWindow="30s"),
        "spec",
        "completionWindow must be between 1m and 168h",
    ),
    (
        BatchInference,
        batch_inference(completionWindow="169h"),
        "spec",
        "completionWindow must be between 1m and 168h",
    ),
    (BatchInference, batch_inference(completionWindow="1d"), "spec.completionWindow", "should match pattern"),
    (
        BatchInference,
        batch_inference(
            engineArgs=[{"name": "max-num-seqs", "value": "1"}, {"name": "max-num-seqs", "value": "2"}]
        ),
        "spec",
        "engineArgs has more than one entry with name=max-num-seqs",
    ),
    (
        BatchInference,
        batch_inference(engineArgs=[{"name": "--max-num-seqs", "value": "1"}]),
        "spec.engineArgs.0.name",
        "should match pattern",
    ),
    (
        BatchInference,
        batch_inference(engineArgs=[{"name": "max-num-seqs", "value": "--trust-remote-code"}]),
        "spec.engineArgs.0.value",
        "should match pattern",
    ),
    (
        BatchInference,
        batch_inference(engineArgs=[{"name": "max-num-seqs", "value": "-m=other/repo"}]),
        "spec.engineArgs.0.value",
        "should match pattern",
    ),
    (
        BatchInference,
        batch_inference(retry={"maxAttempts": 0}),
        "spec.retry.maxAttempts",
        "greater than or equal",
    ),
    (
        BatchInference,
        batch_inference(metadata={f"k{i}": "v" for i in range(17)}),
        "spec.metadata",
        "at most 16",
    ),
    (BatchInference, batch_inference(metadata={"k" * 65: "v"}), "spec.metadata.k", "at most 64"),
    (BatchInference, batch_inference(metadata={"k": "v" * 513}), "spec.metadata.k", "at most 512"),
    # Users choose a template, never an image, GPU type or model source.
    (BatchInference, batch_inference(image="evil:latest"), "spec.image", "Extra inputs are not permitted"),
    (
        BatchInference,
        batch_inference(gpusPerWorker=8),
        "spec.gpusPerWorker",
        "Extra inputs are not permitted",
    ),
    (BatchInference, batch_inference(suspend="maybe"), "spec.suspend", "valid boolean"),
    (BatchInference, with_path(batch_inference(), "kind", "Pod"), "kind", "Input should be 'BatchInference'"),
    (
        BatchInference,
        with_path(batch_inference(), "apiVersion", "troughfill.io/v2"),
        "apiVersion",
        "should match pattern",
    ),
    # BatchPool
    (
        BatchPool,
        pool(gpus={"resourceName": "nvidia.com/gpu"}),
        "spec.gpus",
        "gpus needs a nodeSelector or a count",
    ),
    (BatchPool, pool(gpus={"count": -1}), "spec.gpus.count", "greater than or equal to 0"),
    (
        BatchPool,
        pool(quotas=[{"namespace": "a", "maxGPUs": 1}, {"namespace": "a", "maxGPUs": 2}]),
        "spec",
        "quotas has more than one entry with namespace=a",
    ),
    (
        BatchPool,
        pool(quotas=[{"namespace": "a", "maxGPUs": 1, "weight": 0}]),
        "spec.quotas.0.weight",
        "greater than or equal to 1",
    ),
    (BatchPool, pool(headroomGPUs=-1), "spec.headroomGPUs", "greater than or equal to 0"),
    (BatchPool, pool(signal={"maxStaleness": "2h"}), "spec.signal", "maxStaleness must be between 1s and 1h"),
    (BatchPool, pool(signal={"onStale": "Panic"}), "spec.signal.onStale", "'Yield' or 'Hold'"),
    (BatchPool, pool(scaleUpDelay="2h"), "spec", "scaleUpDelay must be between 0s and 1h"),
    (
        BatchPool,
        pool(headroomGPUs=1, headroomLendGPUs=2),
        "spec",
        "headroomLendGPUs cannot exceed headroomGPUs",
    ),
    (BatchPool, pool(gpuHourlyCostUSD="-1"), "spec.gpuHourlyCostUSD", "should match pattern"),
    (
        BatchPool,
        pool(
            online={
                "pressure": [
                    {"name": "q", "query": "x", "threshold": 1},
                    {"name": "q", "query": "y", "threshold": 2},
                ]
            }
        ),
        "spec.online",
        "pressure has more than one entry with name=q",
    ),
    (
        BatchPool,
        pool(online={"pressure": [{"name": "q", "query": "", "threshold": 1}]}),
        "spec.online.pressure.0.query",
        "at least 1 character",
    ),
    (
        BatchPool,
        pool(online={"selector": {"matchExpressions": [{"key": "app", "operator": "In"}]}}),
        "spec.online.selector.matchExpressions.0",
        "values must be non-empty for In and NotIn",
    ),
    (
        BatchPool,
        pool(
            online={"selector": {"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["x"]}]}}
        ),
        "spec.online.selector.matchExpressions.0",
        "values must be non-empty for In and NotIn, and empty for Exists",
    ),
    (BatchPool, pool(online={"prometheusURL": "prometheus:9090"}), "spec.online.prometheusURL", "pattern"),
    # ModelTemplate
    (ModelTemplate, template(gpusPerWorker=0), "spec.gpusPerWorker", "greater than or equal to 1"),
    (ModelTemplate, template(image="has space"), "spec.image", "should match pattern"),
    (
        ModelTemplate,
        template(allowedEngineArgs=[SEQS, {"name": "model", "type": "String", "pattern": ".*"}]),
        "spec",
        "allowedEngineArgs must not include flags that choose the model",
    ),
    (
        ModelTemplate,
        template(allowedEngineArgs=[{"name": "kv-cache-dtype", "type": "Enum"}]),
        "spec.allowedEngineArgs.0",
        "values must be given for type Enum, and only for it",
    ),
    (
        ModelTemplate,
        template(allowedEngineArgs=[{"name": "seed", "type": "Integer", "values": ["1"]}]),
        "spec.allowedEngineArgs.0",
        "values must be given for type Enum, and only for it",
    ),
    (
        ModelTemplate,
        template(allowedEngineArgs=[{"name": "quantization", "type": "String"}]),
        "spec.allowedEngineArgs.0",
        "pattern must be given for type String, and only for it",
    ),
    (
        ModelTemplate,
        template(allowedEngineArgs=[{"name": "enable-prefix-caching", "type": "Boolean", "maximum": 1}]),
        "spec.allowedEngineArgs.0",
        "minimum and maximum apply to types Integer and Number only",
    ),
    (
        ModelTemplate,
        template(allowedEngineArgs=[{"name": "kv-cache-dtype", "type": "Enum", "values": ["--x"]}]),
        "spec.allowedEngineArgs.0.values.0",
        "pattern",
    ),
    (
        ModelTemplate,
        template(resources={"requests": {"nvidia.com/gpu": 1}}),
        "spec.resources",
        "GPUs are set by gpusPerWorker, not in resources",
    ),
    (
        ModelTemplate,
        template(resources={"limits": {"amd.com/gpu": "1"}}),
        "spec.resources",
        "GPUs are set by gpusPerWorker, not in resources",
    ),
    (
        ModelTemplate,
        template(resources={"requests": {"cpu": "four"}}),
        "spec.resources.requests.cpu",
        "pattern",
    ),
    (
        ModelTemplate,
        template(engine={"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}),
        "spec.engine",
        "env has more than one entry with name=A",
    ),
    (ModelTemplate, template(engine={"command": []}), "spec.engine.command", "at least 1 item"),
    (
        ModelTemplate,
        template(
            engine={
                "env": [{"name": "T", "value": "x", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]
            }
        ),
        "spec.engine.env.0",
        "an env entry has a value or a valueFrom, not both",
    ),
    (
        ModelTemplate,
        template(engine={"env": [{"name": "T", "valueFrom": {}}]}),
        "spec.engine.env.0.valueFrom",
        "valueFrom takes exactly one of secretKeyRef and configMapKeyRef",
    ),
    (
        ModelTemplate,
        template(model={"uri": "relative/path", "servedModelName": "x"}),
        "spec.model.uri",
        "pattern",
    ),
]


@pytest.mark.parametrize(("model", "wire", "location", "message"), INVALID_CASES)
def test_invalid_objects_are_rejected_with_a_clear_message(
    model: type[Resource], wire: dict[str, Any], location: str, message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(wire)
    problems = [(".".join(str(p) for p in e["loc"]), e["msg"]) for e in caught.value.errors()]
    assert any(loc.startswith(location) and message in msg for loc, msg in problems), problems


def test_defaults_fill_in_what_users_leave_out() -> None:
    job = BatchInference.model_validate(batch_inference())
    assert job.spec.endpoint.value == "/v1/chat/completions"
    assert job.spec.completion_window == "24h"
    assert job.spec.retry.max_attempts == 3
    assert (job.spec.min_workers, job.spec.max_workers, job.spec.suspend) == (0, None, False)
    pool_spec = BatchPool.model_validate(pool()).spec
    assert pool_spec.default_priority_class_name == "troughfill-batch"
    assert pool_spec.signal.on_stale.value == "Yield"
    assert pool_spec.headroom_gpus == 1


def test_wire_form_round_trips() -> None:
    for model, wire in VALID_CASES:
        parsed = model.model_validate(wire)
        assert model.model_validate(parsed.to_wire()) == parsed


def test_status_ignores_fields_a_newer_operator_wrote() -> None:
    wire = batch_inference()
    wire["status"] = {"phase": "in_progress", "fieldFromTheFuture": 1, "requestCounts": {"total": 3}}
    job = BatchInference.model_validate(wire)
    assert job.status is not None
    assert job.status.request_counts.total == 3


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"inputURL": "s3://bucket/other.jsonl"}, ["inputURL"]),
        ({"engineArgs": [{"name": "max-num-seqs", "value": "8"}]}, ["engineArgs"]),
        ({"templateRef": "other", "endpoint": "/v1/completions"}, ["endpoint", "templateRef"]),
        ({"suspend": True, "maxWorkers": 3, "retry": {"maxAttempts": 5}}, []),
    ],
)
def test_immutable_fields_cannot_change(change: dict[str, Any], expected: list[str]) -> None:
    old = BatchInference.model_validate(batch_inference()).spec
    new = BatchInference.model_validate(batch_inference(**change)).spec
    assert sorted(immutable_changes(old, new)) == expected
