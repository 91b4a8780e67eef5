"""Wire-form (camelCase dict) builders for the three resources, valid by default.

Tests override one thing at a time with `with_path`, so each case states only what it breaks.
"""

import copy
from typing import Any

Wire = dict[str, Any]
STORAGE = [{"prefix": "s3://bucket/"}, {"prefix": "file:///"}]


def batch_inference(name: str = "job", namespace: str = "team-a", **spec: Any) -> Wire:
    return {
        "apiVersion": "troughfill.io/v1alpha1",
        "kind": "BatchInference",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "inputURL": "s3://bucket/in.jsonl",
            "outputURL": "s3://bucket/out/",
            "templateRef": "tiny",
            **spec,
        },
    }


def pool(name: str = "gpus", **spec: Any) -> Wire:
    return {
        "apiVersion": "troughfill.io/v1alpha1",
        "kind": "BatchPool",
        "metadata": {"name": name},
        "spec": {
            "gpus": {"count": 8},
            "online": {"gpusInUseQuery": "sum(online_gpus)"},
            # Storage: the bucket of batch_inference's URLs, and files (tests' temporary directories).
            "quotas": [{"namespace": "team-a", "maxGPUs": 4, "storage": STORAGE}],
            **spec,
        },
    }


def template(name: str = "tiny", pool_ref: str = "gpus", **spec: Any) -> Wire:
    return {
        "apiVersion": "troughfill.io/v1alpha1",
        "kind": "ModelTemplate",
        "metadata": {"name": name},
        "spec": {
            "poolRef": pool_ref,
            "image": "vllm/vllm-openai:v0.11.0",
            "model": {"uri": "/models/tiny", "servedModelName": "tiny"},
            **spec,
        },
    }


def with_path(obj: Wire, path: str, value: Any) -> Wire:
    """A deep copy with the dotted `path` set to `value` (a value of `...` deletes the key)."""
    result = copy.deepcopy(obj)
    *parents, last = path.split(".")
    node = result
    for part in parents:
        node = node.setdefault(part, {})
    if value is ...:
        node.pop(last, None)
    else:
        node[last] = value
    return result
