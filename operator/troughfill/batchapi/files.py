"""Uploaded files and a batch's results, in the object store under the namespace's grant.

An upload lives at `<grant prefix>openai-files/<file id>/` as `data.jsonl` and `meta.json`
(its name, size, time, purpose and the endpoints its lines call); nothing is kept anywhere
else, so the object store is the file list. Batches the API creates write their output under
`<grant prefix>openai-batches/<name>/`. The grant is the namespace's first writable one (pools
in name order), the same the operator admits the batch's job under; its Secret's keys are
the ones used, as the operator uses them.
"""

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

from pydantic import ValidationError

from troughfill import constants
from troughfill.api.batchfile import RequestLine, line_problem
from troughfill.api.batchpool import StorageAccess, StorageGrant
from troughfill.api.storage import url_problem
from troughfill.batchapi.mapping import UPLOAD_PATTERN
from troughfill.batchapi.ports import Jobs
from troughfill.batchapi.wire import FileObject
from troughfill.config import Settings
from troughfill.controller.stores import GrantSecretMissingError, JobStores
from troughfill.errors import TroughfillError
from troughfill.storage import ObjectStore
from troughfill.storage.objects import join

FILES_DIR = "openai-files"
OUTPUTS_DIR = "openai-batches"
DATA_NAME = "data.jsonl"
META_NAME = "meta.json"


class NoStorageError(TroughfillError):
    """The namespace has no storage grant to keep files under (or its Secret is missing)."""


class UploadProblem(ValueError):  # noqa: N818 - a client's mistake, told back as a 400
    """An upload that is not a Batch input file: the first problem, with its line."""


@dataclass(frozen=True)
class Upload:
    """An uploaded file's record (meta.json) and where its data is."""

    file: FileObject
    url: str
    endpoints: tuple[str, ...]
    lines: int


def check_upload(stream: IO[bytes], max_lines: int) -> tuple[int, tuple[str, ...]]:
    """(requests, endpoints they call) of a Batch input file; UploadProblem at the first bad line."""
    seen: set[str] = set()
    endpoints: set[str] = set()
    count = 0
    number = 0
    # Read a line at a time, at most a line's limit: a file of one huge line never sits in memory.
    while raw := stream.readline(constants.MAX_LINE_BYTES + 1):
        number += 1
        if len(raw) > constants.MAX_LINE_BYTES:
            raise UploadProblem(f"line {number}: over {constants.MAX_LINE_BYTES} bytes (this API's limit)")
        if not raw.strip():
            continue
        count += 1
        if count > max_lines:
            raise UploadProblem(f"the file has more than {max_lines} requests (this API's limit)")
        problem = line_problem(raw)
        if problem is not None:
            raise UploadProblem(f"line {number}: {problem}")
        try:
            line = RequestLine.model_validate_json(raw)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "line"
            what = "not valid JSON" if first["type"] == "json_invalid" else f"{where}: {first['msg']}"
            raise UploadProblem(f"line {number}: {what}") from None
        if line.custom_id in seen:
            raise UploadProblem(f"line {number}: duplicate custom_id {line.custom_id!r}")
        seen.add(line.custom_id)
        endpoints.add(line.url.value)
    if not count:
        raise UploadProblem("the file has no requests")
    return count, tuple(sorted(endpoints))


class Files:
    def __init__(self, jobs: Jobs, settings: Settings) -> None:
        self.jobs = jobs
        self.settings = settings
        self.stores = JobStores(jobs, settings)  # grant Secrets read as the operator reads them

    # --- where ---------------------------------------------------------------------------------

    def home(self, namespace: str) -> StorageGrant:
        """The grant the namespace's files and API batches' output live under."""
        for grant in self.jobs.grants(namespace):
            if grant.access == StorageAccess.READ_WRITE and url_problem(grant.prefix) is None:
                return grant
        raise NoStorageError(
            f"namespace {namespace!r} has no writable storage grant in any BatchPool: "
            "an admin grants one in the pool's quota for it"
        )

    def store(self, grant: StorageGrant) -> ObjectStore:
        try:
            return self.stores.for_grant(grant.secret_name)
        except GrantSecretMissingError as error:
            raise NoStorageError(str(error)) from error

    def store_covering(
        self, namespace: str, url: str, grants: Sequence[StorageGrant] | None = None
    ) -> ObjectStore:
        """The store, with credentials, of a grant of the namespace that covers `url` (among
        `grants` when the caller has them already, else the pools' grants now)."""
        if url_problem(url) is None:
            for grant in self.jobs.grants(namespace) if grants is None else grants:
                if url.startswith(grant.prefix):
                    return self.store(grant)
        raise NoStorageError(f"{url} is not under a storage grant of namespace {namespace!r}")

    def output_prefix(self, namespace: str, name: str) -> str:
        return join(join(self.home(namespace).prefix, OUTPUTS_DIR), name) + "/"

    # --- uploads -------------------------------------------------------------------------------

    def upload(
        self, namespace: str, file_id: str, filename: str, stream: IO[bytes], max_lines: int
    ) -> Upload:
        """Check `stream` (seekable) as a Batch input file, then store it and its record."""
        lines, endpoints = check_upload(stream, max_lines)
        size = stream.tell()
        stream.seek(0)
        grant = self.home(namespace)
        store = self.store(grant)
        directory = join(join(grant.prefix, FILES_DIR), file_id)
        url = join(directory, DATA_NAME)
        with store.writer(url) as target:
            while chunk := stream.read(1 << 20):
                target.write(chunk)
        record = FileObject(
            id=file_id, bytes=size, created_at=int(time.time()), filename=filename, purpose="batch"
        )
        meta = {"file": record.model_dump(), "endpoints": list(endpoints), "lines": lines}
        store.write_bytes(join(directory, META_NAME), json.dumps(meta).encode())
        return Upload(record, url, endpoints, lines)

    def _root(self, namespace: str) -> tuple[ObjectStore, str]:
        """The store and the directory of the namespace's uploads (the grant resolved once)."""
        grant = self.home(namespace)
        return self.store(grant), join(grant.prefix, FILES_DIR)

    @staticmethod
    def _read(store: ObjectStore, root: str, file_id: str) -> Upload | None:
        if not UPLOAD_PATTERN.match(file_id):
            return None
        directory = join(root, file_id)
        meta_url = join(directory, META_NAME)
        if not store.exists(meta_url):
            return None
        meta: dict[str, Any] = json.loads(b"".join(store.read_chunks(meta_url)))
        return Upload(
            FileObject.model_validate(meta["file"]),
            join(directory, DATA_NAME),
            tuple(meta.get("endpoints", ())),
            int(meta.get("lines", 0)),
        )

    def find(self, namespace: str, file_id: str) -> Upload | None:
        if not UPLOAD_PATTERN.match(file_id):
            return None
        return self._read(*self._root(namespace), file_id)

    def uploads(self, namespace: str) -> list[FileObject]:
        store, root = self._root(namespace)
        if not store.exists(root):
            return []
        found = (self._read(store, root, name) for name in store.names(root))
        return [upload.file for upload in found if upload is not None]

    def delete(self, namespace: str, file_id: str) -> bool:
        if not UPLOAD_PATTERN.match(file_id):
            return False
        store, root = self._root(namespace)
        if self._read(store, root, file_id) is None:
            return False
        store.delete_prefix(join(root, file_id))
        return True

    def chunks(self, namespace: str, url: str) -> Iterator[bytes]:
        return self.store_covering(namespace, url).read_chunks(url)

    def size(self, namespace: str, url: str, grants: Sequence[StorageGrant] | None = None) -> int:
        return self.store_covering(namespace, url, grants).size(url)
