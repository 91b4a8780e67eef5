"""The worker pod: what the template and pool decide, what the job may add, valid for Kubernetes."""

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from troughfill import constants
from troughfill.api import BatchInference, BatchPool, ModelTemplate, admit
from troughfill.kube.workerpod import (
    WorkerEnvironment,
    deletion_cost,
    job_secret,
    job_secret_name,
    model_argument,
    worker_pod,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"


def load(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    return loaded


def examples() -> tuple[BatchInference, ModelTemplate, BatchPool]:
    """The example job (with a uid, as the API server gives it), template and pool."""
    job_wire = load("batchinference.yaml")
    job_wire["metadata"]["uid"] = "1234-abcd"
    return (
        BatchInference.model_validate(job_wire),
        ModelTemplate.model_validate(load("template.yaml")),
        BatchPool.model_validate(load("pool.yaml")),
    )


@pytest.fixture
def pod() -> dict[str, Any]:
    job, template, pool = examples()
    admission = admit(job, template, pool)
    assert admission.allowed, admission.message
    environment = WorkerEnvironment(ledger_url="http://troughfill-ledger.troughfill-system.svc:8090")
    return worker_pod("ticket-triage-w-1", job, template, pool, admission, environment=environment)


def test_the_template_and_pool_decide_image_model_gpus_and_priority(pod: dict[str, Any]) -> None:
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "troughfill/worker:0.1.0-vllm-v0.11.0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}
    command = container["command"]
    engine = command[command.index("--") + 1 :]
    assert engine[engine.index("--model") + 1] == "/models/SmolLM2-135M-Instruct"
    assert engine[engine.index("--port") + 1] == constants.ENGINE_PORT_PLACEHOLDER
    assert engine[-1] == "--max-num-seqs=128"  # the job's allowlisted flag, one word, last
    assert command[command.index("--job") + 1] == "team-a/ticket-triage/1234-abcd"
    assert command[command.index("--on-sigterm") + 1] == "yield"  # unannounced SIGTERM: preemption
    assert pod["spec"]["priorityClassName"] == constants.DEFAULT_BATCH_PRIORITY_CLASS
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["terminationGracePeriodSeconds"] >= 10
    assert container["readinessProbe"]["timeoutSeconds"] >= 5  # a Python start-up, on a busy node


def test_the_pod_is_owned_by_its_job_and_labelled_for_selection(pod: dict[str, Any]) -> None:
    meta = pod["metadata"]
    (owner,) = meta["ownerReferences"]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("BatchInference", "1234-abcd", True)
    assert meta["labels"][constants.LABEL_JOB_UID] == "1234-abcd"
    assert meta["labels"][constants.LABEL_COMPONENT] == constants.COMPONENT_WORKER
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    # No Redis at all: the ledger service, with the job's token from the job's Secret.
    assert not any(name.startswith("TROUGHFILL_REDIS_") for name in env)
    assert env["TROUGHFILL_LEDGER_URL"]["value"] == "http://troughfill-ledger.troughfill-system.svc:8090"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


@pytest.mark.parametrize("version", ["1.29.0", kubernetes_validate.latest_version()])
def test_the_pod_is_a_valid_kubernetes_pod(pod: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(pod, version, strict=True)


@pytest.mark.parametrize(
    ("uri", "argument"),
    [("file:///models/x", "/models/x"), ("/models/x", "/models/x"), ("hf://org/model", "org/model")],
)
def test_model_uris_become_engine_arguments(uri: str, argument: str) -> None:
    assert model_argument(uri) == argument


def test_deletion_cost_follows_the_planners_victim_order() -> None:
    """Not serving < serving with nothing unsaved < serving with more unsaved (coarsely)."""
    costs = [
        deletion_cost(False, 10_000),
        deletion_cost(True, 0),
        deletion_cost(True, 1),
        deletion_cost(True, 100),
        deletion_cost(True, 5_000),
    ]
    assert [int(c) for c in costs] == sorted(int(c) for c in costs)
    assert costs[0] == "0"
    assert len(set(costs)) == len(costs)
    assert deletion_cost(True, 100) == deletion_cost(True, 127)  # a patch per magnitude, not per token
    assert int(deletion_cost(True, 10**30)) <= 2**31 - 1


def test_object_store_endpoint_style_and_credentials_reach_the_worker() -> None:
    job, template, pool = examples()
    environment = WorkerEnvironment(
        ledger_url="http://ledger:8090",
        s3_endpoint_url="http://s3.object-store.svc",
        s3_addressing_style="path",
    )
    made = worker_pod("w", job, template, pool, admit(job, template, pool), environment=environment)
    (container,) = made["spec"]["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["TROUGHFILL_S3_ENDPOINT_URL"] == "http://s3.object-store.svc"
    assert env["TROUGHFILL_S3_ADDRESSING_STYLE"] == "path"
    # The job's own Secret (its grant's credentials and ledger token), named after the job and
    # its uid, read key by key: never the whole Secret (the tenant can put anything in it).
    assert "envFrom" not in container
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert set(refs) == {"TROUGHFILL_LEDGER_TOKEN", *constants.STORAGE_SECRET_KEYS}
    assert {ref["name"] for ref in refs.values()} == {job_secret_name(job)}
    assert {name for name, ref in refs.items() if not ref["optional"]} == {"TROUGHFILL_LEDGER_TOKEN"}
    assert job_secret_name(job) == "ticket-triage-troughfill-1234-abc"
    kubernetes_validate.validate(made, kubernetes_validate.latest_version(), strict=True)


def test_the_jobs_secret_is_owned_by_the_job_and_holds_only_what_it_is_given() -> None:
    job, _, _ = examples()
    secret = job_secret(job, {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"})
    assert secret["metadata"]["namespace"] == "team-a"
    (owner,) = secret["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("BatchInference", "1234-abcd", True)
    assert secret["stringData"] == {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}
    kubernetes_validate.validate(secret, kubernetes_validate.latest_version(), strict=True)


def test_a_slow_first_start_is_allowed_several_cold_starts_before_a_restart(pod: dict[str, Any]) -> None:
    (container,) = pod["spec"]["containers"]
    startup = container["startupProbe"]
    allowed = startup["periodSeconds"] * startup["failureThreshold"]
    assert allowed >= 3 * 90  # the example template's coldStartSeconds
    assert "initialDelaySeconds" not in container["livenessProbe"]  # liveness only judges after startup


def test_workers_get_the_ledger_services_url_and_no_redis_credential() -> None:
    job, template, pool = examples()
    environment = WorkerEnvironment(ledger_url="https://ledger:8090")
    made = worker_pod("w", job, template, pool, admit(job, template, pool), environment=environment)
    env = {item["name"]: item for item in made["spec"]["containers"][0]["env"]}
    assert env["TROUGHFILL_LEDGER_URL"]["value"] == "https://ledger:8090"
    assert not [name for name in env if "REDIS" in name]
    assert made["metadata"]["labels"][constants.LABEL_LEDGER_CLIENT] == "true"


def test_workers_meet_the_restricted_pod_security_standard(pod: dict[str, Any]) -> None:
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 1000  # the template's runAsUser, never 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    assert not any("hostPath" in volume for volume in spec.get("volumes", []))
    assert "hostNetwork" not in spec
    assert "hostPID" not in spec


def test_template_env_takes_secret_and_configmap_keys_of_the_jobs_namespace() -> None:
    job, _, pool = examples()
    template_wire = load("template.yaml")
    template_wire["spec"]["engine"]["env"] = [
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
        {"name": "VLLM_LOGGING_LEVEL", "valueFrom": {"configMapKeyRef": {"name": "engine", "key": "log"}}},
        {"name": "PLAIN", "value": "1"},
    ]
    template = ModelTemplate.model_validate(template_wire)
    made = worker_pod(
        "w",
        job,
        template,
        pool,
        admit(job, template, pool),
        environment=WorkerEnvironment("http://ledger:8090"),
    )
    env = {item["name"]: item for item in made["spec"]["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token", "optional": False}}
    assert env["VLLM_LOGGING_LEVEL"]["valueFrom"]["configMapKeyRef"]["name"] == "engine"
    assert env["PLAIN"] == {"name": "PLAIN", "value": "1"}
    kubernetes_validate.validate(made, kubernetes_validate.latest_version(), strict=True)
