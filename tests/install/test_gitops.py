"""Install tier, the GitOps way: a real Argo CD syncs troughfill itself onto the local cluster.

One Application over manifests/argocd (app of apps; only the repoURLs changed) makes the two
Applications troughfill ships: the CRDs (sync wave -1, server-side) and then the operator
(wave 0, manifests/base: the operator, the Batch API and Redis as pods under their own
ServiceAccounts, local images as in the rest of this tier). What an admin provides first
(the namespace's Secrets) is made with kubectl, as docs/install.md says.
"""

import secrets
import shutil
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.conftest import REPO_ROOT
from tests.install.conftest import Site
from tests.reporting import report
from troughfill import constants
from troughfill_dev.localcluster.argocd import ARGOCD_NAMESPACE, ArgoCD, GitRepo, make_repo, start_argocd
from troughfill_dev.localcluster.services import RedisServer, wait_until

SYSTEM = constants.OPERATOR_NAMESPACE
CHILDREN = ("troughfill-crds", "troughfill")
# Argo CD (1.8 and later) gives Application resources no health of their own, so an app of apps
# would not wait for one wave's Applications to be healthy before the next. Argo CD's docs give
# this check for that (an Argo CD setting, not troughfill's: docs/gitops.md).
APPLICATION_HEALTH = """\
hs = {}
hs.status = "Progressing"
hs.message = ""
if obj.status ~= nil then
  if obj.status.health ~= nil then
    hs.status = obj.status.health.status
    if obj.status.health.message ~= nil then
      hs.message = obj.status.health.message
    end
  end
end
return hs
"""


@pytest.fixture(scope="module")
def argocd(
    site: Site, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ArgoCD]:
    started = start_argocd(site.plane, redis_server, tmp_path_factory.mktemp("argocd"))
    health = {"data": {"resource.customizations.health.argoproj.io_Application": APPLICATION_HEALTH}}
    site.plane.kubectl(
        "-n",
        ARGOCD_NAMESPACE,
        "patch",
        "configmap",
        "argocd-cm",
        "--type=merge",
        "-p",
        yaml.safe_dump(health),
    )
    yield started
    started.stop()


def repository(workdir: Path) -> GitRepo:
    """This checkout's manifests in a git repository, the shipped Applications pointed at it."""
    repo = make_repo(workdir)
    shutil.copytree(REPO_ROOT / "crds", repo.clone / "crds")
    for part in ("crds", "base"):
        shutil.copytree(REPO_ROOT / "manifests" / part, repo.clone / "manifests" / part)
    files = {}
    for name in ("crds.yaml", "operator.yaml"):
        app = yaml.safe_load((REPO_ROOT / "manifests" / "argocd" / name).read_text())
        app["spec"]["source"]["repoURL"] = repo.url
        files[f"manifests/argocd/{name}"] = yaml.safe_dump(app)
    repo.commit("troughfill", files)
    return repo


def synced_and_healthy(argocd: ArgoCD, name: str) -> bool:
    argocd.check_alive()
    listed = yaml.safe_load(argocd.plane.kubectl("-n", ARGOCD_NAMESPACE, "get", "applications", "-o", "yaml"))
    found = [app for app in listed["items"] if app["metadata"]["name"] == name]
    status = found[0].get("status", {}) if found else {}
    return (status.get("sync", {}).get("status"), status.get("health", {}).get("status")) == (
        "Synced",
        "Healthy",
    )


def sync_window(app: dict[str, Any]) -> tuple[datetime, datetime]:
    state = app["status"]["operationState"]
    return datetime.fromisoformat(state["startedAt"]), datetime.fromisoformat(state["finishedAt"])


@pytest.mark.timeout(900)
def test_argocd_syncs_the_crds_then_the_operator_from_git(site: Site, argocd: ArgoCD, tmp_path: Path) -> None:
    # What an admin makes before troughfill arrives (docs/install.md): the namespace's Secrets.
    site.plane.kubectl("create", "namespace", SYSTEM)
    site.plane.kubectl(
        "-n",
        SYSTEM,
        "create",
        "secret",
        "generic",
        "troughfill-redis",
        f"--from-literal=password={secrets.token_hex(24)}",
    )
    repo = repository(tmp_path / "git")
    parent = {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Application",
        "metadata": {"name": "troughfill-apps", "namespace": ARGOCD_NAMESPACE},
        "spec": {
            "project": "default",
            "source": {"repoURL": repo.url, "targetRevision": "main", "path": "manifests/argocd"},
            "destination": {"server": "https://kubernetes.default.svc", "namespace": ARGOCD_NAMESPACE},
            "syncPolicy": {"automated": {"prune": True, "selfHeal": True}},
        },
    }
    argocd.apply_application(parent)
    try:
        for name in (*CHILDREN, "troughfill-apps"):
            wait_until(
                lambda n=name: synced_and_healthy(argocd, n),
                420,
                f"Argo CD: {name} Synced and Healthy",
                interval=1,
            )
    except TimeoutError as error:
        apps = site.plane.kubectl("-n", ARGOCD_NAMESPACE, "get", "applications", "-o", "yaml")
        pods = site.plane.kubectl("get", "pods", "-A", "-o", "wide")
        raise AssertionError(f"{error}\n{apps[-6000:]}\n{pods}\n{argocd.logs()}") from None
    crds, operator = (argocd.application(name) for name in CHILDREN)
    # Waves: the operator's sync began only after the CRDs' had finished.
    assert sync_window(crds)[1] <= sync_window(operator)[0], (sync_window(crds), sync_window(operator))
    # The CRDs went in server-side (Argo CD's field manager owns them; no last-applied copy).
    extensions = client.ApiextensionsV1Api(site.api)
    crd = extensions.read_custom_resource_definition(f"batchinferences.{constants.API_GROUP}")
    assert "kubectl.kubernetes.io/last-applied-configuration" not in (crd.metadata.annotations or {})
    assert any(entry.manager == "argocd-controller" for entry in crd.metadata.managed_fields or [])
    # The operator app's resources, each healthy in Argo CD's eyes; the pods under their accounts.
    health = {
        (r["kind"], r["name"]): r.get("health", {}).get("status")
        for r in operator["status"]["resources"]
        if r["kind"] in {"Deployment", "StatefulSet"}
    }
    assert health == {
        ("Deployment", "troughfill-operator"): "Healthy",
        ("Deployment", "troughfill-api"): "Healthy",
        ("Deployment", "troughfill-ledger"): "Healthy",
        ("StatefulSet", "troughfill-redis"): "Healthy",
    }, health
    pods = client.CoreV1Api(site.api).list_namespaced_pod(SYSTEM).items
    accounts = {p.metadata.labels.get("app.kubernetes.io/name"): p.spec.service_account_name for p in pods}
    assert accounts["troughfill-operator"] == "troughfill-operator"
    assert accounts["troughfill-api"] == "troughfill-api"
    assert accounts["troughfill-ledger"] == "troughfill-ledger"
    windows = {name: sync_window(argocd.application(name)) for name in CHILDREN}
    report(
        "\nArgo CD app of apps: "
        + ", ".join(f"{n} synced {a:%H:%M:%S}-{b:%H:%M:%S}" for n, (a, b) in windows.items())
    )
    # The operator Argo CD installed acts: a job naming no template fails, saying why.
    site.plane.kubectl("create", "namespace", "gitops-probe")
    job = {
        "apiVersion": constants.GROUP_VERSION, "kind": constants.KIND_BATCH_INFERENCE,
        "metadata": {"name": "probe", "namespace": "gitops-probe"},
        "spec": {"inputURL": "s3://x/in.jsonl", "outputURL": "s3://x/out/", "templateRef": "nonexistent"},
    }  # fmt: skip
    site.plane.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(job))
    site.plane.kubectl(
        "-n", "gitops-probe", "wait", "--for=condition=Failed", "batchinference/probe", "--timeout=120s"
    )
