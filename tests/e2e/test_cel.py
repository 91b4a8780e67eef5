"""The CRDs' CEL rules, enforced by the real API server: every rule refuses an object with its
own message, before anything is stored (create for object rules, update for transition rules).

The table below names one violating object per rule; a rule added to the models without a case
here fails `test_every_rule_has_a_case`. The rules' cost is estimated by the API server when it
accepts a CRD: the session's CRDs are accepted (their fixture) and a CRD with an unbounded rule
is refused, so an over-budget rule in ours would fail there.
"""

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.builders import Wire, batch_inference, pool, template, with_path
from tests.conftest import REPO_ROOT
from tests.e2e.conftest import Kube, kubectl
from tests.manifests import crdtools
from troughfill import api

LONG_KEY = "k" * 317
"""Longer than any map key a rule allows (316: a qualified label key)."""


@dataclass(frozen=True)
class Case:
    kind: str
    path: str
    message: str
    violating: Callable[[str], Wire]
    """The refused object, given a unique name."""
    before: Callable[[str], Wire] | None = None
    """For transition rules: the stored object the violating one updates."""

    @property
    def id(self) -> str:
        return f"{self.kind}{self.path}: {self.message[:40]}"


def job(**spec: Any) -> Callable[[str], Wire]:
    return lambda name: batch_inference(name=name, **spec)


def bpool(**spec: Any) -> Callable[[str], Wire]:
    return lambda name: pool(name=name, **spec)


def mtemplate(**spec: Any) -> Callable[[str], Wire]:
    return lambda name: template(name=name, **spec)


def changed(field: str, before: Any, after: Any) -> tuple[Callable[[str], Wire], Callable[[str], Wire]]:
    """(violating, before): a BatchInference whose spec.`field` goes from `before` to `after`."""
    return (
        lambda name: with_path(batch_inference(name=name), f"spec.{field}", after),
        lambda name: with_path(batch_inference(name=name), f"spec.{field}", before),
    )


def immutable(field: str, before: Any, after: Any) -> Case:
    violating, old = changed(field, before, after)
    return Case("BatchInference", f".spec.{field}", f"{field} is immutable", violating, old)


CASES = [
    Case("BatchInference", ".spec", "minWorkers must not exceed maxWorkers", job(minWorkers=3, maxWorkers=1)),
    Case(
        "BatchInference",
        ".spec",
        "completionWindow must be between 1m and 168h",
        job(completionWindow="200h"),
    ),
    Case(
        "BatchInference",
        ".spec.metadata",
        "keys must be 1 to 64 characters long",
        job(metadata={"k" * 65: "v"}),
    ),
    immutable("inputURL", "s3://bucket/in.jsonl", "s3://bucket/other.jsonl"),
    immutable("outputURL", "s3://bucket/out/", "s3://bucket/elsewhere/"),
    immutable("endpoint", "/v1/chat/completions", "/v1/completions"),
    immutable("templateRef", "tiny", "other"),
    immutable("completionWindow", "24h", "48h"),
    immutable(
        "engineArgs",
        [{"name": "max-num-seqs", "value": "8"}],
        [{"name": "max-num-seqs", "value": "9"}],
    ),
    Case("BatchInference", ".spec.cancel", "cancel cannot be undone", *changed("cancel", True, False)),
    Case(
        "BatchPool",
        ".spec",
        "headroomLendGPUs cannot exceed headroomGPUs",
        bpool(headroomGPUs=1, headroomLendGPUs=2),
    ),
    Case("BatchPool", ".spec", "scaleUpDelay must be between 0s and 1h", bpool(scaleUpDelay="2h")),
    Case("BatchPool", ".spec", "minUsefulTime must be between 0s and 24h", bpool(minUsefulTime="25h")),
    Case("BatchPool", ".spec", "drainGracePeriod must be between 0s and 1h", bpool(drainGracePeriod="2h")),
    Case("BatchPool", ".spec.gpus", "gpus needs a nodeSelector or a count", bpool(gpus={"nodeSelector": {}})),
    Case(
        "BatchPool",
        ".spec.gpus.nodeSelector",
        "keys must be 1 to 316 characters long",
        bpool(gpus={"nodeSelector": {LONG_KEY: "x"}}),
    ),
    Case(
        "BatchPool",
        ".spec.online.selector.matchLabels",
        "keys must be 1 to 316 characters long",
        bpool(online={"gpusInUseQuery": "sum(x)", "selector": {"matchLabels": {LONG_KEY: "x"}}}),
    ),
    Case(
        "BatchPool",
        ".spec.online.selector.matchExpressions[]",
        "values must be non-empty for In and NotIn, and empty for Exists and DoesNotExist",
        bpool(
            online={
                "gpusInUseQuery": "sum(x)",
                "selector": {"matchExpressions": [{"key": "app", "operator": "In"}]},
            }
        ),
    ),
    Case(
        "BatchPool",
        ".spec.signal",
        "maxStaleness must be between 1s and 1h",
        bpool(signal={"maxStaleness": "2h"}),
    ),
    Case(
        "ModelTemplate",
        ".spec",
        "allowedEngineArgs must not include flags that choose the model, port or devices",
        mtemplate(allowedEngineArgs=[{"name": "model", "type": "String", "pattern": ".*"}]),
    ),
    Case(
        "ModelTemplate",
        ".spec.allowedEngineArgs[]",
        "values must be given for type Enum, and only for it",
        mtemplate(allowedEngineArgs=[{"name": "kv-cache-dtype", "type": "Enum"}]),
    ),
    Case(
        "ModelTemplate",
        ".spec.allowedEngineArgs[]",
        "pattern must be given for type String, and only for it",
        mtemplate(allowedEngineArgs=[{"name": "quantization", "type": "String"}]),
    ),
    Case(
        "ModelTemplate",
        ".spec.allowedEngineArgs[]",
        "minimum and maximum apply to types Integer and Number only",
        mtemplate(allowedEngineArgs=[{"name": "enable-prefix-caching", "type": "Boolean", "maximum": 1}]),
    ),
    Case(
        "ModelTemplate",
        ".spec.engine.env[]",
        "an env entry has a value or a valueFrom, not both",
        mtemplate(
            engine={
                "env": [{"name": "T", "value": "x", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]
            }
        ),
    ),
    Case(
        "ModelTemplate",
        ".spec.engine.env[].valueFrom",
        "valueFrom takes exactly one of secretKeyRef and configMapKeyRef",
        mtemplate(engine={"env": [{"name": "T", "valueFrom": {}}]}),
    ),
    Case(
        "ModelTemplate",
        ".spec.resources",
        "GPUs are set by gpusPerWorker, not in resources",
        mtemplate(resources={"requests": {"nvidia.com/gpu": "1"}}),
    ),
    Case(
        "ModelTemplate",
        ".spec.resources.requests",
        "keys must be 1 to 316 characters long",
        mtemplate(resources={"requests": {LONG_KEY: "1"}}),
    ),
    Case(
        "ModelTemplate",
        ".spec.resources.limits",
        "keys must be 1 to 316 characters long",
        mtemplate(resources={"limits": {LONG_KEY: "1"}}),
    ),
    Case(
        "ModelTemplate",
        ".spec.nodeSelector",
        "keys must be 1 to 316 characters long",
        mtemplate(nodeSelector={LONG_KEY: "x"}),
    ),
]


def crd_rules() -> set[tuple[str, str, str]]:
    """(kind, schema path, message) of every x-kubernetes-validations rule in the generated CRDs."""
    rules = set()
    for resource in api.RESOURCES:
        schema = crdtools.root_schema(crdtools.load_crd(resource.crd.kind))
        for path, node in crdtools.walk(schema):
            for rule in node.get("x-kubernetes-validations", []):
                rules.add((resource.crd.kind, path, rule["message"]))
    return rules


def test_every_rule_has_a_case() -> None:
    covered = set()
    for case in CASES:
        matching = {
            r for r in crd_rules() if r[:2] == (case.kind, case.path) and r[2].startswith(case.message)
        }
        assert len(matching) == 1, f"{case.id}: no single rule of that path and message"
        covered |= matching
    assert crd_rules() - covered == set(), "rules without a case: add one to CASES"


def apply(kube: Kube, obj: Wire) -> tuple[int, str]:
    done = kubectl(kube, "apply", "-f", "-", stdin=json.dumps(obj))
    return done.returncode, done.stdout + done.stderr


@pytest.mark.usefixtures("crds")
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_the_api_server_refuses_what_the_rule_forbids_with_its_message(
    kube: Kube, namespace: str, case: Case
) -> None:
    name = f"cel-{uuid.uuid4().hex[:8]}"

    def placed(obj: Wire) -> Wire:
        if case.kind == "BatchInference":
            obj["metadata"]["namespace"] = namespace
        return obj

    if case.before is not None:
        code, output = apply(kube, placed(case.before(name)))
        assert code == 0, f"the unchanged object must be accepted: {output}"
    code, output = apply(kube, placed(case.violating(name)))
    assert code != 0, f"accepted what `{case.message}` forbids"
    assert case.message in output, output
    if case.before is None:  # nothing was stored
        kind = {"BatchInference": "batchinferences", "BatchPool": "batchpools"}.get(
            case.kind, "modeltemplates"
        )
        where = ["-n", namespace] if case.kind == "BatchInference" else []
        missing = kubectl(kube, "get", f"{kind}.troughfill.io/{name}", *where)
        assert missing.returncode != 0, missing.stdout
        assert "NotFound" in missing.stderr
    else:  # the stored object is still the one before the change
        stored = kubectl(kube, "get", "batchinferences.troughfill.io", name, "-n", namespace, "-o", "json")
        spec = json.loads(stored.stdout)["spec"]
        before = case.before(name)["spec"]
        assert {key: spec.get(key) for key in before} == before


def test_a_rule_over_the_cost_budget_is_refused_when_the_crd_is_created(kube: Kube) -> None:
    """The API server estimates each rule's worst-case cost from the schema's bounds: an
    unbounded list compared pairwise by regex is refused. Ours all pass this check (the
    `crds` fixture applies them), so a rule of ours over the budget would fail there."""
    group = f"cost-{uuid.uuid4().hex[:6]}.troughfill.test"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Cluster",
            "names": {"kind": "Widget", "plural": "widgets", "singular": "widget", "listKind": "WidgetList"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {"names": {"type": "array", "items": {"type": "string"}}},
                                    "x-kubernetes-validations": [
                                        {"rule": "self.names.all(a, self.names.all(b, a.matches(b)))"}
                                    ],
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    done = kubectl(kube, "apply", "--server-side", "--dry-run=server", "-f", "-", stdin=json.dumps(crd))
    assert done.returncode != 0
    assert "cost" in done.stderr, done.stderr
    assert "budget" in done.stderr
    ours = kubectl(
        kube, "apply", "--server-side", "--dry-run=server", "-k", str(REPO_ROOT / "manifests" / "crds")
    )
    assert ours.returncode == 0, ours.stderr


@pytest.mark.usefixtures("crds")
@pytest.mark.parametrize("value", ["--trust-remote-code", "--model=other/repo", "-x"])
def test_an_engine_arg_value_that_looks_like_a_flag_is_refused_by_the_schema(
    kube: Kube, namespace: str, value: str
) -> None:
    obj = job(engineArgs=[{"name": "max-num-seqs", "value": value}])(f"flag-{uuid.uuid4().hex[:8]}")
    obj["metadata"]["namespace"] = namespace
    code, output = apply(kube, obj)
    assert code != 0, f"the API server stored engineArgs value {value!r}"
    assert "spec.engineArgs[0].value" in output, output
    assert "should match" in output, output
