"""A job's data path, ledger and object storage together: index the input, hand requests to
workers, store their results exactly once, merge the output.

Storage calls are blocking (fsspec) and run in threads; the ledger is asyncio. Where a job's
input and output are, the operator passes as its custom resource says (`config`): it never
takes a URL from Redis that it can read from the resource. Without one (workers, tools) the
ledger's copy is read.

A job's segments live under `<output>/_segments/<job uid>/`, and only that directory is ever
deleted: another job writing to the same output prefix (or the same job created again) keeps its own.
"""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from troughfill import constants
from troughfill.api.batchfile import ErrorCode, RequestLine, classify_line, error_record
from troughfill.api.batchinference import Endpoint, Phase
from troughfill.errors import TroughfillError
from troughfill.ledger import JobConfig, JobLedger, LedgerClosedError, LedgerCorruptError, Outcome, id_buckets
from troughfill.ledger.port import WorkerLedger
from troughfill.storage import (
    ERROR_FILE,
    MAX_LINE_BYTES,
    OUTPUT_FILE,
    Line,
    ObjectStore,
    ReadError,
    RecordKind,
    SegmentRecord,
    StorageError,
    StoredRecord,
    join,
    new_segment_id,
    read_segment,
    segments_prefix,
    write_segment,
)

INDEX_BATCH_LINES = 10_000
INDEX_BATCH_BYTES = 8 << 20
"""A batch of input lines being indexed ends at whichever comes first: memory is bounded by bytes
(lines and their parsed bodies), not by a count of lines of any size."""
INDEX_ERRORS_PER_SEGMENT = 10_000


def _next_batch(lines: Iterator[Line], size: int, max_bytes: int = INDEX_BATCH_BYTES) -> list[Line]:
    batch = []
    held = 0
    for line in lines:
        batch.append(line)
        held += len(line.data)
        if len(batch) >= size or held >= max_bytes:
            break
    return batch


def _classify(line: Line, endpoint: Endpoint) -> tuple[str | None, str | None, str]:
    """(custom_id, error code, message) of one input line. The parsed line is dropped at once:
    indexing keeps where each line is, never its body, so a batch holds its raw bytes and one
    parsed line at a time."""
    if line.oversized:
        return (
            None,
            ErrorCode.LINE_TOO_LONG,
            f"line is {line.length} bytes, over the {MAX_LINE_BYTES} allowed",
        )
    request, code, message = classify_line(line.data, endpoint)
    return (request.custom_id if request is not None else None), code, message


@dataclass
class IndexReport:
    total: int = 0
    invalid: int = 0


async def _config(ledger: WorkerLedger, config: JobConfig | None) -> JobConfig:
    return config if config is not None else await ledger.config()


async def index_input(
    ledger: JobLedger,
    store: ObjectStore,
    config: JobConfig | None = None,
    *,
    max_requests: int | None = None,
) -> IndexReport:
    """Read the input once: remember where every request's line is, and send invalid lines
    (bad JSON, wrong method or url, duplicate custom_id) to the error file. Then start the job.

    Safe to re-run after a crash: a job still validating is re-indexed from scratch.
    """
    config = await _config(ledger, config)
    await ledger.reset_index()
    identity = await asyncio.to_thread(store.identity, config.input_url)
    await ledger.record_input(identity)
    size = ObjectStore.size_of(identity)
    buckets = 0
    report = IndexReport()
    errors: list[SegmentRecord] = []
    lines = store.iter_lines(config.input_url)
    while batch := await asyncio.to_thread(_next_batch, lines, INDEX_BATCH_LINES):
        buckets = buckets or id_buckets(_expected_lines(size, batch))
        parsed = [_classify(line, config.endpoint) for line in batch]
        valid_ids = [custom_id for custom_id, code, _ in parsed if code is None and custom_id is not None]
        fresh = iter(await ledger.add_custom_ids(valid_ids, buckets))
        for line, (custom_id, problem, detail) in zip(batch, parsed, strict=True):
            code, message = problem, detail
            if code is None and not next(fresh):
                code, message = ErrorCode.DUPLICATE_CUSTOM_ID, "custom_id appears on an earlier line"
            if code is not None:
                record = error_record(
                    ledger.job_token, line.index, custom_id, code, message=message, line=line.number
                )
                errors.append(SegmentRecord(line.index, RecordKind.ERROR, record))
        limit = max_requests or constants.MAX_REQUESTS_PER_JOB
        if report.total + len(batch) > limit:
            raise InputTooLargeError(config.input_url, limit)
        await ledger.append_spans([(line.start, line.length) for line in batch])
        report.total += len(batch)
        if len(errors) >= INDEX_ERRORS_PER_SEGMENT:
            report.invalid += await _store_errors(ledger, store, config.output_url, errors)
            errors = []
    report.invalid += await _store_errors(ledger, store, config.output_url, errors)
    await check_input(store, config.input_url, identity)  # changed while it was read: not indexed
    await ledger.finish_index(report.total, buckets or 1)
    await ledger.transition(Phase.IN_PROGRESS)
    return report


def _expected_lines(size: int, first: list[Line]) -> int:
    """How many lines an input of `size` bytes holds if the rest is like its first batch."""
    read = first[-1].start + first[-1].length + 1 - first[0].start
    return max(len(first), -(-size * len(first) // max(1, read)))


async def _store_errors(
    ledger: JobLedger, store: ObjectStore, output_url: str, errors: list[SegmentRecord]
) -> int:
    if not errors:
        return 0
    writer = ResultWriter(ledger, store, output_url, writer="index")
    for record in errors:
        writer.add(record, Outcome(record.index, failed=True))
    await writer.flush()
    return len(errors)


async def load_requests(
    ledger: WorkerLedger, store: ObjectStore, indices: list[int], input_url: str | None = None
) -> list[RequestLine]:
    """The parsed input lines of these requests, in the same order (one ranged read per run)."""
    url = input_url if input_url is not None else (await ledger.config()).input_url
    spans = await ledger.spans(indices)
    raw = await asyncio.to_thread(store.read_ranges, url, spans)
    return [RequestLine.model_validate_json(data) for data in raw]


@dataclass
class ResultWriter:
    """Buffers one worker's results; `flush` stores them as a segment, then commits them.

    The order is the exactly-once argument: a result counts only once its segment is
    durable, and a segment counts only for the requests its commit won.
    """

    ledger: WorkerLedger
    store: ObjectStore
    output_url: str
    writer: str
    records: list[SegmentRecord] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)

    def add(self, record: SegmentRecord, outcome: Outcome) -> None:
        self.records.append(record)
        self.outcomes.append(outcome)

    def __len__(self) -> int:
        return len(self.records)

    async def flush(self, lease_id: int | None = None) -> int:
        """Store and commit what is buffered; returns how many requests this flush won."""
        if not self.records:
            return 0
        segment_id = new_segment_id(self.writer)
        records, outcomes = self.records, self.outcomes
        self.records, self.outcomes = [], []
        segments = segments_prefix(self.output_url, self.ledger.keys.uid)
        try:
            await asyncio.to_thread(write_segment, self.store, segments, segment_id, records)
        except StorageError:  # the store is away: keep them for the next flush (a new segment)
            self.records[:0], self.outcomes[:0] = records, outcomes
            raise
        return await self.ledger.commit(segment_id, outcomes, lease_id)


@dataclass(frozen=True)
class FinalReport:
    state: Phase
    output_url: str
    error_url: str
    outputs: int
    errors: int


async def finalize(
    ledger: JobLedger,
    store: ObjectStore,
    outcome: Phase = Phase.COMPLETED,
    config: JobConfig | None = None,
) -> FinalReport:
    """Merge committed segments into output.jsonl and errors.jsonl, then end the job.

    `outcome` is completed (every request done), expired (the window ended: the rest is
    reported as batch_expired) or cancelled (as batch_cancelled). Each request appears in
    exactly one of the two files, once. Re-running after a crash rewrites both files whole.
    """
    config = await _config(ledger, config)
    segments = segments_prefix(config.output_url, ledger.keys.uid)
    await check_input(store, config.input_url, await ledger.input_identity())
    if outcome == Phase.CANCELLED:
        await ledger.close()
    else:
        await ledger.transition(Phase.FINALIZING)
    progress = await ledger.progress()
    if progress.corrupt:
        raise LedgerCorruptError("the ledger", progress.corrupt)
    if outcome == Phase.COMPLETED and progress.finished < progress.total:
        raise MergeError(f"{progress.total - progress.finished} requests are not done; finalize as expired")
    output_url, error_url = join(config.output_url, OUTPUT_FILE), join(config.output_url, ERROR_FILE)
    async with _published(store, output_url) as outputs, _published(store, error_url) as errors:
        counts = await _merge(ledger, store, segments, outputs, errors, total=progress.total)
        unfinished_code = ErrorCode.CANCELLED if outcome == Phase.CANCELLED else ErrorCode.EXPIRED
        counts[RecordKind.ERROR] += await _write_final_errors(
            ledger, store, config.input_url, errors, total=progress.total, unfinished_code=unfinished_code
        )
        if counts[RecordKind.OUTPUT] + counts[RecordKind.ERROR] != progress.total:  # before publishing
            raise MergeError(f"merged {sum(counts.values())} records for {progress.total} requests")
    await ledger.transition(outcome)
    await clean_segments(ledger, store, config)
    return FinalReport(outcome, output_url, error_url, counts[RecordKind.OUTPUT], counts[RecordKind.ERROR])


async def clean_segments(ledger: JobLedger, store: ObjectStore, config: JobConfig) -> bool:
    """Delete a merged job's segments (its own uid's, nothing else); True when they are gone. A
    failure is not the job's: the output is published, and the next status refresh tries again."""
    try:
        await asyncio.to_thread(store.delete_prefix, segments_prefix(config.output_url, ledger.keys.uid))
    except StorageError:
        return False
    await ledger.mark_cleaned()
    return True


async def check_input(store: ObjectStore, url: str, indexed: str) -> None:
    """Raise InputChangedError when the input's identity differs from `indexed` ("" checks nothing)."""
    if not indexed:
        return
    now = await asyncio.to_thread(store.identity, url)
    if now != indexed:
        raise InputChangedError(
            f"input {url} changed since it was indexed ({indexed} then, {now} now): its requests can no "
            "longer be read; create a new job for the new input"
        )


class InputTooLargeError(TroughfillError):
    """The input holds more requests than the job may (`limit`)."""

    def __init__(self, url: str, limit: int) -> None:
        super().__init__(f"input {url} holds more than {limit} requests")
        self.limit = limit


class MergeError(TroughfillError):
    """The committed results do not add up (a segment lacks what it committed, counts differ):
    merging again will not help."""


class InputChangedError(MergeError):
    """The input is not the object that was indexed: its requests' byte ranges mean nothing now."""


@contextlib.asynccontextmanager
async def _published(store: ObjectStore, url: str) -> AsyncIterator[IO[bytes]]:
    """ObjectStore.writer with its blocking open and publish run in a thread: a large merge must
    not stall the event loop (the pool timers, and so yields to online traffic, run on it)."""
    manager = store.writer(url)
    stream = await asyncio.to_thread(manager.__enter__)
    try:
        yield stream
    except BaseException as error:
        await asyncio.to_thread(manager.__exit__, type(error), error, error.__traceback__)
        raise
    await asyncio.to_thread(manager.__exit__, None, None, None)


def _line_bytes(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def _read_all(store: ObjectStore, segments: str, segment_id: str) -> list[StoredRecord]:
    try:
        return list(read_segment(store, segments, segment_id))
    except (ValueError, UnicodeDecodeError) as error:  # a segment is a worker's (a tenant's) writing
        raise MergeError(f"segment {join(segments, segment_id)}.jsonl cannot be read: {error}") from None


def _stored_segments(store: ObjectStore, segments: str) -> set[str]:
    try:
        names = store.names(segments)
    except ReadError as error:
        if error.transient:
            raise
        return set()  # no segment stored (a directory never made); a committed one is then missing
    return {name.removesuffix(".jsonl") for name in names if name.endswith(".jsonl")}


async def _merge(
    ledger: JobLedger,
    store: ObjectStore,
    segments: str,
    outputs: IO[bytes],
    errors: IO[bytes],
    *,
    total: int,
) -> dict[RecordKind, int]:
    """Each committed segment's won records into the output or error file. Only segments stored
    under the job's own directory are read (listed once): the ledger says which, storage says
    they are the job's own."""
    counts = {RecordKind.OUTPUT: 0, RecordKind.ERROR: 0}
    stored = await asyncio.to_thread(_stored_segments, store, segments)
    async for segment_id in ledger.segments():
        if segment_id not in stored:
            raise MergeError(f"committed segment {segment_id} is not stored under {segments}")
        won = await ledger.segment_won(segment_id, total)
        records = await asyncio.to_thread(_read_all, store, segments, segment_id)
        chosen: dict[RecordKind, list[bytes]] = {RecordKind.OUTPUT: [], RecordKind.ERROR: []}
        for item in records:
            if item.index in won:
                won.discard(item.index)
                chosen[item.kind].append(item.line + b"\n")
        if won:
            raise MergeError(
                f"segment {join(segments, segment_id)}.jsonl lacks {len(won)} requests it committed"
            )
        for kind, stream in ((RecordKind.OUTPUT, outputs), (RecordKind.ERROR, errors)):
            if chosen[kind]:
                await asyncio.to_thread(stream.write, b"".join(chosen[kind]))
                counts[kind] += len(chosen[kind])
    return counts


async def _write_final_errors(
    ledger: JobLedger,
    store: ObjectStore,
    input_url: str,
    errors: IO[bytes],
    *,
    total: int,
    unfinished_code: str,
) -> int:
    """Error lines for requests that never got a result: dead letters, then unfinished ones."""
    written = 0
    batch: list[tuple[int, str]] = []
    async for item in ledger.dead_letters(total):
        batch.append(item)
        if len(batch) >= INDEX_BATCH_LINES:
            written += await _error_lines(ledger, store, input_url, errors, batch)
            batch = []
    written += await _error_lines(ledger, store, input_url, errors, batch)
    async for indices in ledger.unfinished(total, batch=INDEX_BATCH_LINES):
        written += await _error_lines(
            ledger, store, input_url, errors, [(i, unfinished_code) for i in indices]
        )
    return written


async def _error_lines(
    ledger: JobLedger, store: ObjectStore, input_url: str, errors: IO[bytes], items: list[tuple[int, str]]
) -> int:
    if not items:
        return 0
    requests = await load_requests(ledger, store, [index for index, _ in items], input_url)
    lines = [
        _line_bytes(error_record(ledger.job_token, index, request.custom_id, code))
        for (index, code), request in zip(items, requests, strict=True)
    ]
    await asyncio.to_thread(errors.write, b"".join(lines))
    return len(items)


__all__ = [
    "FinalReport",
    "IndexReport",
    "InputChangedError",
    "InputTooLargeError",
    "LedgerClosedError",
    "MergeError",
    "ResultWriter",
    "check_input",
    "clean_segments",
    "finalize",
    "index_input",
    "load_requests",
]
