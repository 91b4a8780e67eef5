"""Validate objects against a generated CRD the way an API server would, without one.

Two halves: the OpenAPI schema (types, patterns, bounds, enums) through jsonschema's
Draft 4 validator (OpenAPI 3.0 schemas are Draft 4 plus `nullable`), with unknown
fields refused as kubectl's default strict field validation does, and every
x-kubernetes-validations rule through cel-python, a real CEL interpreter, with the
schema's defaults applied first (the API server defaults before it validates).
"""

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

from tests.conftest import REPO_ROOT

Schema = dict[str, Any]


def load_crd(kind: str, directory: Path = REPO_ROOT / "crds") -> dict[str, Any]:
    for path in directory.glob("*.troughfill.io.yaml"):
        crd: dict[str, Any] = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            return crd
    raise KeyError(kind)


def root_schema(crd: dict[str, Any]) -> Schema:
    schema: Schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def walk(schema: Schema, path: str = "") -> Iterator[tuple[str, Schema]]:
    """Every schema node with its path (properties by name, `[]` for items, `{}` for map values)."""
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if "items" in schema:
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


def _to_draft4(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_to_draft4(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {
        k: _to_draft4(v) for k, v in schema.items() if not k.startswith("x-kubernetes") and k != "nullable"
    }
    if "properties" in schema:
        out["properties"] = {name: _to_draft4(child) for name, child in schema["properties"].items()}
        # Strict field validation, kubectl's default since 1.27: unknown fields are errors, not pruned.
        out["additionalProperties"] = False
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def schema_errors(schema: Schema, obj: Any) -> list[str]:
    validator = jsonschema.Draft4Validator(_to_draft4(schema))
    return [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(obj)]


def apply_defaults(schema: Schema, obj: Any) -> Any:
    """The object as the API server stores it: missing properties with a default get it, recursively."""
    obj = copy.deepcopy(obj)
    if isinstance(obj, dict):
        for name, child in schema.get("properties", {}).items():
            if name not in obj and "default" in child:
                obj[name] = copy.deepcopy(child["default"])
            if name in obj:
                obj[name] = apply_defaults(child, obj[name])
        values = schema.get("additionalProperties")
        if isinstance(values, dict):
            for key in obj:
                obj[key] = apply_defaults(values, obj[key])
    elif isinstance(obj, list) and "items" in schema:
        obj = [apply_defaults(schema["items"], item) for item in obj]
    return obj


_ENVIRONMENT = celpy.Environment()


def compile_rule(rule: str) -> Any:
    return _ENVIRONMENT.program(_ENVIRONMENT.compile(rule))


def evaluate(rule: str, value: Any, old_value: Any = None) -> bool:
    activation = {"self": celpy.json_to_cel(value)}
    if old_value is not None:
        activation["oldSelf"] = celpy.json_to_cel(old_value)
    result = compile_rule(rule).evaluate(activation)
    if isinstance(result, Exception):
        raise result
    return bool(result)


def _is_transition_rule(rule: str) -> bool:
    return "oldSelf" in rule


def cel_failures(schema: Schema, obj: Any, old: Any = None) -> list[str]:
    """Messages of every rule that fails, walking the object (and its old version for transition rules)."""
    failures = []
    for rule in schema.get("x-kubernetes-validations", []):
        if _is_transition_rule(rule["rule"]):
            if old is None:
                continue
            holds = evaluate(rule["rule"], obj, old)
        else:
            holds = evaluate(rule["rule"], obj)
        if not holds:
            failures.append(rule["message"])
    if isinstance(obj, dict):
        for name, child in schema.get("properties", {}).items():
            if name in obj:
                old_child = old.get(name) if isinstance(old, dict) else None
                failures += cel_failures(child, obj[name], old_child)
        values = schema.get("additionalProperties")
        if isinstance(values, dict):
            for value in obj.values():
                failures += cel_failures(values, value)
    elif isinstance(obj, list) and "items" in schema:
        for item in obj:
            failures += cel_failures(schema["items"], item)
    return failures


def server_verdict(kind: str, obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """Everything a CEL-capable API server would reject `obj` for (empty: accepted)."""
    schema = root_schema(load_crd(kind))
    stored = apply_defaults(schema, obj)
    old_stored = apply_defaults(schema, old) if old is not None else None
    return schema_errors(schema, stored) + cel_failures(schema, stored, old_stored)
