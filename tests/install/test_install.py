"""The README's install, command for command, and the example job through to Complete.

The tests run in order and share the installation: the site's settings, then
`kubectl apply --server-side -k manifests/crds`, `kubectl apply -k manifests/base`,
`kubectl apply -k manifests/examples`; then a second operator replica.
"""

import datetime as dt
import itertools
import json
import re
import secrets
import subprocess
import time
import uuid
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from kubernetes import client

from tests.batchapitools import resigned
from tests.conftest import REPO_ROOT, wait_for_job
from tests.install.conftest import BUCKET, S3_URL, Site, read_example
from tests.reporting import report
from troughfill import constants
from troughfill_dev.localcluster.services import wait_until

OPERATOR = "troughfill-operator"
SYSTEM = constants.OPERATOR_NAMESPACE
JOB_NAMESPACE, JOB = "team-a", "ticket-triage"
ACCESS = {
    "AWS_ACCESS_KEY_ID": "team-a",
    "AWS_SECRET_ACCESS_KEY": "team-a-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
"""The object store here checks no credentials, but clients must have some to sign with."""
TRANSCRIPT: list[str] = []
"""What users would see, for docs/install.md: each command and its output."""


def kubectl(
    site: Site, *args: str, stdin: str | None = None, timeout: float = 120, check: bool = True
) -> str:
    done = subprocess.run(
        [*site.kubectl_args(), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    TRANSCRIPT.append(f"$ kubectl {' '.join(args)}\n{done.stdout}{done.stderr}")
    if check and done.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return done.stdout + done.stderr


def secret_literals(values: dict[str, str]) -> list[str]:
    return [f"--from-literal={key}={value}" for key, value in values.items()]


@pytest.fixture(scope="module", autouse=True)
def transcript(site: Site, tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield
    path = tmp_path_factory.getbasetemp() / "install-transcript.txt"
    path.write_text("\n".join(TRANSCRIPT))
    report(f"\nkubectl transcript: {path}")


def test_site_settings_before_the_operator(site: Site) -> None:
    """What an admin sets up first: where the object store is and the credentials for it."""
    assert "Server Version: v1.37.2" in kubectl(site, "version")  # scripts/k8s: the release built
    kubectl(site, "create", "namespace", SYSTEM)
    kubectl(
        site, "-n", SYSTEM, "create", "configmap", "troughfill-settings",
        f"--from-literal=TROUGHFILL_S3_ENDPOINT_URL={S3_URL}",
        "--from-literal=TROUGHFILL_S3_ADDRESSING_STYLE=path",
    )  # fmt: skip
    # The ledger Redis's password (the operator's alone; workers get per-job Redis users).
    kubectl(
        site, "-n", SYSTEM, "create", "secret", "generic", "troughfill-redis",
        f"--from-literal=password={secrets.token_hex(24)}",
    )  # fmt: skip
    # The credentials of team A's storage grant (the example pool's quotas[].storage names this
    # Secret): kept with the operator; the job's workers get a copy, nobody else does.
    kubectl(site, "-n", SYSTEM, "create", "secret", "generic", "team-a-storage", *secret_literals(ACCESS))
    # The team's namespace, and its input in the bucket.
    kubectl(site, "create", "namespace", JOB_NAMESPACE)
    fs = site.s3_fs()
    fs.mkdir(BUCKET)
    fs.pipe(f"{BUCKET}/ticket-triage/requests.jsonl", read_example("requests.jsonl").encode())


def test_crds_install_server_side_and_are_established(site: Site) -> None:
    kubectl(site, "apply", "--server-side", "-k", str(REPO_ROOT / "manifests" / "crds"))
    wait = ("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
    out = kubectl(site, *wait, check=False)
    if "accessor error" in out:  # kubectl read a CRD before its first conditions: docs/install.md
        out = kubectl(site, *wait)
    assert "batchinferences.troughfill.io condition met" in out


def test_base_brings_up_redis_and_the_operator_under_its_service_account(site: Site) -> None:
    kubectl(site, "apply", "-k", str(REPO_ROOT / "manifests" / "base"))
    kubectl(site, "apply", "-k", str(REPO_ROOT / "manifests" / "policy"))  # Kubernetes >= 1.30
    kubectl(
        site, "-n", SYSTEM, "rollout", "status", "statefulset/troughfill-redis", "--timeout=120s", timeout=150
    )
    kubectl(site, "-n", SYSTEM, "rollout", "status", f"deployment/{OPERATOR}", "--timeout=120s", timeout=150)
    pods = client.CoreV1Api(site.api).list_namespaced_pod(
        SYSTEM, label_selector=f"app.kubernetes.io/name={OPERATOR}"
    )
    (pod,) = pods.items
    assert pod.spec.service_account_name == OPERATOR
    # The kubelet's share: a projected token and the API server's address, no kubeconfig.
    mounts = {m.mount_path for m in pod.spec.containers[0].volume_mounts or []}
    assert "/var/run/secrets/kubernetes.io/serviceaccount" in mounts
    log = site.pod_log(SYSTEM, pod.metadata.name, "operator")
    assert "created the peering object" in log or "Activity 'configure' succeeded" in log, log[-3000:]
    # Least privilege, as the API server sees it.
    account = f"system:serviceaccount:{SYSTEM}:{OPERATOR}"
    for verb, resource, allowed in [
        ("patch", "batchinferences.troughfill.io/status", "yes"),
        ("create", "pods", "yes"),
        ("get", "secrets", "no"),  # in no namespace but its own (below)
        ("create", "secrets", "yes"),  # each job's workers' Secret
        ("create", "batchinferences.troughfill.io", "no"),
        ("delete", "nodes", "no"),
    ]:
        answer = kubectl(
            site, "auth", "can-i", verb, resource, "--all-namespaces", f"--as={account}", check=False
        )
        assert answer.strip().splitlines()[0] == allowed, (verb, resource, answer)
    answer = kubectl(site, "auth", "can-i", "get", "secrets", "-n", SYSTEM, f"--as={account}", check=False)
    assert answer.strip().splitlines()[0] == "yes", answer


@pytest.mark.timeout(1500)
def test_the_example_job_completes(site: Site) -> None:
    started = time.monotonic()
    kubectl(site, "apply", "-k", str(REPO_ROOT / "manifests" / "examples"))
    jobs = client.CustomObjectsApi(site.api)

    def read() -> dict[str, Any]:
        found: dict[str, Any] = jobs.get_namespaced_custom_object(
            constants.API_GROUP, constants.API_VERSION, JOB_NAMESPACE, "batchinferences", JOB
        )
        return found

    try:
        # The pool's scale-up delay (60 s) and the SmolLM2 engine's load (up to the startup
        # probe's 330 s on a slow machine) come before any progress.
        wait_for_job(read, "the example job", stall=600, cap=1400)
    except AssertionError as error:
        pods = kubectl(site, "get", "pods", "-A", "-o", "wide", check=False)
        # The pool's status says why no worker starts (its SignalReady message: the query's error).
        pools = kubectl(site, "get", "batchpools", "-o", "yaml", check=False)
        raise AssertionError(f"{error}\n{pods}\n{pools}\n{site.diagnostics()}") from None
    out = kubectl(
        site, "-n", JOB_NAMESPACE, "wait", "--for=condition=Complete", f"batchinference/{JOB}",
        "--timeout=60s", timeout=90, check=False,
    )  # fmt: skip
    if "condition met" not in out:
        job = kubectl(site, "-n", JOB_NAMESPACE, "get", "batchinference", JOB, "-o", "yaml", check=False)
        pods = kubectl(site, "get", "pods", "-A", "-o", "wide", check=False)
        raise AssertionError(f"the example job did not complete:\n{out}\n{job}\n{pods}")
    took = time.monotonic() - started
    report(f"\nexample job complete {took:.0f}s after `kubectl apply -k manifests/examples`")
    for args in (
        ("get", "batchpools,modeltemplates", "-o", "wide"),
        ("-n", JOB_NAMESPACE, "get", "batchinferences", "-o", "wide"),
        ("-n", JOB_NAMESPACE, "describe", "batchinference", JOB),
        ("describe", "batchpool", "h100"),
        ("describe", "modeltemplate", "smollm2-135m"),
    ):
        kubectl(site, *args)
    fs = site.s3_fs()
    wanted = sorted(
        json.loads(line)["custom_id"] for line in read_example("requests.jsonl").splitlines() if line
    )
    seen = []
    for name in ("output.jsonl", "errors.jsonl"):
        path = f"{BUCKET}/ticket-triage/results/{name}"
        if fs.exists(path):
            seen += [json.loads(line)["custom_id"] for line in fs.cat(path).decode().splitlines() if line]
    assert sorted(seen) == wanted  # every request answered exactly once


def test_only_the_operator_may_label_a_pod_a_ledger_client(site: Site) -> None:
    """The label the ledger's NetworkPolicy admits: a pod carrying it is refused by the API server
    for anyone but the operator's ServiceAccount (here the cluster admin, who may create any pod);
    the operator's workers carried it (the example job completed)."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "sneaky",
            "namespace": JOB_NAMESPACE,
            "labels": {constants.LABEL_LEDGER_CLIENT: "true"},
        },
        "spec": {"containers": [{"name": "c", "image": "troughfill/operator:0.1.0", "command": ["true"]}]},
    }
    refused = kubectl(site, "apply", "-f", "-", stdin=json.dumps(pod), check=False)
    assert "only the troughfill operator may label pods troughfill.io/ledger-client" in refused, refused
    assert "ValidatingAdmissionPolicy 'troughfill-ledger-client'" in refused, refused


def test_only_the_operator_may_change_a_worker_pods_labels_owner_or_image(site: Site) -> None:
    """A tenant with `edit` may update its pods: relabelling a worker hid it from its pool's
    planner, and `kubectl set image` swapped its engine. The worker here is made as the
    operator's ServiceAccount makes one (impersonated), on no node (it never runs); the cluster
    admin, like a tenant, is refused each change; the operator is not."""
    operator = "system:serviceaccount:troughfill-system:troughfill-operator"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "worker-lookalike",
            "namespace": JOB_NAMESPACE,
            "labels": {constants.LABEL_POOL: "gpus", constants.LABEL_JOB_UID: "0123"},
        },
        "spec": {
            "nodeSelector": {"troughfill.test/no-such-node": "true"},
            "containers": [{"name": "worker", "image": "troughfill/operator:0.1.0", "command": ["true"]}],
        },
    }
    kubectl(site, "apply", f"--as={operator}", "-f", "-", stdin=json.dumps(pod))
    for change in (
        ["label", "pod", "worker-lookalike", f"{constants.LABEL_POOL}-"],
        ["label", "pod", "worker-lookalike", f"{constants.LABEL_JOB_UID}=4567", "--overwrite"],
        ["label", "pod", "worker-lookalike", "troughfill.io/extra=1"],
        ["set", "image", "pod/worker-lookalike", "worker=evil/engine:latest"],
    ):
        refused = kubectl(site, *change, "-n", JOB_NAMESPACE, check=False)
        assert "ValidatingAdmissionPolicy 'troughfill-worker-pods'" in refused, (change, refused)
        assert "troughfill.io/ labels, owner and images are the operator's" in refused, refused
    kubectl(site, "label", "pod", "worker-lookalike", "team=a", "-n", JOB_NAMESPACE)  # its own labels: fine
    kubectl(site, "label", "pod", "worker-lookalike", f"{constants.LABEL_POOL}-", "-n", JOB_NAMESPACE,
            f"--as={operator}")  # fmt: skip
    kubectl(site, "delete", "pod", "worker-lookalike", "-n", JOB_NAMESPACE, "--wait=false")


LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\] ")
HANDOVER_SECONDS = 1.0
"""Kopf's peering hands over on a watch event both replicas see: the one resuming and the one
pausing log it within milliseconds, not atomically."""


@dataclass
class Replica:
    name: str
    acting: list[tuple[float, float]]
    """When it acted: from each "Resuming operations" to the next "Pausing operations", or to
    "Operator is stopping" (Kopf leaves the peering as it stops; what it logs after that is its
    shutdown, and a job it handled then would fail the check on `handled`), or to its last line."""
    handled: dict[str, list[float]]
    """job name -> when its log shows it handling that job."""


def replicas(site: Site, jobs: list[str]) -> list[Replica]:
    """Every operator pod this test saw (the deleted one too: the agent keeps its log)."""
    found = []
    for path in sorted(site.pods_dir.glob(f"{SYSTEM}_{OPERATOR}-*/operator.log")):
        acting: list[tuple[float, float]] = []
        handled: dict[str, list[float]] = {job: [] for job in jobs}
        since: float | None = None
        last = 0.0
        for line in path.read_text(errors="replace").splitlines():
            stamp = LOG_TIME.match(line)
            if not stamp:
                continue
            last = dt.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if "Resuming operations" in line and since is None:
                since = last
            elif ("Pausing operations" in line or "Operator is stopping" in line) and since is not None:
                acting.append((since, last))
                since = None
            for job in jobs:
                if f"[{JOB_NAMESPACE}/{job}]" in line:
                    handled[job].append(last)
        if since is not None:
            acting.append((since, last))
        found.append(Replica(path.parent.name, acting, handled))
    return found


def assert_one_acts_at_a_time(site: Site, jobs: list[str]) -> None:
    """No two replicas act at once, and each handled the jobs only while it was the one acting."""
    seen = replicas(site, jobs)
    spans = sorted((start, end, replica.name) for replica in seen for start, end in replica.acting)
    for (_, end, first), (start, _, second) in itertools.pairwise(spans):
        assert start >= end - HANDOVER_SECONDS, f"{first} and {second} acted at once"
    for replica in seen:
        for job, moments in replica.handled.items():
            for moment in moments:
                assert any(
                    a - HANDOVER_SECONDS <= moment <= b + HANDOVER_SECONDS for a, b in replica.acting
                ), f"{replica.name} handled {job} while paused"
    for job in jobs:
        assert any(replica.handled[job] for replica in seen), f"nobody handled {job}"


def probe_job(site: Site) -> str:
    """A job that needs no worker (its template does not exist): whoever acts fails it at once."""
    name = f"probe-{uuid.uuid4().hex[:6]}"
    body = {
        "apiVersion": constants.GROUP_VERSION,
        "kind": "BatchInference",
        "metadata": {"name": name, "namespace": JOB_NAMESPACE},
        "spec": {
            "inputURL": "s3://x/in.jsonl",
            "outputURL": "s3://x/out/",
            "templateRef": "no-such-template",
        },
    }
    kubectl(site, "apply", "-f", "-", stdin=json.dumps(body))
    kubectl(
        site, "-n", JOB_NAMESPACE, "wait", "--for=condition=Failed", f"batchinference/{name}", "--timeout=60s"
    )
    return name


def test_of_two_operator_replicas_exactly_one_acts_and_the_other_takes_over(site: Site) -> None:
    """Two replicas, then the acting one deleted (the Deployment makes a third, which waits: the
    oldest replica acts): at every moment at most one acts, and jobs get handled."""
    kubectl(site, "-n", SYSTEM, "scale", f"deployment/{OPERATOR}", "--replicas=2")
    kubectl(site, "-n", SYSTEM, "rollout", "status", f"deployment/{OPERATOR}", "--timeout=120s", timeout=150)
    time.sleep(3)  # a few peering rounds: the replicas have seen each other
    first = probe_job(site)
    time.sleep(2)
    (acted,) = [r.name for r in replicas(site, [first]) if r.handled[first]]
    pod = acted.split("_")[1]
    core = client.CoreV1Api(site.api)
    (survivor,) = [
        p.metadata.name
        for p in core.list_namespaced_pod(SYSTEM, label_selector=f"app.kubernetes.io/name={OPERATOR}").items
        if p.metadata.name != pod
    ]
    core.delete_namespaced_pod(pod, SYSTEM)  # graceful: it leaves the peering at once
    wait_until(
        lambda: pod not in {p.metadata.name for p in core.list_namespaced_pod(SYSTEM).items},
        60,
        "the acting replica gone",
    )
    second = probe_job(site)
    kubectl(site, "-n", SYSTEM, "rollout", "status", f"deployment/{OPERATOR}", "--timeout=120s", timeout=150)
    time.sleep(5)  # the replacement has started and the peers have settled
    assert_one_acts_at_a_time(site, [first, second])
    # The older replica took over; the Deployment's new one waits behind it.
    (handler,) = [r.name.split("_")[1] for r in replicas(site, [second]) if r.handled[second]]
    assert handler == survivor, (handler, survivor)


# --- The OpenAI Batch API (manifests/base/api.yaml), with the official client -----------------

API = "troughfill-api"
OTHER_NAMESPACE = "team-b"
ROUND_TRIP_REQUESTS = 1000
BATCH_ENDED = {"completed", "failed", "expired", "cancelled"}


def batch_user(site: Site, namespace: str, name: str) -> str:
    """A ServiceAccount with the troughfill-batch-user role in `namespace`, and a token of it."""
    kubectl(site, "-n", namespace, "create", "serviceaccount", name)
    kubectl(
        site, "-n", namespace, "create", "rolebinding", f"{name}-batches",
        "--clusterrole=troughfill-batch-user", f"--serviceaccount={namespace}:{name}",
    )  # fmt: skip
    return kubectl(site, "-n", namespace, "create", "token", name, "--duration=2h").strip()


def api_requests(count: int) -> bytes:
    lines = []
    for index in range(count):
        body = {
            "model": "smollm2-135m",
            "messages": [{"role": "user", "content": f"Say a word about the number {index}."}],
            "max_tokens": 8,
        }
        line = {"custom_id": f"q-{index:04d}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        lines.append(json.dumps(line))
    return ("\n".join(lines) + "\n").encode()


def wait_for_batch(client: openai.OpenAI, batch_id: str, stall: float, cap: float) -> Any:
    """Poll a batch with the client until it has ended; fail when its counts stop moving."""
    started = moved = time.monotonic()
    seen: Any = None
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in BATCH_ENDED:
            return batch
        counts = batch.request_counts
        progress = (batch.status, counts.completed if counts else 0, counts.failed if counts else 0)
        now = time.monotonic()
        if progress != seen:
            seen, moved = progress, now
        if now - moved > stall or now - started > cap:
            raise AssertionError(f"batch {batch_id} did not end: {batch.model_dump_json(indent=1)}")
        time.sleep(2.0)


@dataclass
class BatchApiSite:
    base_url: str
    alice_token: str
    bob_token: str
    done: dict[str, Any]
    """What the round trip left for the tests after it: its batch, file and output ids."""

    def client(self, token: str, organization: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.base_url, api_key=token, organization=organization, max_retries=0, timeout=60
        )


@pytest.fixture(scope="module")
def batch_api(site: Site) -> BatchApiSite:
    """The API rolled out; team A with a default template, team B with a grant and a bucket; a
    ServiceAccount with troughfill-batch-user in each (alice, bob)."""
    kubectl(site, "-n", SYSTEM, "rollout", "status", f"deployment/{API}", "--timeout=120s", timeout=150)
    address = kubectl(site, "-n", SYSTEM, "get", "service", API, "-o", "jsonpath={.spec.clusterIP}").strip()
    kubectl(site, "annotate", "namespace", JOB_NAMESPACE, "troughfill.io/default-template=smollm2-135m")
    kubectl(site, "create", "namespace", OTHER_NAMESPACE)
    kubectl(site, "-n", SYSTEM, "create", "secret", "generic", "team-b-storage", *secret_literals(ACCESS))
    site.s3_fs().mkdir("team-b-batches")
    # This host answers on ClusterIPs (the node agent's Service proxy), as a pod would.
    return BatchApiSite(
        f"http://{address}:8000/v1",
        batch_user(site, JOB_NAMESPACE, "alice"),
        batch_user(site, OTHER_NAMESPACE, "bob"),
        {},
    )


@pytest.mark.timeout(1800)
def test_the_official_openai_client_round_trip(site: Site, batch_api: BatchApiSite) -> None:
    alice = batch_api.client(batch_api.alice_token)
    data = api_requests(ROUND_TRIP_REQUESTS)
    started = time.monotonic()
    uploaded = alice.files.create(file=("questions.jsonl", data), purpose="batch")
    batch = alice.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
        metadata={"run": "install-tier"},
    )  # fmt: skip
    assert batch.status == "validating"
    listed = kubectl(site, "-n", JOB_NAMESPACE, "get", "batchinferences", "-o", "name")
    assert f"batchinference.troughfill.io/{batch.id.removeprefix('batch_')}" in listed
    done = wait_for_batch(alice, batch.id, stall=600, cap=1500)
    assert done.status == "completed", done.model_dump_json(indent=1)
    assert done.output_file_id
    output = alice.files.content(done.output_file_id).read()
    errors = alice.files.content(done.error_file_id).read() if done.error_file_id else b""
    took = time.monotonic() - started
    answered = [json.loads(line) for line in (output + errors).decode().splitlines() if line.strip()]
    assert sorted(a["custom_id"] for a in answered) == [f"q-{i:04d}" for i in range(ROUND_TRIP_REQUESTS)]
    counts = done.request_counts
    assert counts is not None
    assert (counts.total, counts.completed + counts.failed) == (ROUND_TRIP_REQUESTS, ROUND_TRIP_REQUESTS)
    report(
        f"\nOpenAI Batch API round trip, {ROUND_TRIP_REQUESTS} requests: {took:.1f}s from upload to "
        f"downloaded output ({counts.completed} completed, {counts.failed} failed; in progress "
        f"{(done.in_progress_at or 0) - done.created_at}s and completed "
        f"{(done.completed_at or 0) - done.created_at}s after creation)"
    )
    assert any(b.id == batch.id for b in alice.batches.list())
    batch_api.done.update(batch=batch.id, file=uploaded.id, output=done.output_file_id)


def test_another_namespaces_token_sees_none_of_it(batch_api: BatchApiSite) -> None:
    done = batch_api.done
    assert done, "runs after the round trip"
    bob = batch_api.client(batch_api.bob_token)
    for call in (
        lambda: bob.batches.retrieve(done["batch"]),
        lambda: bob.batches.cancel(done["batch"]),
        lambda: bob.files.retrieve(done["file"]),
        lambda: bob.files.content(done["output"]),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert [b.id for b in bob.batches.list()] == []
    bob_in_a = batch_api.client(batch_api.bob_token, organization=JOB_NAMESPACE)
    with pytest.raises(
        openai.PermissionDeniedError, match="may not get batchinferences in namespace 'team-a'"
    ):
        bob_in_a.batches.retrieve(done["batch"])
    with pytest.raises(openai.PermissionDeniedError):
        bob_in_a.files.content(done["output"])


def test_tokens_the_cluster_does_not_accept(site: Site, batch_api: BatchApiSite) -> None:
    """Expired (re-signed with the cluster's own ServiceAccount key, which it accepts unexpired)
    and garbage tokens get OpenAI's 401."""
    key = site.plane.pki.sa_key.read_bytes()
    fresh = batch_api.client(resigned(batch_api.alice_token, key, 0))
    assert isinstance(list(fresh.batches.list()), list)
    for token in (resigned(batch_api.alice_token, key, -4 * 3600), "not-a-token"):
        with pytest.raises(openai.AuthenticationError, match="not accepted by the cluster"):
            batch_api.client(token).batches.list()


def test_bad_uploads_wrong_endpoints_and_unknown_ids_get_openai_errors(batch_api: BatchApiSite) -> None:
    alice = batch_api.client(batch_api.alice_token)
    with pytest.raises(openai.BadRequestError, match="line 2: not valid JSON"):
        alice.files.create(file=("bad.jsonl", api_requests(1) + b"{oops\n"), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="the batch's endpoint is /v1/embeddings"):
        alice.batches.create(
            input_file_id=batch_api.done["file"], endpoint="/v1/embeddings", completion_window="24h"
        )
    with pytest.raises(openai.NotFoundError):
        alice.batches.retrieve("batch_no-such-batch")


def test_a_team_names_its_template_in_metadata_and_cancels(batch_api: BatchApiSite) -> None:
    bob = batch_api.client(batch_api.bob_token)
    few = bob.files.create(file=("few.jsonl", api_requests(20)), purpose="batch")
    theirs = bob.batches.create(
        input_file_id=few.id, endpoint="/v1/chat/completions", completion_window="24h",
        metadata={"troughfill.io/template": "smollm2-135m"},
    )  # fmt: skip
    assert bob.batches.cancel(theirs.id).status == "cancelling"
    cancelled = wait_for_batch(bob, theirs.id, stall=120, cap=300)
    assert cancelled.status == "cancelled", cancelled.model_dump_json(indent=1)
    assert cancelled.cancelled_at is not None
    with pytest.raises(openai.ConflictError, match="Cannot cancel a batch with status cancelled"):
        bob.batches.cancel(theirs.id)
