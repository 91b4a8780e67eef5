"""Every failure of a job's data path ends in a condition (real Redis ledger, real files): what
cannot pass fails the job saying what and where; what may pass is retried with back-off under a
visible Degraded condition, a bounded number of times; nothing is published half-merged, and a
large merge does not stall the event loop."""

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import pytest
from redis.asyncio import Redis

from tests.builders import batch_inference, pool, template
from tests.ledgertools import FakeWorker, drain, read_jsonl, request_line, write_input
from troughfill import constants
from troughfill.api import BatchInference, BatchPool, ModelTemplate, admit
from troughfill.api.conditions import find_condition
from troughfill.controller import jobs
from troughfill.controller.jobs import MAX_STORAGE_ATTEMPTS
from troughfill.ledger import JobLedger
from troughfill.storage import ObjectStore, ReadError, WriteError, objects
from troughfill.storage.errors import is_transient
from troughfill.worker.engine import EngineClient
from troughfill.worker.runner import ExitCode, Worker, WorkerOptions

NOW = jobs.now_utc()


def make_job(tmp_path: Path, lines: list[str]) -> BatchInference:
    input_url = write_input(tmp_path / "in.jsonl", lines)
    wire = batch_inference(inputURL=input_url, outputURL=(tmp_path / "out").as_uri() + "/")
    wire["metadata"].update(uid=uuid.uuid4().hex, generation=1, creationTimestamp=NOW.isoformat())
    return BatchInference.model_validate(wire)


async def started(aredis: Redis, job: BatchInference, store: ObjectStore) -> jobs.StatusUpdate:
    admission = admit(job, ModelTemplate.model_validate(template()), BatchPool.model_validate(pool()))
    return await jobs.start(job, admission, jobs.ledger_for(job, aredis), store, NOW)


async def worked(
    aredis: Redis, tmp_path: Path, count: int, chunk: int = 50
) -> tuple[BatchInference, jobs.StatusUpdate, JobLedger]:
    """A job of `count` requests, started and every request done (not merged yet)."""
    job = make_job(tmp_path, [request_line(f"r{i}") for i in range(count)])
    first = await started(aredis, job, ObjectStore())
    ledger = jobs.ledger_for(job, aredis)
    await drain(ledger, ObjectStore(), job.spec.output_url, chunk=chunk)
    return job, first, ledger


class FlakyWrites(ObjectStore):
    """Writes fail as a store that is away does (connection refused), `failures` times."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    @contextlib.contextmanager
    def writer(self, url: str) -> Iterator[IO[bytes]]:
        if self.failures > 0:
            self.failures -= 1
            raise WriteError("writing", url, ConnectionRefusedError(111, "Connection refused"))
        with super().writer(url) as stream:
            yield stream


class SlowWrites(ObjectStore):
    """Each write blocks its thread as a slow upload does."""

    @contextlib.contextmanager
    def writer(self, url: str) -> Iterator[IO[bytes]]:
        with super().writer(url) as stream:
            real = stream.write

            def slow(data: bytes) -> int:
                time.sleep(0.05)
                return real(data)

            stream.write = slow  # type: ignore[method-assign]
            yield stream


def condition(update: jobs.StatusUpdate, kind: str) -> tuple[str, str, str]:
    found = find_condition(update.status.conditions, kind)
    assert found is not None, kind
    return found.status, found.reason, found.message


async def test_a_committed_segment_gone_fails_the_job_and_publishes_nothing(
    aredis: Redis, tmp_path: Path
) -> None:
    job, first, ledger = await worked(aredis, tmp_path, 6, chunk=3)
    segments = tmp_path / "out" / "_segments" / job.metadata.uid_text
    next(segments.iterdir()).unlink()
    done = await jobs.refresh_status(job, first.status, ledger, ObjectStore(), NOW)
    assert done.status.phase == "failed"
    status, reason, message = condition(done, "Failed")
    assert (status, reason) == ("True", "MergeFailed")
    assert str(segments) in message  # where
    assert done.retry_in is None  # no retry loop: merging again would not help
    assert not (tmp_path / "out" / "output.jsonl").exists()  # nothing published half-merged
    assert await ledger.state() == "failed"


async def test_an_input_gone_before_the_merge_fails_the_job_saying_so(aredis: Redis, tmp_path: Path) -> None:
    job = make_job(tmp_path, [request_line("r0"), "not json", request_line("r1")])
    first = await started(aredis, job, ObjectStore())
    ledger = jobs.ledger_for(job, aredis)
    (tmp_path / "in.jsonl").unlink()  # expiry must re-read lines for the batch_expired errors
    late = NOW.replace(year=NOW.year + 1)
    done = await jobs.refresh_status(job, first.status, ledger, ObjectStore(), late)
    status, reason, message = condition(done, "Failed")
    assert (status, reason) == ("True", "MergeFailed")
    assert f"{job.spec.input_url} failed: FileNotFoundError" in message


async def test_a_store_that_is_away_is_retried_with_back_off_then_fails_the_job(
    aredis: Redis, tmp_path: Path
) -> None:
    job, first, ledger = await worked(aredis, tmp_path, 4)
    store = FlakyWrites(failures=100)
    delays = []
    status = first.status
    for _ in range(MAX_STORAGE_ATTEMPTS - 1):
        update = await jobs.refresh_status(job, status, ledger, store, NOW)
        assert update.status.phase == "finalizing"
        assert condition(update, "Degraded")[:2] == ("True", "OutputUnwritable")
        assert "Connection refused" in condition(update, "Degraded")[2]
        assert update.retry_in is not None
        delays.append(update.retry_in)
        status = update.status
    assert delays == sorted(delays)
    assert delays[-1] > delays[0]  # back-off
    final = await jobs.refresh_status(job, status, ledger, store, NOW)
    assert final.retry_in is None
    assert final.status.phase == "failed"
    assert condition(final, "Failed")[1] == "OutputUnwritable"
    assert f"({MAX_STORAGE_ATTEMPTS} attempts)" in condition(final, "Failed")[2]


async def test_a_store_back_in_time_clears_degraded_and_the_job_completes(
    aredis: Redis, tmp_path: Path
) -> None:
    job, first, ledger = await worked(aredis, tmp_path, 4)
    store = FlakyWrites(failures=2)
    status = first.status
    for _ in range(2):
        status = (await jobs.refresh_status(job, status, ledger, store, NOW)).status
    done = await jobs.refresh_status(job, status, ledger, store, NOW)
    assert done.status.phase == "completed"
    assert condition(done, "Degraded")[:2] == ("False", "Healthy")
    assert len(read_jsonl(tmp_path / "out" / "output.jsonl")) == 4
    assert "failures:finalize" not in await aredis.hgetall(ledger.keys.key("meta"))  # type: ignore[misc]


async def test_an_unwritable_output_at_indexing_says_output_not_input(aredis: Redis, tmp_path: Path) -> None:
    job = make_job(tmp_path, [request_line("r0"), "not json"])  # the bad line needs an error segment
    (tmp_path / "out").write_text("a file where the output directory should be")
    update = await started(aredis, job, ObjectStore())
    status, reason, message = condition(update, "Failed")
    assert (status, reason) == ("True", "OutputUnwritable")
    assert f"writing {job.spec.output_url}_segments" in message


async def test_a_line_over_the_limit_becomes_an_error_line_and_the_rest_runs(
    aredis: Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(objects, "MAX_LINE_BYTES", 2048)
    huge = request_line("huge").replace('"content": "', '"content": "' + "x" * 5000)
    job = make_job(tmp_path, [request_line("r0"), huge, request_line("r1")])
    first = await started(aredis, job, ObjectStore())
    assert first.status.request_counts.total == 3
    ledger = jobs.ledger_for(job, aredis)
    await drain(ledger, ObjectStore(), job.spec.output_url)
    done = await jobs.refresh_status(job, first.status, ledger, ObjectStore(), NOW)
    assert done.status.phase == "completed"
    (error,) = read_jsonl(tmp_path / "out" / "errors.jsonl")
    assert error["error"]["code"] == "line_too_long"
    assert sorted(o["custom_id"] for o in read_jsonl(tmp_path / "out" / "output.jsonl")) == ["r0", "r1"]


def test_reading_a_file_without_newlines_holds_one_bounded_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bounded by bytes and linear: 64 MiB without a newline, read in 1 MiB chunks, is one
    oversized line (the old reader re-split its whole pending buffer on every chunk)."""
    monkeypatch.setattr(objects, "MAX_LINE_BYTES", 1 << 20)
    path = tmp_path / "flat.jsonl"
    with path.open("wb") as out:
        for _ in range(64):
            out.write(b"y" * (1 << 20))
        out.write(b"\n" + b'{"a": 1}' + b"\n")
    started_at = time.monotonic()
    lines = list(ObjectStore().iter_lines(path.as_uri()))
    took = time.monotonic() - started_at
    assert [(line.oversized, line.length, line.data[:2]) for line in lines] == [
        (True, 64 << 20, b""),
        (False, 8, b'{"'),
    ]
    assert lines[1].start == (64 << 20) + 1
    assert took < 10, took


async def test_a_slow_merge_leaves_the_event_loop_free(aredis: Redis, tmp_path: Path) -> None:
    """The pool timers (and so yields) run on the operator's event loop: a merge whose uploads
    block must not hold it."""
    job, first, ledger = await worked(aredis, tmp_path, 40, chunk=2)  # 20 segments: 20 slow writes
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    done = await jobs.refresh_status(job, first.status, ledger, SlowWrites(), NOW)
    stop.set()
    await ticking
    assert done.status.phase == "completed"
    assert len(gaps) > 20
    assert max(gaps) < 0.04, max(gaps)  # a blocked loop shows the 50 ms writes


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (ConnectionRefusedError(111, "refused"), True),
        (TimeoutError("timed out"), True),
        (FileNotFoundError("gone"), False),
        (PermissionError("denied"), False),
        (type("NoCredentialsError", (Exception,), {})("no creds"), False),
        (type("ClientError", (Exception,), {"response": {"Error": {"Code": "SlowDown"}}})("x"), True),
        (
            type("ClientError", (Exception,), {"response": {"ResponseMetadata": {"HTTPStatusCode": 403}}})(
                "x"
            ),
            False,
        ),
        (type("EndpointConnectionError", (Exception,), {})("down"), True),
    ],
)
def test_failures_are_told_apart_by_whether_they_pass(error: Exception, transient: bool) -> None:
    assert is_transient(error) is transient


async def test_segments_left_by_an_operator_stopped_after_the_merge_are_cleaned_up(
    aredis: Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The merge published and the ledger says completed, then the operator died before deleting
    the segments: the next refresh deletes them; a failed delete never fails a completed job."""
    job, first, ledger = await worked(aredis, tmp_path, 4)
    segments = tmp_path / "out" / "_segments" / job.metadata.uid_text

    def dies(self: ObjectStore, url: str) -> None:
        raise WriteError("deleting", url, ConnectionResetError(104, "Connection reset"))

    monkeypatch.setattr(ObjectStore, "delete_prefix", dies)
    done = await jobs.refresh_status(job, first.status, ledger, ObjectStore(), NOW)
    assert done.status.phase == "completed"  # the output is published: the job is done
    assert segments.exists()
    monkeypatch.undo()
    again = await jobs.refresh_status(job, first.status, ledger, ObjectStore(), NOW)
    assert again.status.phase == "completed"
    assert not segments.exists()
    assert (await ledger.progress()).cleaned


async def test_an_input_changed_after_indexing_fails_the_job_at_the_merge(
    aredis: Redis, tmp_path: Path
) -> None:
    job, first, ledger = await worked(aredis, tmp_path, 4)
    write_input(tmp_path / "in.jsonl", [request_line(f"other-{i}") for i in range(5)])  # replaced
    done = await jobs.refresh_status(job, first.status, ledger, ObjectStore(), NOW)
    assert done.status.phase == "failed"
    status, reason, message = condition(done, "Failed")
    assert (status, reason) == ("True", "InputChanged")
    assert f"input {job.spec.input_url} changed since it was indexed" in message
    assert done.retry_in is None
    assert not (tmp_path / "out" / "output.jsonl").exists()


async def test_a_worker_finding_the_input_changed_ends_the_job_not_itself(
    aredis: Redis, tmp_path: Path
) -> None:
    """A worker starting on a changed input reports it and exits cleanly (no crash loop); the
    operator's next refresh fails the job, saying what changed."""
    job = make_job(tmp_path, [request_line(f"r{i}") for i in range(4)])
    first = await started(aredis, job, ObjectStore())
    ledger = jobs.ledger_for(job, aredis)
    write_input(tmp_path / "in.jsonl", [request_line(f"other-{i}") for i in range(4)] + ["{}"])
    worker = Worker(ledger, ObjectStore(), EngineClient("http://127.0.0.1:9"), WorkerOptions(worker_id="w"))
    assert await worker.run() == ExitCode.OK
    done = await jobs.refresh_status(job, first.status, ledger, ObjectStore(), NOW)
    assert done.status.phase == "failed"
    assert condition(done, "Failed")[1] == "InputChanged"
    assert (await ledger.progress()).failed_attempts == 0  # nothing charged to the requests


class FlakyReads(ObjectStore):
    """The input cannot be read while `away` (a store that is down)."""

    away = True

    def read_ranges(self, url: str, spans: Sequence[tuple[int, int]]) -> list[bytes]:
        if self.away:
            raise ReadError("reading", url, ConnectionRefusedError(111, "Connection refused"))
        return super().read_ranges(url, spans)


async def test_a_store_away_costs_workers_time_not_results_or_attempts(aredis: Redis, tmp_path: Path) -> None:
    """Results wait in the worker while segments cannot be written (their leases kept), and a
    claim whose input cannot be read goes back at once; nothing is lost, nothing charged."""
    job = make_job(tmp_path, [request_line(f"r{i}") for i in range(6)])
    await started(aredis, job, ObjectStore())
    ledger = jobs.ledger_for(job, aredis)
    worker = FakeWorker(ledger, FlakyWrites(failures=1), job.spec.output_url, "w")
    assert await worker.take(6)
    await worker.work(6)
    with pytest.raises(WriteError):
        await worker.flush()
    assert len(worker.writer) == 6  # kept for the next flush
    assert await worker.flush() == 6  # the store is back: committed once
    assert (await ledger.progress()).completed == 6

    other = make_job(tmp_path / "b", [request_line(f"q{i}") for i in range(4)])
    await started(aredis, other, ObjectStore())
    other_ledger = jobs.ledger_for(other, aredis)
    store = FlakyReads()
    runner = Worker(other_ledger, store, EngineClient("http://127.0.0.1:9"), WorkerOptions(worker_id="w2"))
    runner.input = await other_ledger.config()
    await runner._claim(4)
    assert runner.queue == []
    assert runner.outstanding == {}  # the lease went back
    progress = await other_ledger.progress()
    assert (progress.leases, progress.failed_attempts) == (0, 0)
    await runner._claim(4)  # paused: no claim while the store was just seen away
    assert (await other_ledger.progress()).leases == 0
    store.away = False
    runner._claim_after = 0.0
    await runner._claim(4)
    assert len(runner.queue) == 4


async def test_an_input_over_the_jobs_request_limit_fails_saying_so(
    aredis: Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the ledger's limit (Redis refuses a value over 512 MB: about 44M requests' offsets)
    the job fails at indexing with a message, instead of meeting Redis's error again and again."""
    monkeypatch.setattr(constants, "MAX_REQUESTS_PER_JOB", 5)
    job = make_job(tmp_path, [request_line(f"r{i}") for i in range(8)])
    update = await started(aredis, job, ObjectStore())
    assert update.status.phase == "failed"
    status, reason, message = condition(update, "Failed")
    assert (status, reason) == ("True", "InputTooLarge")
    assert "holds more than 5 requests" in message
    assert await jobs.ledger_for(job, aredis).state() == "failed"


async def test_a_namespace_holds_no_more_unfinished_requests_than_its_quota(
    aredis: Redis, tmp_path: Path
) -> None:
    capped = pool(
        quotas=[{"namespace": "team-a", "maxGPUs": 4, "maxRequests": 5, "storage": [{"prefix": "file:///"}]}]
    )

    def admitted(job: BatchInference) -> Any:
        return admit(job, ModelTemplate.model_validate(template()), BatchPool.model_validate(capped))

    first = make_job(tmp_path / "a", [request_line(f"r{i}") for i in range(4)])
    running = await jobs.start(first, admitted(first), jobs.ledger_for(first, aredis), ObjectStore(), NOW)
    assert running.status.phase == "in_progress"
    listed = [first.to_wire() | {"status": running.status.to_wire()}]

    second = make_job(tmp_path / "b", [request_line(f"q{i}") for i in range(3)])
    unfinished = await jobs.namespace_unfinished(aredis, listed, second)
    assert unfinished == 4
    over = await jobs.start(
        second,
        admitted(second),
        jobs.ledger_for(second, aredis),
        ObjectStore(),
        NOW,
        namespace_unfinished=unfinished,
    )
    status, reason, message = condition(over, "Failed")
    assert (status, reason) == ("True", "RequestQuotaExceeded")
    assert "may hold 5 unfinished requests in the ledger and its other jobs hold 4" in message

    await drain(jobs.ledger_for(first, aredis), ObjectStore(), first.spec.output_url)  # the first finishes
    third = make_job(tmp_path / "c", [request_line(f"s{i}") for i in range(3)])
    room = await jobs.namespace_unfinished(aredis, listed, third)
    assert room == 0
    fits = await jobs.start(
        third, admitted(third), jobs.ledger_for(third, aredis), ObjectStore(), NOW, namespace_unfinished=room
    )
    assert fits.status.phase == "in_progress"
