"""The OpenAI Batch API, driven by the official `openai` client, over in-memory cluster fakes.

The cluster's part (TokenReview, SubjectAccessReview, the custom resources, the operator
writing status) is faked here; tests/e2e/test_batchapi.py runs the same client against the
local cluster with real workers.
"""

import concurrent.futures
import io
import json
import threading
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from tests.batchapitools import FakeJobs, FakeReviews, serving
from troughfill import constants
from troughfill.api.batchpool import StorageGrant
from troughfill.batchapi.files import Files, UploadProblem, check_upload
from troughfill.batchapi.kube import TimedCache
from troughfill.batchapi.mapping import job_name
from troughfill.batchapi.openapi import document
from troughfill.batchapi.ports import Caller, Jobs, Reviews
from troughfill.batchapi.server import BatchApi
from troughfill.config import Settings
from troughfill.ratelimit import KeyedLimits

ALICE = Caller("system:serviceaccount:team-a:alice", uid="a")
BOB = Caller("system:serviceaccount:team-b:bob", uid="b")
CAROL = Caller("carol@example.com", uid="c")
EVERYTHING = {"create", "get", "list", "patch", "delete"}


def request_line(index: int, url: str = "/v1/chat/completions") -> str:
    body = {"model": "tiny", "messages": [{"role": "user", "content": f"hello {index}"}], "max_tokens": 4}
    return json.dumps({"custom_id": f"r{index}", "method": "POST", "url": url, "body": body})


def jsonl(count: int, url: str = "/v1/chat/completions") -> bytes:
    return "".join(request_line(i, url) + "\n" for i in range(count)).encode()


@dataclass
class Site:
    url: str
    jobs: FakeJobs
    reviews: FakeReviews
    root: Path

    def client(self, token: str = "alice-token", organization: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=token, organization=organization, max_retries=0
        )


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    reviews = FakeReviews(
        tokens={"alice-token": ALICE, "bob-token": BOB, "carol-token": CAROL},
        grants={
            (ALICE.username, "team-a"): set(EVERYTHING),
            (BOB.username, "team-b"): set(EVERYTHING),
            (CAROL.username, "team-a"): {"get", "list"},
            (ALICE.username, "team-c"): set(EVERYTHING),
        },
    )
    jobs = FakeJobs(
        storage={
            "team-a": [StorageGrant(prefix=f"file://{tmp_path}/team-a/")],
            "team-b": [StorageGrant(prefix=f"file://{tmp_path}/team-b/")],
            "team-c": [StorageGrant(prefix=f"file://{tmp_path}/team-c/", secretName="team-c-store")],
        },
        templates={"team-a": "tiny"},
    )
    settings = Settings(api_max_file_bytes=64 * 1024, api_max_file_lines=100)
    checked_reviews: Reviews = reviews
    checked_jobs: Jobs = jobs
    with serving(BatchApi(checked_reviews, checked_jobs, Files(checked_jobs, settings), settings)) as url:
        yield Site(url, jobs, reviews, tmp_path)


def finish(site: Site, batch_id: str, namespace: str = "team-a", failed: int = 1) -> None:
    """What the operator does at the end: write the output and error files and the status."""
    name = job_name(batch_id)
    assert name is not None
    spec = site.jobs.objects[(namespace, name)]["spec"]
    out = spec["outputURL"]
    directory = Path(out.removeprefix("file://"))
    directory.mkdir(parents=True)
    (directory / "output.jsonl").write_text('{"id": "batch_req_1", "custom_id": "r0"}\n')
    (directory / "errors.jsonl").write_text('{"id": "batch_req_2", "custom_id": "r1"}\n')
    site.jobs.set_status(
        namespace,
        name,
        {
            "phase": "completed",
            "requestCounts": {"total": 3, "completed": 3 - failed, "failed": failed},
            "startedAt": "2026-12-03T10:00:01Z",
            "finishedAt": "2026-12-03T10:05:00Z",
            "outputURL": out + "output.jsonl",
            "errorURL": out + "errors.jsonl",
            "tokens": {"prompt": 30, "completion": 12, "cached": 5},
            "gpuSeconds": 42.5,
            "conditions": [
                {"type": "Complete", "status": "True", "reason": "Completed", "message": "done",
                 "lastTransitionTime": "2026-12-03T10:05:00Z"},
            ],
        },
    )  # fmt: skip


def test_the_official_client_round_trip(site: Site) -> None:
    client = site.client()
    data = jsonl(3)
    uploaded = client.files.create(file=("requests.jsonl", data), purpose="batch")
    assert uploaded.id.startswith("file-")
    assert (uploaded.bytes, uploaded.filename, uploaded.purpose) == (len(data), "requests.jsonl", "batch")
    assert client.files.retrieve(uploaded.id) == uploaded
    assert client.files.content(uploaded.id).read() == data

    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"team": "a"},
    )
    assert batch.status == "validating"
    assert batch.input_file_id == uploaded.id
    assert batch.metadata == {"team": "a"}
    assert batch.expires_at == batch.created_at + 24 * 3600
    # The BatchInference it is: the upload as input, output under the grant, the namespace's template.
    name = job_name(batch.id)
    assert name is not None
    spec = site.jobs.objects[("team-a", name)]["spec"]
    assert spec["inputURL"].startswith(f"file://{site.root}/team-a/openai-files/{uploaded.id}/")
    assert spec["outputURL"] == f"file://{site.root}/team-a/openai-batches/{name}/"
    assert (spec["templateRef"], spec["endpoint"], spec["completionWindow"]) == (
        "tiny",
        "/v1/chat/completions",
        "24h",
    )

    finish(site, batch.id)
    done = client.batches.retrieve(batch.id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (3, 2, 1)
    assert done.completed_at is not None
    assert done.in_progress_at is not None
    assert done.usage is not None
    assert (done.usage.input_tokens, done.usage.output_tokens, done.usage.total_tokens) == (30, 12, 42)
    assert done.output_file_id is not None
    assert done.error_file_id is not None
    assert b'"custom_id": "r0"' in client.files.content(done.output_file_id).read()
    assert b'"custom_id": "r1"' in client.files.content(done.error_file_id).read()
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"
    assert (done.model_extra or {}).get("troughfill", {}).get("gpu_seconds") == 42.5

    listed = {f.id for f in client.files.list()}
    assert {uploaded.id, done.output_file_id, done.error_file_id} <= listed
    assert [f.id for f in client.files.list(purpose="batch")] == [uploaded.id]
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_batches_list_newest_first_in_pages(site: Site) -> None:
    client = site.client()
    uploaded = client.files.create(file=("in.jsonl", jsonl(2)), purpose="batch")
    made = [
        client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        for _ in range(5)
    ]
    listed = [b.id for b in client.batches.list(limit=2)]  # the client follows `after` through the pages
    assert sorted(listed) == sorted(b.id for b in made)
    first = client.batches.list(limit=2)
    assert first.has_more
    assert len(first.data) == 2
    rest = client.batches.list(limit=100, after=first.data[-1].id)
    assert [b.id for b in first.data] + [b.id for b in rest.data] == listed
    assert not rest.has_more


def test_a_file_listing_resolves_the_grants_once_for_every_batchs_files(site: Site) -> None:
    client = site.client()
    uploaded = client.files.create(file=("in.jsonl", jsonl(2)), purpose="batch")
    for _ in range(4):
        made = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        finish(site, made.id)
    before = site.jobs.grant_lookups
    listed = client.files.list()
    assert len([f for f in listed if f.purpose == "batch_output"]) == 8
    assert site.jobs.grant_lookups - before == 2  # the uploads' home, then every job file's


def test_cancel_asks_the_operator_and_an_ended_batch_cannot_be(site: Site) -> None:
    client = site.client()
    uploaded = client.files.create(file=("in.jsonl", jsonl(2)), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status == "cancelling"
    assert cancelled.cancelling_at is not None
    name = job_name(batch.id)
    assert site.jobs.objects[("team-a", name or "")]["spec"]["cancel"] is True
    other = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    finish(site, other.id)
    with pytest.raises(openai.ConflictError, match="Cannot cancel a batch with status completed"):
        client.batches.cancel(other.id)


def test_another_namespace_cannot_see_or_touch_a_teams_batches_and_files(site: Site) -> None:
    alice = site.client()
    uploaded = alice.files.create(file=("in.jsonl", jsonl(2)), purpose="batch")
    batch = alice.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    # Bob in his own namespace: team-a's ids name nothing there.
    bob = site.client("bob-token")
    for call in (
        lambda: bob.batches.retrieve(batch.id),
        lambda: bob.batches.cancel(batch.id),
        lambda: bob.files.retrieve(uploaded.id),
        lambda: bob.files.content(uploaded.id),
        lambda: bob.files.delete(uploaded.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert list(bob.batches.list()) == []
    assert list(bob.files.list()) == []
    with pytest.raises(openai.BadRequestError, match="No file found"):
        bob.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    # Bob naming team-a: SubjectAccessReview says no.
    bob_in_a = site.client("bob-token", organization="team-a")
    with pytest.raises(
        openai.PermissionDeniedError, match="may not get batchinferences in namespace 'team-a'"
    ):
        bob_in_a.batches.retrieve(batch.id)
    with pytest.raises(openai.PermissionDeniedError):
        bob_in_a.files.create(file=("in.jsonl", jsonl(1)), purpose="batch")
    # Carol may read team-a but not cancel or create there.
    carol = site.client("carol-token", organization="team-a")
    assert carol.batches.retrieve(batch.id).id == batch.id
    with pytest.raises(openai.PermissionDeniedError, match="may not patch"):
        carol.batches.cancel(batch.id)
    assert site.jobs.objects[("team-a", job_name(batch.id) or "")]["spec"].get("cancel") is None


def test_tokens_the_cluster_does_not_accept_get_401(site: Site) -> None:
    with pytest.raises(openai.AuthenticationError, match="not accepted by the cluster"):
        site.client("expired-or-forged").batches.list()
    answer = requests.get(f"{site.url}/v1/batches", timeout=10)
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "invalid_api_key"
    # A user token that is not a ServiceAccount's must say which namespace.
    with pytest.raises(openai.BadRequestError, match="Which namespace"):
        site.client("carol-token").batches.list()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"custom_id": "a", "method": "POST"\n', "line 1: not valid JSON"),
        (jsonl(1) + b"not json\n", "line 2: not valid JSON"),
        (jsonl(1) + jsonl(1), "line 2: duplicate custom_id 'r0'"),
        (b"\n\n", "the file has no requests"),
        (jsonl(1, "/v1/images/generations"), "line 1: url"),
        (jsonl(101), "more than 100 requests"),
    ],
)
def test_malformed_uploads_are_refused_with_the_line(site: Site, content: bytes, message: str) -> None:
    with pytest.raises(openai.BadRequestError, match=message) as raised:
        site.client().files.create(file=("in.jsonl", content), purpose="batch")
    assert isinstance(raised.value.body, dict)
    assert raised.value.body.get("param") == "file"
    assert not (site.root / "team-a" / "openai-files").exists() or not any(
        (site.root / "team-a" / "openai-files").iterdir()
    )


def test_oversized_and_wrong_purpose_uploads(site: Site) -> None:
    client = site.client()
    with pytest.raises(openai.APIStatusError) as raised:
        client.files.create(file=("big.jsonl", b"x" * (64 * 1024 + 1)), purpose="batch")
    assert raised.value.status_code == 413
    assert "larger than 65536 bytes" in raised.value.message
    # Far over the limit: still the 413 (not a dropped connection), and the API serves on.
    with pytest.raises(openai.APIStatusError) as raised:
        client.files.create(file=("huge.jsonl", b"x" * (100 << 20)), purpose="batch")
    assert raised.value.status_code == 413
    assert client.files.list().data == []
    with pytest.raises(openai.BadRequestError, match="purpose 'fine-tune' is not supported"):
        client.files.create(file=("in.jsonl", jsonl(1)), purpose="fine-tune")


def test_a_line_is_read_at_most_its_limit_and_checked_before_it_is_parsed() -> None:
    """A 19 MiB line is refused after reading 4 MiB of it (the API pod held +382 MiB before),
    and a line of a million tiny objects before it is parsed."""
    huge = io.BytesIO(jsonl(1) + b'{"custom_id": "x", "body": "' + b"a" * (19 << 20) + b'"}\n')
    with pytest.raises(UploadProblem, match=f"line 2: over {constants.MAX_LINE_BYTES} bytes"):
        check_upload(huge, 100)
    assert huge.tell() <= len(jsonl(1)) + constants.MAX_LINE_BYTES + 1
    nested = io.BytesIO(b'{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": ['
                        + b"{}," * 1_000_000 + b"{}]}\n")  # fmt: skip
    tracemalloc.start()
    try:
        with pytest.raises(UploadProblem, match="JSON objects and arrays, over the 65536 allowed"):
            check_upload(nested, 100)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # the raw line and no parse of it


def test_uploads_beyond_the_limit_at_once_get_429_with_retry_after(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each upload may spool up to the file limit to the pod's scratch volume: more than
    api_max_concurrent_uploads at once are told to come back (the official client would retry)."""
    release = threading.Event()
    entered = threading.Semaphore(0)
    real = Files.upload

    def slow(self: Files, *args: Any) -> Any:
        entered.release()
        release.wait(30)
        return real(self, *args)

    monkeypatch.setattr(Files, "upload", slow)
    limit = Settings().api_max_concurrent_uploads
    with concurrent.futures.ThreadPoolExecutor(limit) as pool:
        held = [
            pool.submit(site.client().files.create, file=(f"in{i}.jsonl", jsonl(1)), purpose="batch")
            for i in range(limit)
        ]
        for _ in range(limit):
            assert entered.acquire(timeout=30)
        answer = requests.post(
            f"{site.url}/v1/files", headers={"Authorization": "Bearer alice-token"},
            files={"file": ("x.jsonl", jsonl(1))}, data={"purpose": "batch"}, timeout=10,
        )  # fmt: skip
        assert answer.status_code == 429
        assert answer.headers["retry-after"] == "5"
        assert answer.json()["error"]["code"] == "rate_limit_exceeded"
        release.set()
        assert all(future.result(timeout=30).purpose == "batch" for future in held)
    assert site.client().files.create(file=("after.jsonl", jsonl(1)), purpose="batch").bytes > 0


def test_each_caller_has_a_rate_of_its_own_and_is_told_when_to_come_back() -> None:
    limits = KeyedLimits(rate=2.0, burst=3.0)
    assert [limits.take("alice", 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limits.take("alice", 100.0) == pytest.approx(0.5)  # one call's worth at 2/s
    assert limits.take("bob", 100.0) == 0.0  # alice's flood costs bob nothing
    assert limits.take("alice", 100.6) == 0.0


def test_the_token_cache_evicts_the_oldest_answer_not_every_answer() -> None:
    cache = TimedCache(ttl=60, size=3)
    for key in ("a", "b", "c"):
        cache.put(key, key.upper())
    cache.put("d", "D")  # a fourth token: only the oldest answer goes
    assert [cache.get(k) for k in "abcd"] == [None, "B", "C", "D"]
    assert len(cache) == 3


def test_a_grants_secret_is_read_as_the_operator_reads_it(site: Site) -> None:
    """Files under a grant with a Secret: a missing Secret is the admin's to fix (400, named);
    once there, its keys are read once a minute, not on every request."""
    client = site.client(organization="team-c")
    with pytest.raises(
        openai.BadRequestError, match="'team-c-store' not found in namespace 'troughfill-system'"
    ):
        client.files.create(file=("in.jsonl", jsonl(1)), purpose="batch")
    site.jobs.secrets[("troughfill-system", "team-c-store")] = {"AWS_ACCESS_KEY_ID": "k", "other": "x"}
    reads = site.jobs.secret_reads
    first = client.files.create(file=("in.jsonl", jsonl(1)), purpose="batch")
    second = client.files.create(file=("in.jsonl", jsonl(2)), purpose="batch")
    assert {f.id for f in client.files.list()} == {first.id, second.id}
    assert client.files.content(second.id).read() == jsonl(2)
    assert site.jobs.secret_reads == reads + 1


def test_unknown_ids_wrong_endpoints_and_windows(site: Site) -> None:
    client = site.client()
    for call in (
        lambda: client.batches.retrieve("batch_nope"),
        lambda: client.batches.retrieve("not-a-batch-id"),
        lambda: client.batches.cancel("batch_nope"),
        lambda: client.files.retrieve("file-0123456789abcdef0123456789abcdef"),
        lambda: client.files.retrieve("file-output.nope"),
        lambda: client.files.content("whatever"),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    uploaded = client.files.create(file=("in.jsonl", jsonl(1)), purpose="batch")

    def create(**overrides: Any) -> Any:
        arguments: dict[str, Any] = {
            "input_file_id": uploaded.id, "endpoint": "/v1/chat/completions", "completion_window": "24h",
        } | overrides  # fmt: skip
        return client.batches.create(**arguments)

    with pytest.raises(openai.BadRequestError, match="endpoint '/v1/responses' is not supported"):
        create(endpoint="/v1/responses")
    with pytest.raises(openai.BadRequestError, match="the batch's endpoint is /v1/completions"):
        create(endpoint="/v1/completions")
    with pytest.raises(openai.BadRequestError, match="completion_window '1y'"):
        create(completion_window="1y")
    with pytest.raises(openai.BadRequestError, match="No file found"):
        create(input_file_id="file-ffffffffffffffffffffffffffffffff")
    # troughfill takes windows beyond OpenAI's 24h, within its own bounds.
    assert create(completion_window="72h").completion_window == "72h"
    site.jobs.templates.clear()
    with pytest.raises(openai.BadRequestError, match="No ModelTemplate"):
        create()
    assert create(metadata={"troughfill.io/template": "other"}).status == "validating"


def test_a_job_made_with_kubectl_reads_as_a_batch(site: Site) -> None:
    (site.root / "team-a").mkdir()
    (site.root / "team-a" / "in.jsonl").write_bytes(jsonl(2))
    site.jobs.create(
        "team-a",
        {
            "apiVersion": "troughfill.io/v1alpha1",
            "kind": "BatchInference",
            "metadata": {"name": "nightly", "namespace": "team-a"},
            "spec": {"inputURL": f"file://{site.root}/team-a/in.jsonl", "outputURL": f"file://{site.root}/team-a/out/",
                     "templateRef": "tiny"},
        },
    )  # fmt: skip
    batch = site.client().batches.retrieve("batch_nightly")
    assert (batch.status, batch.input_file_id, batch.completion_window) == (
        "validating",
        "file-input.nightly",
        "24h",
    )
    assert site.client().files.content(batch.input_file_id).read() == jsonl(2)


def test_errors_are_openai_shaped_for_unknown_routes_and_methods(site: Site) -> None:
    headers = {"Authorization": "Bearer alice-token"}
    for method, path, status in (("GET", "/v1/models", 404), ("PUT", "/v1/batches", 405)):
        answer = requests.request(method, f"{site.url}{path}", headers=headers, timeout=10)
        assert answer.status_code == status
        assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
    answer = requests.post(f"{site.url}/v1/batches", headers=headers, data=b"{not json", timeout=10)
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == "The body is not JSON."


def test_openapi_document_is_served_and_names_every_route(site: Site) -> None:
    served = requests.get(f"{site.url}/openapi.json", timeout=10).json()
    assert served == json.loads(json.dumps(document()))
    assert set(served["paths"]) == {
        "/v1/files", "/v1/files/{file_id}", "/v1/files/{file_id}/content", "/v1/batches",
        "/v1/batches/{batch_id}", "/v1/batches/{batch_id}/cancel",
    }  # fmt: skip
    metrics = requests.get(f"{site.url}/metrics", timeout=10).text
    assert "troughfill_api_requests_total" in metrics
