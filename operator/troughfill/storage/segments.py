"""Output segments: what one worker finished between two flushes, uploaded as one object.

A segment is written whole before the ledger hears of it, so a crash leaves either no
segment or one the ledger never committed; finalize reads only committed segments, and
from each only the requests that segment won.

Each line is `index<TAB>kind<TAB>record-json`: finalize routes records by index and kind
and copies the JSON through without decoding it.
"""

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from troughfill.constants import SEGMENTS_DIR
from troughfill.storage.objects import ObjectStore, join

OUTPUT_FILE = "output.jsonl"
ERROR_FILE = "errors.jsonl"


class RecordKind(StrEnum):
    OUTPUT = "output"
    ERROR = "error"


@dataclass(slots=True)
class SegmentRecord:
    """One result for a segment (slots, not frozen: one per request)."""

    index: int
    kind: RecordKind
    record: dict[str, Any]
    """The OpenAI Batch output or error line, as it will appear in the merged file."""


def segments_prefix(output_prefix: str, job_uid: str) -> str:
    """One job's segments: deleting them touches no other job's, even one with the same output."""
    return join(join(output_prefix, SEGMENTS_DIR), job_uid)


def segment_url(segments: str, segment_id: str) -> str:
    return join(segments, f"{segment_id}.jsonl")


def new_segment_id(writer: str) -> str:
    return f"{writer}-{uuid.uuid4().hex[:16]}"


@dataclass(frozen=True)
class StoredRecord:
    """A record read back from a segment: the JSON line exactly as it will be merged."""

    index: int
    kind: RecordKind
    line: bytes


def write_segment(store: ObjectStore, segments: str, segment_id: str, records: list[SegmentRecord]) -> str:
    """Upload one segment (all or nothing) under the job's `segments` prefix and return its URL."""
    url = segment_url(segments, segment_id)
    dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
    body = "".join(f"{r.index}\t{r.kind.value}\t{dumps(r.record)}\n" for r in records).encode()
    store.write_bytes(url, body)
    return url


def read_segment(store: ObjectStore, segments: str, segment_id: str) -> Iterator[StoredRecord]:
    for raw in store.read_lines(segment_url(segments, segment_id)):
        index, kind, line = raw.split(b"\t", 2)
        yield StoredRecord(int(index), RecordKind(kind.decode()), line)
