"""A whole job through file:// and through s3:// (a real S3-protocol server process)."""

import uuid
from pathlib import Path

import pytest
import s3fs
from redis.asyncio import Redis

from tests.ledgertools import FakeClock, FakeWorker, create_job, drain, new_ledger, request_line
from troughfill.results import finalize, index_input, load_requests
from troughfill.storage import ObjectStore, ReadError, WriteError
from troughfill_dev.localcluster import S3Server


@pytest.fixture(params=["file", "s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[ObjectStore, str]:
    """(store, URL prefix) for a fresh place to put a job's files."""
    if request.param == "file":
        return ObjectStore(), tmp_path.as_uri()
    server: S3Server = request.getfixturevalue("s3_server")
    bucket = f"jobs-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(**server.s3_options).mkdir(bucket)
    return ObjectStore(options={"s3": server.s3_options}), f"s3://{bucket}"


async def test_a_job_runs_end_to_end(
    location: tuple[ObjectStore, str], aredis: Redis, clock: FakeClock
) -> None:
    store, prefix = location
    lines = [request_line(f"r{i}") for i in range(250)] + ["not json", request_line("r3")]
    store.write_bytes(f"{prefix}/input/requests.jsonl", "\n".join(lines).encode())  # no final newline
    ledger = new_ledger(aredis, clock)
    output_url = f"{prefix}/results/"
    await create_job(ledger, f"{prefix}/input/requests.jsonl", output_url, lease_seconds=5)
    report = await index_input(ledger, store)
    assert (report.total, report.invalid) == (252, 2)
    assert [r.custom_id for r in await load_requests(ledger, store, [249, 0, 7])] == ["r249", "r0", "r7"]

    crashed = FakeWorker(ledger, store, output_url, "crashed")
    assert await crashed.take(40)
    await crashed.work(40)
    crashed.crash()
    clock.advance(6)
    await drain(ledger, store, output_url, chunk=64)
    final = await finalize(ledger, store)
    assert (final.outputs, final.errors) == (250, 2)

    outputs = list(store.read_jsonl(final.output_url))
    errors = list(store.read_jsonl(final.error_url))
    assert sorted(o["custom_id"] for o in outputs) == sorted(f"r{i}" for i in range(250))
    assert {e["error"]["code"] for e in errors} == {"invalid_json_line", "duplicate_custom_id"}
    assert not store.exists(f"{prefix}/results/_segments/{ledger.keys.uid}")  # this job's, and only them


def test_reading_ranges_merges_neighbours_and_keeps_order(location: tuple[ObjectStore, str]) -> None:
    store, prefix = location
    store.write_bytes(f"{prefix}/blob", bytes(range(256)) * 1024)
    spans = [(200_000, 3), (5, 2), (7, 1), (262_143, 1)]
    assert store.read_ranges(f"{prefix}/blob", spans) == [
        bytes([(200_000 + k) % 256 for k in range(3)]),
        bytes([5, 6]),
        bytes([7]),
        bytes([255]),
    ]


def test_a_failed_write_leaves_the_old_object_and_no_debris(location: tuple[ObjectStore, str]) -> None:
    store, prefix = location
    store.write_bytes(f"{prefix}/out/result.jsonl", b'{"v": "old"}\n')

    def crash_mid_write() -> None:
        with store.writer(f"{prefix}/out/result.jsonl") as stream:
            stream.write(b'{"v": "half a n')
            raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        crash_mid_write()
    assert list(store.read_jsonl(f"{prefix}/out/result.jsonl")) == [{"v": "old"}]
    assert store.names(f"{prefix}/out") == ["result.jsonl"]


def test_writing_never_creates_a_bucket(s3_server: S3Server) -> None:
    store = ObjectStore(options={"s3": s3_server.s3_options})
    bucket = f"absent-{uuid.uuid4().hex[:8]}"
    with pytest.raises(WriteError, match=f"writing s3://{bucket}/out/output.jsonl failed") as caught:
        store.write_bytes(f"s3://{bucket}/out/output.jsonl", b"{}\n")
    assert not caught.value.transient  # no bucket: trying again will not help
    assert not s3fs.S3FileSystem(**s3_server.s3_options).exists(bucket)


def test_an_object_store_without_credentials_is_a_permanent_read_error(
    s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a new user meets with the example job on a cluster without S3 credentials: a clear
    error that does not pass by waiting (the job fails saying so), not a retry loop."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = ObjectStore(options={"s3": {"endpoint_url": s3_server.url, "skip_instance_cache": True}})
    with pytest.raises(ReadError, match="NoCredentialsError") as caught:
        list(store.iter_lines("s3://team-a-batches/ticket-triage/requests.jsonl"))
    assert not caught.value.transient
