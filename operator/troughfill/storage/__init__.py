"""Object storage adapter: input lines by byte range, output segments, merged results (fsspec)."""

from troughfill.storage.objects import Line, ObjectStore, join, store_for
from troughfill.storage.segments import (
    ERROR_FILE,
    OUTPUT_FILE,
    RecordKind,
    SegmentRecord,
    StoredRecord,
    new_segment_id,
    read_segment,
    segment_url,
    segments_prefix,
    write_segment,
)

__all__ = [
    "ERROR_FILE",
    "OUTPUT_FILE",
    "Line",
    "ObjectStore",
    "RecordKind",
    "SegmentRecord",
    "StoredRecord",
    "join",
    "new_segment_id",
    "read_segment",
    "segment_url",
    "segments_prefix",
    "store_for",
    "write_segment",
]
