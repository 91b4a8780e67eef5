"""The generated CRDs: up to date, structural, valid for Kubernetes, and in agreement with pydantic."""

from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import kubernetes_validate
import pytest
from hypothesis import given

from tests.builders import batch_inference
from tests.manifests import crdtools
from tests.unit.test_models import INVALID_CASES, VALID_CASES
from troughfill import api
from troughfill.api import crdgen
from troughfill.api.resource import Resource
from troughfill.api.types import parse_duration

KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
KINDS = [r.crd.kind for r in api.RESOURCES]


def test_crds_directory_is_up_to_date(repo_root: Path) -> None:
    stale = crdgen.stale_files(repo_root / "crds", crdgen.render(api.RESOURCES))
    assert not stale, f"crds/ is stale ({', '.join(stale)}): run `troughfill crds`"


def test_stale_detection_notices_edits_and_strays(tmp_path: Path) -> None:
    rendered = crdgen.render(api.RESOURCES)
    crdgen.write(tmp_path, rendered)
    assert crdgen.stale_files(tmp_path, rendered) == []
    first = sorted(rendered)[0]
    (tmp_path / first).write_text(rendered[first] + "# hand edit\n")
    (tmp_path / "leftover.yaml").write_text("{}\n")
    assert crdgen.stale_files(tmp_path, rendered) == sorted([first, "leftover.yaml"])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_crd_is_a_valid_customresourcedefinition(kind: str, version: str) -> None:
    kubernetes_validate.validate(crdtools.load_crd(kind), version, strict=True)


@pytest.mark.parametrize("kind", KINDS)
def test_schema_is_structural(kind: str) -> None:
    """The rules an API server applies before it accepts a CRD schema (apiextensions 'structural')."""
    for path, node in crdtools.walk(crdtools.root_schema(crdtools.load_crd(kind))):
        where = path or "(root)"
        assert "$ref" not in node, where
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{where} has no type"
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string"), f"{where}: anyOf outside int-or-string"
            assert all(set(option) == {"type"} for option in node["anyOf"]), where
        assert not ("properties" in node and "additionalProperties" in node), where
        assert node.get("additionalProperties", {}) is not False, where
        for keyword in ("uniqueItems", "patternProperties", "const", "title"):
            assert keyword not in node, (where, keyword)
        if node.get("x-kubernetes-list-type") == "map":
            item = node["items"]
            for key in node["x-kubernetes-list-map-keys"]:
                assert key in item.get("required", []) or "default" in item["properties"][key], (where, key)
        if node.get("type") == "array" and node.get("x-kubernetes-list-type") is None:
            # Lists without a list type are atomic: fine, but must be bounded for CEL cost estimates.
            assert "maxItems" in node, f"{where} is an unbounded list"


@pytest.mark.parametrize("kind", KINDS)
def test_every_cel_rule_compiles(kind: str) -> None:
    rules = [
        rule["rule"]
        for _, node in crdtools.walk(crdtools.root_schema(crdtools.load_crd(kind)))
        for rule in node.get("x-kubernetes-validations", [])
    ]
    assert rules
    for rule in rules:
        crdtools.compile_rule(rule)


@pytest.mark.parametrize("kind", KINDS)
def test_printer_columns_point_at_schema_fields(kind: str) -> None:
    crd = crdtools.load_crd(kind)
    paths = {path for path, _ in crdtools.walk(crdtools.root_schema(crd))}
    for column in crd["spec"]["versions"][0]["additionalPrinterColumns"]:
        if column["jsonPath"] != ".metadata.creationTimestamp":
            assert column["jsonPath"] in paths, column


@pytest.mark.parametrize(("model", "wire"), VALID_CASES)
def test_api_server_accepts_what_pydantic_accepts(model: type[Resource], wire: dict[str, Any]) -> None:
    assert crdtools.server_verdict(model.crd.kind, wire) == []


@pytest.mark.parametrize(("model", "wire", "location", "message"), INVALID_CASES)
def test_api_server_rejects_what_pydantic_rejects(
    model: type[Resource], wire: dict[str, Any], location: str, message: str
) -> None:
    crd = crdtools.load_crd(model.crd.kind)
    if "has more than one entry with" in message:
        # Duplicate list-map keys: the API server refuses them itself, given the list type.
        field = message.split(" has more than one entry", maxsplit=1)[0]
        list_types = {
            path.rsplit(".", 1)[-1]: node.get("x-kubernetes-list-type")
            for path, node in crdtools.walk(crdtools.root_schema(crd))
        }
        assert list_types[field] == "map"
    elif location in {"apiVersion", "kind"}:
        # Routing, not schema: the server has no such resource to send it to.
        served = (
            f"{crd['spec']['group']}/{crd['spec']['versions'][0]['name']}",
            crd["spec"]["names"]["kind"],
        )
        assert (wire["apiVersion"], wire["kind"]) != served
    else:
        verdict = crdtools.server_verdict(model.crd.kind, wire)
        assert verdict, f"the CRD accepts what pydantic rejects at {location}: {message}"


def test_rule_messages_are_the_same_on_both_sides() -> None:
    verdict = crdtools.server_verdict("BatchInference", batch_inference(minWorkers=3, maxWorkers=1))
    assert verdict == ["minWorkers must not exceed maxWorkers"]


@pytest.mark.parametrize(
    ("change", "refused"),
    [
        ({"inputURL": "s3://bucket/other.jsonl"}, ["inputURL is immutable"]),
        ({"engineArgs": [{"name": "max-num-seqs", "value": "9"}]}, ["engineArgs is immutable"]),
        ({"completionWindow": "48h"}, ["completionWindow is immutable"]),
        ({"suspend": True, "maxWorkers": 4}, []),
        ({"cancel": True}, []),
    ],
)
def test_immutable_fields_are_refused_by_transition_rules(change: dict[str, Any], refused: list[str]) -> None:
    old = batch_inference(engineArgs=[{"name": "max-num-seqs", "value": "8"}])
    new = batch_inference(**{**old["spec"], **change})
    assert crdtools.server_verdict("BatchInference", new, old) == refused
    old_spec = api.BatchInference.model_validate(old).spec
    new_spec = api.BatchInference.model_validate(new).spec
    assert [f"{name} is immutable" for name in api.immutable_changes(old_spec, new_spec)] == refused


def test_a_cancel_cannot_be_undone_on_either_side() -> None:
    old = batch_inference(cancel=True)
    new = batch_inference(cancel=False)
    assert crdtools.server_verdict("BatchInference", new, old) == ["cancel cannot be undone"]
    assert crdtools.server_verdict("BatchInference", old, old) == []
    old_spec = api.BatchInference.model_validate(old).spec
    assert api.immutable_changes(old_spec, api.BatchInference.model_validate(new).spec) == ["cancel"]


durations = st.lists(
    st.tuples(st.integers(min_value=0, max_value=500), st.sampled_from(["ms", "s", "m", "h"])),
    min_size=1,
    max_size=3,
).map(lambda parts: "".join(f"{n}{unit}" for n, unit in parts))


@given(durations)
def test_python_durations_agree_with_cel(text: str) -> None:
    seconds = parse_duration(text).total_seconds()
    assert crdtools.evaluate(f"duration(self) == duration('{seconds:.3f}s')", text)
