"""GitOps with a real Argo CD: its application controller and repo server (built from the
argo-cd module, run as its own development setup runs them) sync troughfill from a git
repository on disk, and report troughfill's health checks (manifests/argocd, in argocd-cm).

The CRDs' Application is manifests/argocd/crds.yaml with only repoURL changed; an admin's
Application carries a pool and a template, a team's Application a BatchInference. The operator
runs as in the other e2e tests (in this process); the workers' engine is the stand-in.
"""

import json
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kopf.testing import KopfRunner

from tests.conftest import REPO_ROOT
from tests.e2e.conftest import Kube, until
from tests.e2e.test_operator import FILES, get_job, instant_pool_and_template, job, write_requests
from tests.reporting import report
from troughfill_dev.localcluster.argocd import (
    ARGOCD_NAMESPACE,
    RESYNC_SECONDS,
    ArgoCD,
    GitRepo,
    make_repo,
    start_argocd,
)
from troughfill_dev.localcluster.services import RedisServer

ANSWER_SECONDS = 15
"""The stand-in answers each request after this long: the job runs for a while."""


@pytest.fixture(scope="module")
def argocd(
    kube: Kube, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ArgoCD]:
    if kube.plane is None:
        pytest.skip("Argo CD runs beside the local control plane")
    started = start_argocd(kube.plane, redis_server, tmp_path_factory.mktemp("argocd"))
    yield started
    started.stop()


def application(
    name: str, repo: GitRepo, path: str, namespace: str | None = None, **sync: Any
) -> dict[str, Any]:
    app: dict[str, Any] = {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Application",
        "metadata": {"name": name, "namespace": ARGOCD_NAMESPACE},
        "spec": {
            "project": "default",
            "source": {"repoURL": repo.url, "targetRevision": "main", "path": path},
            "destination": {"server": "https://kubernetes.default.svc"},
            # A failed sync is retried once, then left: the next commit is synced (a retrying
            # operation would hold the revision that failed).
            "syncPolicy": {
                "automated": {"prune": True, "selfHeal": True},
                "retry": {"limit": 1, "backoff": {"duration": "2s", "factor": 2, "maxDuration": "10s"}},
                **sync,
            },
        },
    }
    if namespace:
        app["spec"]["destination"]["namespace"] = namespace
    return app


def resource(app: dict[str, Any], kind: str, name: str) -> dict[str, Any] | None:
    return next(
        (r for r in app.get("status", {}).get("resources", []) if r["kind"] == kind and r["name"] == name),
        None,
    )


def health_of(argocd: ArgoCD, app: str, kind: str, name: str) -> tuple[str, str]:
    found = resource(argocd.application(app), kind, name) or {}
    health = found.get("health") or {}
    return health.get("status", ""), health.get("message", "")


def wait_health(argocd: ArgoCD, app: str, kind: str, name: str, status: str, timeout: float) -> str:
    """The resource's health message once Argo CD reports `status` for it."""
    seen: list[tuple[str, str]] = []

    def reported() -> str | None:
        argocd.check_alive()
        seen.append(health_of(argocd, app, kind, name))
        return seen[-1][1] if seen[-1][0] == status else None

    try:
        return until(reported, timeout, f"{kind} {name} {status} in Argo CD")
    except TimeoutError as error:
        raise AssertionError(
            f"{kind} {name} is not {status} after {timeout}s; last seen {seen[-1:]}"
        ) from error


def test_argo_cd_syncs_troughfill_from_git_and_reports_its_health(
    kube: Kube,
    argocd: ArgoCD,
    operator: KopfRunner,
    namespace: str,
    gpu_node: tuple[str, int],
    tmp_path: Path,
) -> None:
    repo = make_repo(tmp_path / "git")
    # What the platform team's repository holds: the CRDs as this one ships them.
    shutil.copytree(REPO_ROOT / "crds", repo.clone / "crds")
    shutil.copytree(REPO_ROOT / "manifests" / "crds", repo.clone / "manifests" / "crds")
    suffix = uuid.uuid4().hex[:6]
    pool, template = instant_pool_and_template(suffix, "")
    pool["spec"]["defaultQuota"] = {"maxGPUs": 2, "storage": FILES}
    pool["spec"]["drainGracePeriod"] = "0s"  # a suspended job's requests wait for its resume
    template["spec"]["engine"] = {
        "command": [sys.executable, "-m", "troughfill_dev.standin"],
        "args": ["--delay-seconds", str(ANSWER_SECONDS)],
    }
    requests = tmp_path / "requests.jsonl"
    write_requests(requests, 20)
    batch = job(
        "tickets", f"tiny-{suffix}", requests.as_uri(), (tmp_path / "out").as_uri() + "/", suspend=True
    )
    repo.commit(
        "platform and team-a",
        {
            "platform/pool.yaml": yaml.safe_dump(pool),
            "platform/template.yaml": yaml.safe_dump(template),
            "teams/team-a/tickets.yaml": yaml.safe_dump(batch),
        },
    )

    crds_app = yaml.safe_load((REPO_ROOT / "manifests" / "argocd" / "crds.yaml").read_text())
    crds_app["spec"]["source"]["repoURL"] = repo.url
    argocd.apply_application(crds_app)

    def synced_and_healthy(name: str) -> dict[str, Any] | None:
        argocd.check_alive()
        app = argocd.application(name)
        status = app.get("status", {})
        ok = (
            status.get("sync", {}).get("status") == "Synced"
            and status.get("health", {}).get("status") == "Healthy"
        )
        return app if ok else None

    until(
        lambda: synced_and_healthy("troughfill-crds"), 120, f"the CRDs' Application synced\n{argocd.logs()}"
    )

    argocd.apply_application(application(f"platform-{suffix}", repo, "platform"))
    argocd.apply_application(application("team-a", repo, "teams/team-a", namespace))

    message = wait_health(argocd, "team-a", "BatchInference", "tickets", "Suspended", 120)
    report(f"\nArgo CD: BatchInference tickets Suspended: {message}")
    assert message.startswith("Suspended at 0/20 (0%)")
    message = wait_health(argocd, f"platform-{suffix}", "BatchPool", f"pool-{suffix}", "Healthy", 60)
    report(f"Argo CD: BatchPool pool-{suffix} Healthy: {message}")
    message = wait_health(argocd, f"platform-{suffix}", "ModelTemplate", f"tiny-{suffix}", "Healthy", 60)
    report(f"Argo CD: ModelTemplate tiny-{suffix} Healthy: {message}")

    # Resume through Git: the job runs, Argo CD follows its progress, then it completes.
    batch["spec"]["suspend"] = False
    repo.commit("resume tickets", {"teams/team-a/tickets.yaml": yaml.safe_dump(batch)})
    message = wait_health(argocd, "team-a", "BatchInference", "tickets", "Progressing", 60)
    report(f"Argo CD: BatchInference tickets Progressing: {message}")
    message = wait_health(argocd, "team-a", "BatchInference", "tickets", "Healthy", 180)
    report(f"Argo CD: BatchInference tickets Healthy: {message}")
    assert message == "Completed 20/20 (100%): 20 completed, 0 failed of 20"
    assert get_job(kube, namespace, "tickets")["status"]["phase"] == "completed"
    # Self-heal does not fight the operator: status and defaults it owns leave the app Synced.
    until(lambda: synced_and_healthy("team-a"), 60, "the team's Application Synced and Healthy")

    # An immutable field changed in Git: the sync fails with the API server's CEL message.
    moved = json.loads(json.dumps(batch))
    moved["spec"]["outputURL"] = (tmp_path / "elsewhere").as_uri() + "/"
    repo.commit("move the output", {"teams/team-a/tickets.yaml": yaml.safe_dump(moved)})

    def failed_sync() -> str | None:
        operation = argocd.application("team-a").get("status", {}).get("operationState", {})
        message = str(operation.get("message", ""))
        return message if "outputURL is immutable" in message else None

    message = until(failed_sync, 120, f"a failed sync naming the immutable field\n{argocd.logs()}")
    report(f"Argo CD: sync of team-a: {message}")
    assert get_job(kube, namespace, "tickets")["spec"]["outputURL"] == batch["spec"]["outputURL"]

    cancel_by_action_and_prune(kube, argocd, repo, namespace, batch, job_maker(suffix, requests), tmp_path)


def job_maker(suffix: str, requests: Path) -> Callable[[str, Path], dict[str, Any]]:
    return lambda name, out: job(name, f"tiny-{suffix}", requests.as_uri(), out.as_uri() + "/")


def cancel_by_action_and_prune(
    kube: Kube,
    argocd: ArgoCD,
    repo: GitRepo,
    namespace: str,
    batch: dict[str, Any],
    make_job: Callable[[str, Path], dict[str, Any]],
    tmp_path: Path,
) -> None:
    # Back to Git's outputURL, and two more jobs: one cancelled by Argo CD's action, one pruned.
    jobs = {name: make_job(name, tmp_path / f"{name}-out") for name in ("doomed", "pruned")}
    jobs["pruned"]["spec"]["suspend"] = True
    repo.commit(
        "two more jobs",
        {
            "teams/team-a/tickets.yaml": yaml.safe_dump(batch),
            **{f"teams/team-a/{name}.yaml": yaml.safe_dump(obj) for name, obj in jobs.items()},
        },
    )
    wait_health(argocd, "team-a", "BatchInference", "doomed", "Progressing", 120)
    wait_health(argocd, "team-a", "BatchInference", "pruned", "Suspended", 120)

    listed = argocd.cli("app", "actions", "list", "team-a", "--kind", "BatchInference",
                        "--resource-name", "doomed", "--namespace", namespace)  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    report(f"$ argocd app actions list team-a --kind BatchInference --resource-name doomed\n{listed.stdout}")
    for action in ("suspend", "cancel"):
        ran = argocd.cli("app", "actions", "run", "team-a", action, "--kind", "BatchInference",
                         "--resource-name", "doomed", "--namespace", namespace)  # fmt: skip
        assert ran.returncode == 0, ran.stderr
        if action == "suspend":
            message = wait_health(argocd, "team-a", "BatchInference", "doomed", "Suspended", 60)
            report(f"Argo CD: BatchInference doomed Suspended (action): {message}")
    assert get_job(kube, namespace, "doomed")["spec"]["cancel"] is True
    message = wait_health(argocd, "team-a", "BatchInference", "doomed", "Degraded", 120)
    report(f"Argo CD: BatchInference doomed Degraded: {message}")
    assert message.startswith("Cancelled: cancelled: ")
    assert get_job(kube, namespace, "doomed")["status"]["phase"] == "cancelled"
    errors = [
        json.loads(line) for line in (tmp_path / "doomed-out" / "errors.jsonl").read_text().splitlines()
    ]
    assert {e["error"]["code"] for e in errors} <= {"batch_cancelled"}
    # The action's change is not Git's, and self-heal leaves it: three resyncs later the app is
    # Synced and the job still cancelled.
    time.sleep(3 * RESYNC_SECONDS)
    assert argocd.application("team-a")["status"]["sync"]["status"] == "Synced"
    assert get_job(kube, namespace, "doomed")["spec"]["cancel"] is True

    # Pruned from Git: Argo CD deletes it, the operator cancels it and writes its output (a
    # suspended job's: every request batch_cancelled).
    repo.commit("drop pruned", {"teams/team-a/pruned.yaml": None})
    pruned_errors = tmp_path / "pruned-out" / "errors.jsonl"
    until(pruned_errors.exists, 120, f"the pruned job's error file\n{argocd.logs()}")
    cancelled = [json.loads(line) for line in pruned_errors.read_text().splitlines()]
    answered = tmp_path / "pruned-out" / "output.jsonl"
    done = len(answered.read_text().splitlines()) if answered.exists() else 0
    assert (done, len(cancelled)) == (0, 20)
    assert {e["error"]["code"] for e in cancelled} == {"batch_cancelled"}
    until(
        lambda: resource(argocd.application("team-a"), "BatchInference", "pruned") is None, 60, "pruned gone"
    )
