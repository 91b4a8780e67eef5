"""Object storage adapter: input lines by byte range, output segments, merged results (fsspec)."""

from troughfill.storage.errors import ReadError, StorageError, WriteError
from troughfill.storage.objects import MAX_LINE_BYTES, Line, ObjectStore, join, store_for
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
    "MAX_LINE_BYTES",
    "OUTPUT_FILE",
    "Line",
    "ObjectStore",
    "ReadError",
    "RecordKind",
    "SegmentRecord",
    "StorageError",
    "StoredRecord",
    "WriteError",
    "join",
    "new_segment_id",
    "read_segment",
    "segment_url",
    "segments_prefix",
    "store_for",
    "write_segment",
]
