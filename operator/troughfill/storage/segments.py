"""Output segments: what one worker finished between two flushes, uploaded as one object.

A segment is written whole before the ledger hears of it, so a crash leaves either no
segment or one the ledger never committed; finalize reads only committed segments, and
from each only the requests that segment won.
"""

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from troughfill.storage.objects import ObjectStore, join

SEGMENTS_DIR = "_segments"
OUTPUT_FILE = "output.jsonl"
ERROR_FILE = "errors.jsonl"


class RecordKind(StrEnum):
    OUTPUT = "output"
    ERROR = "error"


@dataclass(frozen=True)
class SegmentRecord:
    index: int
    kind: RecordKind
    record: dict[str, Any]
    """The OpenAI Batch output or error line, as it will appear in the merged file."""


def segment_url(output_prefix: str, segment_id: str) -> str:
    return join(join(output_prefix, SEGMENTS_DIR), f"{segment_id}.jsonl")


def new_segment_id(writer: str) -> str:
    return f"{writer}-{uuid.uuid4().hex[:16]}"


def write_segment(
    store: ObjectStore, output_prefix: str, segment_id: str, records: list[SegmentRecord]
) -> str:
    """Upload one segment (all or nothing) and return its URL."""
    url = segment_url(output_prefix, segment_id)
    body = b"".join(
        json.dumps(
            {"index": r.index, "kind": r.kind.value, "record": r.record}, separators=(",", ":")
        ).encode()
        + b"\n"
        for r in records
    )
    store.write_bytes(url, body)
    return url


def read_segment(store: ObjectStore, output_prefix: str, segment_id: str) -> Iterator[SegmentRecord]:
    for item in store.read_jsonl(segment_url(output_prefix, segment_id)):
        yield SegmentRecord(int(item["index"]), RecordKind(item["kind"]), item["record"])
