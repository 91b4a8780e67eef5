"""The Batch API's cluster side against a real API server: TokenReview of real ServiceAccount
tokens (fresh, expired, forged), SubjectAccessReview against real RBAC, BatchInferences created,
read, listed and cancelled through the CRDs' validation. The official client drives it; no
operator runs here (the install tier runs the whole round trip with workers)."""

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from kubernetes import client

from tests.batchapitools import resigned, serving
from tests.builders import pool, template
from tests.e2e.conftest import Kube, kubectl
from troughfill import constants
from troughfill.batchapi.files import Files
from troughfill.batchapi.kube import KubeJobs, KubeReviews
from troughfill.batchapi.mapping import DEFAULT_TEMPLATE_ANNOTATION, job_name
from troughfill.batchapi.server import BatchApi
from troughfill.config import Settings
from troughfill_dev.localcluster.stack import create_namespace

pytestmark = pytest.mark.usefixtures("crds")

VERBS = ["get", "list", "watch", "create", "update", "patch", "delete"]


def line(index: int) -> str:
    body = {"model": "tiny", "messages": [{"role": "user", "content": f"hi {index}"}], "max_tokens": 4}
    return json.dumps(
        {"custom_id": f"r{index}", "method": "POST", "url": "/v1/chat/completions", "body": body}
    )


def requests_file(count: int) -> bytes:
    return "".join(line(i) + "\n" for i in range(count)).encode()


def batch_user(kube: Kube, namespace: str, name: str, verbs: list[str]) -> str:
    """A ServiceAccount allowed `verbs` on batchinferences in `namespace`, and a token of it."""
    rbac = client.RbacAuthorizationV1Api(kube.api)
    kube.core.create_namespaced_service_account(namespace, {"metadata": {"name": name}})
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": name},
            "rules": [{"apiGroups": [constants.API_GROUP], "resources": ["batchinferences"], "verbs": verbs}],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
        },
    )
    done = kubectl(kube, "-n", namespace, "create", "token", name, "--duration=1h")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@dataclass
class Site:
    url: str
    kube: Kube
    team_a: str
    team_b: str
    alice: str
    bob: str
    viewer: str
    root: Path
    template: str

    def client(self, token: str, organization: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=token, organization=organization, max_retries=0
        )


@pytest.fixture
def site(kube: Kube, tmp_path: Path) -> Iterator[Site]:
    suffix = uuid.uuid4().hex[:6]
    team_a, team_b = f"oai-a-{suffix}", f"oai-b-{suffix}"
    for namespace in (team_a, team_b):
        create_namespace(kube.api, namespace)
    kube.core.patch_namespace(
        team_a, {"metadata": {"annotations": {DEFAULT_TEMPLATE_ANNOTATION: f"t-{suffix}"}}}
    )
    custom = client.CustomObjectsApi(kube.api)
    grants = {
        team: [{"prefix": f"file://{tmp_path}/{team}/", "access": "ReadWrite"}] for team in (team_a, team_b)
    }
    quotas = [{"namespace": team, "maxGPUs": 1, "storage": grants[team]} for team in (team_a, team_b)]
    custom.create_cluster_custom_object(
        constants.API_GROUP, constants.API_VERSION, "batchpools", pool(f"p-{suffix}", quotas=quotas)
    )
    custom.create_cluster_custom_object(
        constants.API_GROUP,
        constants.API_VERSION,
        "modeltemplates",
        template(f"t-{suffix}", pool_ref=f"p-{suffix}"),
    )
    alice = batch_user(kube, team_a, "alice", VERBS)
    bob = batch_user(kube, team_b, "bob", VERBS)
    viewer = batch_user(kube, team_a, "viewer", ["get", "list", "watch"])
    settings = Settings(namespace=team_a, api_max_file_bytes=1 << 20, api_max_file_lines=1000)
    jobs = KubeJobs(kube.api)
    # Reviews are not cached here: a test that changes RBAC sees it at once.
    api = BatchApi(KubeReviews(kube.api, cache_seconds=0), jobs, Files(jobs, settings), settings)
    try:
        with serving(api) as url:
            yield Site(url, kube, team_a, team_b, alice, bob, viewer, tmp_path, f"t-{suffix}")
    finally:
        for plural, name in (("batchpools", f"p-{suffix}"), ("modeltemplates", f"t-{suffix}")):
            custom.delete_cluster_custom_object(constants.API_GROUP, constants.API_VERSION, plural, name)
        for namespace in (team_a, team_b):
            kube.core.delete_namespace(namespace)


def test_batches_are_batchinferences_the_cluster_validates(site: Site) -> None:
    alice = site.client(site.alice)
    uploaded = alice.files.create(file=("in.jsonl", requests_file(5)), purpose="batch")
    batch = alice.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="36h",
        metadata={"k": "v"},
    )
    name = job_name(batch.id)
    assert name is not None
    found = client.CustomObjectsApi(site.kube.api).get_namespaced_custom_object(
        constants.API_GROUP, constants.API_VERSION, site.team_a, "batchinferences", name
    )
    spec = found["spec"]
    assert spec["inputURL"] == f"file://{site.root}/{site.team_a}/openai-files/{uploaded.id}/data.jsonl"
    assert spec["outputURL"] == f"file://{site.root}/{site.team_a}/openai-batches/{name}/"
    assert (spec["completionWindow"], spec["metadata"], spec["templateRef"]) == (
        "36h",
        {"k": "v"},
        site.template,
    )
    assert found["metadata"]["labels"]["troughfill.io/created-by"] == "openai-batch-api"
    assert alice.batches.retrieve(batch.id).status == "validating"
    assert [b.id for b in alice.batches.list()] == [batch.id]
    # Cancel is the spec.cancel latch, through the CRD's CEL rules; asking twice is the same.
    assert alice.batches.cancel(batch.id).status == "cancelling"
    assert alice.batches.cancel(batch.id).status == "cancelling"
    cancelled = client.CustomObjectsApi(site.kube.api).get_namespaced_custom_object(
        constants.API_GROUP, constants.API_VERSION, site.team_a, "batchinferences", name
    )
    assert cancelled["spec"]["cancel"] is True
    # A job made with kubectl reads as a batch, its input as a file.
    done = kubectl(
        site.kube, "-n", site.team_a, "apply", "-f", "-",
        stdin=json.dumps({
            "apiVersion": constants.GROUP_VERSION, "kind": "BatchInference",
            "metadata": {"name": "nightly"},
            "spec": {"inputURL": spec["inputURL"], "outputURL": f"file://{site.root}/{site.team_a}/nightly/",
                     "templateRef": spec["templateRef"]},
        }),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert alice.batches.retrieve("batch_nightly").input_file_id == "file-input.nightly"
    assert alice.files.content("file-input.nightly").read() == requests_file(5)


def test_rbac_decides_who_may_do_what_where(site: Site) -> None:
    alice = site.client(site.alice)
    uploaded = alice.files.create(file=("in.jsonl", requests_file(2)), purpose="batch")
    batch = alice.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    # Another namespace's ServiceAccount: nothing of team A in its own namespace, 403 naming A.
    bob = site.client(site.bob)
    with pytest.raises(openai.NotFoundError):
        bob.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        bob.files.content(uploaded.id)
    assert list(bob.batches.list()) == []
    with pytest.raises(
        openai.PermissionDeniedError, match=f"may not get batchinferences in namespace '{site.team_a}'"
    ):
        site.client(site.bob, organization=site.team_a).batches.retrieve(batch.id)
    # A viewer in team A reads but may not create or cancel.
    viewer = site.client(site.viewer)
    assert viewer.batches.retrieve(batch.id).id == batch.id
    with pytest.raises(openai.PermissionDeniedError, match="may not patch"):
        viewer.batches.cancel(batch.id)
    with pytest.raises(openai.PermissionDeniedError, match="may not create"):
        viewer.files.create(file=("in.jsonl", requests_file(1)), purpose="batch")
    # Team B has no default template: its batch names one, or is refused.
    theirs = bob.files.create(file=("in.jsonl", requests_file(1)), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="No ModelTemplate"):
        bob.batches.create(input_file_id=theirs.id, endpoint="/v1/chat/completions", completion_window="24h")


def test_expired_and_forged_tokens_get_401(site: Site) -> None:
    assert site.kube.plane is not None, "needs the local cluster's ServiceAccount key"
    key = site.kube.plane.pki.sa_key.read_bytes()
    assert list(site.client(resigned(site.alice, key, 0)).batches.list()) == []  # the re-signing is sound
    for token in (resigned(site.alice, key, -4 * 3600), site.alice[:-8] + "AAAAAAAA", "not-a-token"):
        with pytest.raises(openai.AuthenticationError, match="not accepted by the cluster"):
            site.client(token).batches.list()
