"""Input, output and segment objects through fsspec: file:// and s3:// (any S3-protocol store).

Everything streams: input is read in fixed-size chunks, lines are fetched by byte range,
outputs are written through a stream. Nothing holds a whole file in memory.
"""

import contextlib
import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from fsspec.core import url_to_fs

from troughfill import constants
from troughfill.config import Settings
from troughfill.storage.errors import ReadError, StorageError, WriteError

READ_CHUNK_BYTES = 1 << 20
MAX_LINE_BYTES = constants.MAX_LINE_BYTES
# Ranges closer than this are fetched in one read: one round trip beats two small ones.
RANGE_MERGE_GAP_BYTES = 64 << 10


@dataclass(frozen=True)
class Line:
    """One non-blank line of the input: its ordinal among non-blank lines, where it is, its text."""

    index: int
    number: int
    """1-based physical line number, blank lines counted, as an editor shows it."""
    start: int
    length: int
    """Bytes up to, not including, the newline (and a preceding carriage return)."""
    data: bytes
    """Empty for a line over MAX_LINE_BYTES (its length is still its true length)."""
    oversized: bool = False


def join(prefix: str, name: str) -> str:
    return prefix.rstrip("/") + "/" + name


@dataclass
class ObjectStore:
    """fsspec behind the few operations troughfill needs; options per scheme, e.g. {"s3": {...}}."""

    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def _fs(self, url: str) -> tuple[Any, str]:
        scheme = url.split("://", 1)[0] if "://" in url else "file"
        fs, path = url_to_fs(url, **dict(self.options.get(scheme, {})))
        return fs, str(path)

    def iter_lines(self, url: str) -> Iterator[Line]:
        """Every non-blank line with its byte span, reading the object in 1 MiB chunks.

        Memory is bounded by bytes, not lines: at most one chunk and MAX_LINE_BYTES of the
        current line are held; a longer line is skipped to its end and yielded as `oversized`.
        Each byte is looked at once (no re-scanning of a long line's start)."""
        try:
            yield from _lines(*self._fs(url))
        except StorageError:
            raise
        except Exception as error:
            raise ReadError("reading", url, error) from error

    def read_ranges(self, url: str, spans: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes of each (start, length) span, in order, with nearby spans fetched together."""
        if not spans:
            return []
        try:
            return self._read_ranges(url, spans)
        except Exception as error:
            raise ReadError("reading", url, error) from error

    def _read_ranges(self, url: str, spans: Sequence[tuple[int, int]]) -> list[bytes]:
        fs, path = self._fs(url)
        order = sorted(range(len(spans)), key=lambda i: spans[i][0])
        results: list[bytes] = [b""] * len(spans)
        group: list[int] = []

        def fetch(members: list[int]) -> None:
            low = spans[members[0]][0]
            high = max(spans[i][0] + spans[i][1] for i in members)
            blob: bytes = fs.cat_file(path, start=low, end=high)
            for i in members:
                start, length = spans[i]
                results[i] = blob[start - low : start - low + length]

        for i in order:
            if group:
                group_end = max(spans[j][0] + spans[j][1] for j in group)
                if spans[i][0] - group_end > RANGE_MERGE_GAP_BYTES:
                    fetch(group)
                    group = []
            group.append(i)
        fetch(group)
        return results

    @contextlib.contextmanager
    def writer(self, url: str) -> Iterator[IO[bytes]]:
        """A binary stream whose object appears whole at `url` only when the block exits normally.

        It is written under a temporary name and moved into place at the end (a rename on
        local disks, a server-side copy on S3), so readers never see a partial file, and a
        failure leaves the previous object, if any, untouched.
        """
        try:
            fs, path = self._fs(url)
            temporary = f"{path}.tmp-{uuid.uuid4().hex}"
            parent = fs._parent(path)
            if parent and _local(fs):  # object stores need no directories; s3fs would create a bucket
                fs.makedirs(parent, exist_ok=True)
            opened = fs.open(temporary, "wb")
        except Exception as error:
            raise WriteError("writing", url, error) from error
        try:
            with opened as stream:
                yield stream
        except BaseException as error:
            with contextlib.suppress(Exception):
                fs.rm(temporary)
            if isinstance(error, OSError):  # the stream's own writes and its upload on close
                raise WriteError("writing", url, error) from error
            raise
        try:
            fs.mv(temporary, path)
        except Exception as error:
            raise WriteError("writing", url, error) from error

    def write_bytes(self, url: str, data: bytes) -> None:
        with self.writer(url) as stream:
            stream.write(data)

    def read_lines(self, url: str) -> Iterator[bytes]:
        """Non-blank lines, without their line endings."""
        try:
            fs, path = self._fs(url)
            with fs.open(path, "rb") as stream:
                for raw in stream:
                    line = raw.rstrip(b"\r\n")
                    if line.strip():
                        yield line
        except Exception as error:
            raise ReadError("reading", url, error) from error

    def read_chunks(self, url: str, size: int = READ_CHUNK_BYTES) -> Iterator[bytes]:
        """The object's bytes as they are, `size` at a time (for streaming it elsewhere)."""
        try:
            fs, path = self._fs(url)
            with fs.open(path, "rb") as stream:
                while chunk := stream.read(size):
                    yield chunk
        except Exception as error:
            raise ReadError("reading", url, error) from error

    def size(self, url: str) -> int:
        return self.size_of(self.identity(url))

    def read_jsonl(self, url: str) -> Iterator[dict[str, Any]]:
        for line in self.read_lines(url):
            yield json.loads(line)

    def identity(self, url: str) -> str:
        """What tells this version of the object from any other: its size and its ETag (and
        VersionId where the bucket keeps versions) on S3, its size and modification time on disk."""
        try:
            fs, path = self._fs(url)
            info = fs.info(path)
        except Exception as error:
            raise ReadError("looking up", url, error) from error
        marks = [f"size={info.get('size')}"]
        for key in ("ETag", "VersionId"):
            if info.get(key):
                marks.append(f"{key.lower()}={info[key]}")
        if len(marks) == 1:
            marks.append(f"mtime={info.get('mtime', info.get('LastModified'))}")
        return " ".join(marks)

    @staticmethod
    def size_of(identity: str) -> int:
        """The size in bytes an `identity` records."""
        for mark in identity.split():
            if mark.startswith("size="):
                return int(mark.removeprefix("size="))
        raise ValueError(f"no size in identity {identity!r}")

    def exists(self, url: str) -> bool:
        try:
            fs, path = self._fs(url)
            return bool(fs.exists(path))
        except Exception as error:
            raise ReadError("looking up", url, error) from error

    def names(self, url: str) -> list[str]:
        """Names of the objects directly under a prefix, sorted."""
        try:
            fs, path = self._fs(url)
            listed = fs.ls(path, detail=False)
        except Exception as error:
            raise ReadError("listing", url, error) from error
        return sorted(str(entry).rstrip("/").rsplit("/", 1)[-1] for entry in listed)

    def delete_prefix(self, url: str) -> None:
        try:
            fs, path = self._fs(url)
            if fs.exists(path):
                fs.rm(path, recursive=True)
        except Exception as error:
            raise WriteError("deleting", url, error) from error


def _lines(fs: Any, path: str) -> Iterator[Line]:
    index = number = position = 0
    pending = bytearray()  # the current line so far (at most MAX_LINE_BYTES)
    length = 0  # its true length, past what is kept
    with fs.open(path, "rb") as stream:
        while chunk := stream.read(READ_CHUNK_BYTES):
            start = 0
            while True:
                end = chunk.find(b"\n", start)
                piece = chunk[start:] if end < 0 else chunk[start:end]
                length += len(piece)
                if length <= MAX_LINE_BYTES:
                    pending += piece
                elif pending:
                    pending.clear()
                if end < 0:
                    break
                number += 1
                line = _line(index, number, position, length, pending)
                if line is not None:
                    yield line
                    index += 1
                position += length + 1
                pending.clear()
                length = 0
                start = end + 1
    line = _line(index, number + 1, position, length, pending)
    if line is not None:
        yield line


def _line(index: int, number: int, position: int, length: int, pending: bytearray) -> Line | None:
    """The line just read, or None when it is blank."""
    if length > MAX_LINE_BYTES:
        return Line(index, number, position, length, b"", oversized=True)
    data = bytes(pending).removesuffix(b"\r")
    if not data.strip():
        return None
    return Line(index, number, position, len(data), data)


def _local(fs: Any) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols


CREDENTIAL_KEYS = {
    "AWS_ACCESS_KEY_ID": "key",
    "AWS_SECRET_ACCESS_KEY": "secret",
    "AWS_SESSION_TOKEN": "token",
}
"""Keys of a storage grant's Secret, and the s3fs options they become."""
REGION_KEYS = ("AWS_REGION", "AWS_DEFAULT_REGION")
STORAGE_SECRET_KEYS = constants.STORAGE_SECRET_KEYS
assert {*CREDENTIAL_KEYS, *REGION_KEYS} == STORAGE_SECRET_KEYS


def store_for(settings: Settings, credentials: Mapping[str, str] | None = None) -> ObjectStore:
    """The object store the settings describe; with `credentials` (a grant's Secret), those are
    used for s3:// instead of the process's own identity."""
    s3: dict[str, Any] = {}
    for key, option in CREDENTIAL_KEYS.items():
        if credentials and key in credentials:
            s3[option] = credentials[key]
    region = next((credentials[key] for key in REGION_KEYS if credentials and key in credentials), None)
    if region:
        s3["client_kwargs"] = {"region_name": region}
    if settings.s3_endpoint_url:
        s3["endpoint_url"] = settings.s3_endpoint_url
    config: dict[str, Any] = {
        "connect_timeout": constants.STORE_TIMEOUT_SECONDS,
        "read_timeout": constants.STORE_TIMEOUT_SECONDS,
        "retries": {"max_attempts": constants.STORE_MAX_ATTEMPTS, "mode": "standard"},
    }
    if settings.s3_addressing_style != "auto":
        config["s3"] = {"addressing_style": settings.s3_addressing_style}
    s3["config_kwargs"] = config
    return ObjectStore(options={"s3": s3})
