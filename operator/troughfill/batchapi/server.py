"""`troughfill api`: the OpenAI Batch API as an aiohttp application.

Every /v1 call is authenticated with TokenReview (the bearer token: a ServiceAccount token or
any token the cluster accepts) and authorized with SubjectAccessReview on batchinferences in
the caller's namespace: the `OpenAI-Organization` header (the client's `organization=`), else
`X-Troughfill-Namespace`, else a ServiceAccount's own namespace. Reading a batch or a file
needs `get`, listing `list`, creating a batch or uploading a file `create`, cancelling `patch`,
deleting a file `delete`. Errors are OpenAI's: {"error": {"message", "type", "param", "code"}}.
"""

import asyncio
import contextlib
import logging
import math
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from pydantic import ValidationError

from troughfill.api.batchinference import BatchInference, Phase
from troughfill.api.batchpool import StorageGrant
from troughfill.batchapi import mapping
from troughfill.batchapi.files import Files, NoStorageError, UploadProblem
from troughfill.batchapi.mapping import DEFAULT_TEMPLATE_ANNOTATION, CreateProblem, JobFile
from troughfill.batchapi.openapi import document
from troughfill.batchapi.ports import Caller, Conflict, Jobs, Rejected, Reviews
from troughfill.batchapi.wire import (
    Batch,
    CreateBatch,
    ErrorBody,
    ErrorResponse,
    FileDeleted,
    FileObject,
    Page,
)
from troughfill.config import Settings
from troughfill.ratelimit import KeyedLimits
from troughfill.storage import StorageError

log = logging.getLogger("troughfill.api")

NAMESPACE_HEADERS = ("OpenAI-Organization", "X-Troughfill-Namespace")
ENDED = frozenset({Phase.COMPLETED, Phase.FAILED, Phase.EXPIRED, Phase.CANCELLED})
MAX_PAGE = 100
DEFAULT_BATCH_PAGE = 20
DEFAULT_FILE_PAGE = 10_000
SPOOL_BYTES = 8 << 20
UPLOAD_RETRY_SECONDS = 5
"""What a caller refused for too many uploads at once is told to wait."""

REQUESTS = Counter(
    "troughfill_api_requests_total", "Batch API requests by route and HTTP status", ["route", "status"]
)
LATENCY = Histogram("troughfill_api_request_seconds", "Batch API request time by route", ["route"])

Listed = TypeVar("Listed", Batch, FileObject)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An OpenAI-format error answer."""

    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", *, param: str | None = None,
        code: str | None = None, retry_after: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code
        self.retry_after = retry_after

    def response(self) -> web.Response:
        body = ErrorResponse(
            error=ErrorBody(message=str(self), type=self.kind, param=self.param, code=self.code)
        )
        headers: dict[str, str] = {}
        if self.retry_after is not None:  # the official client waits this long and tries again
            headers["retry-after"] = str(self.retry_after)
        elif self.status < 500:  # it retries 409 and 5xx by default; these answers will not change
            headers["x-should-retry"] = "false"
        return web.json_response(body.model_dump(), status=self.status, headers=headers)


def not_found(what: str, ident: str) -> ApiError:
    return ApiError(404, f"No {what} found with id '{ident}'.", param="id", code="not_found")


def _epoch(moment: datetime | None) -> int:
    return int((moment or datetime.now(UTC)).timestamp())


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    started = time.monotonic()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except ApiError as error:
        status = error.status
        return error.response()
    except web.HTTPException as error:  # aiohttp's own: unknown route, wrong method
        status = error.status
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status)
        return ApiError(
            error.status, f"{request.method} {request.path}: {error.reason}", code=code
        ).response()
    except NoStorageError as error:
        status = 400
        return ApiError(400, str(error), code="no_storage_grant").response()
    except StorageError as error:
        status = 503
        log.warning("object store: %s", error)
        return ApiError(503, f"the object store failed: {error}", "server_error").response()
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return ApiError(500, "internal error", "server_error").response()
    finally:
        REQUESTS.labels(route, str(status)).inc()
        LATENCY.labels(route).observe(time.monotonic() - started)


class BatchApi:
    def __init__(self, reviews: Reviews, jobs: Jobs, files: Files, settings: Settings) -> None:
        self.reviews = reviews
        self.jobs = jobs
        self.files = files
        self.settings = settings
        self._uploads = 0
        """Uploads in progress now (api_max_concurrent_uploads at most)."""
        self._limits = KeyedLimits(settings.api_calls_per_second, settings.api_burst)
        """A token bucket per caller (its username, as TokenReview says)."""

    def app(self) -> web.Application:
        app = web.Application(middlewares=[openai_errors])
        app.router.add_post("/v1/files", self.create_file)
        app.router.add_get("/v1/files", self.list_files)
        app.router.add_get("/v1/files/{file_id}", self.get_file)
        app.router.add_delete("/v1/files/{file_id}", self.delete_file)
        app.router.add_get("/v1/files/{file_id}/content", self.file_content)
        app.router.add_post("/v1/batches", self.create_batch)
        app.router.add_get("/v1/batches", self.list_batches)
        app.router.add_get("/v1/batches/{batch_id}", self.get_batch)
        app.router.add_post("/v1/batches/{batch_id}/cancel", self.cancel_batch)
        app.router.add_get("/openapi.json", self.openapi)
        app.router.add_get("/healthz", self.healthy)
        app.router.add_get("/readyz", self.healthy)
        app.router.add_get("/metrics", self.metrics)
        return app

    # --- who and where -------------------------------------------------------------------------

    async def _authorize(self, request: web.Request, verb: str) -> str:
        """The namespace the caller acts in, once the cluster says it may `verb` there."""
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                401,
                "No API key: send a Kubernetes token as the bearer token (Authorization: Bearer <token>).",
                code="invalid_api_key",
            )
        found = await asyncio.to_thread(self.reviews.authenticate, token.strip())
        if isinstance(found, Rejected):
            raise ApiError(
                401, f"The token was not accepted by the cluster: {found.reason}", code="invalid_api_key"
            )
        wait = self._limits.take(found.username, time.monotonic())
        if wait:
            raise ApiError(
                429, f"{found.username} is over this API's rate ({self.settings.api_calls_per_second:g}/s)",
                "rate_limit_error", code="rate_limit_exceeded", retry_after=max(1, math.ceil(wait)),
            )  # fmt: skip
        namespace = self._namespace(request, found)
        if not await asyncio.to_thread(self.reviews.allowed, found, namespace, verb):
            raise ApiError(
                403,
                f"{found.username} may not {verb} batchinferences in namespace {namespace!r}",
                "permission_error",
                code="permission_denied",
            )
        return namespace

    @staticmethod
    def _namespace(request: web.Request, caller: Caller) -> str:
        for name in NAMESPACE_HEADERS:
            value = request.headers.get(name, "").strip()
            if value:
                if not mapping.NAME_PATTERN.match(value) or "." in value or len(value) > 63:
                    raise ApiError(400, f"{name} {value!r} is not a namespace name", param=name)
                return value
        own = caller.own_namespace
        if own is None:
            raise ApiError(
                400,
                "Which namespace? Set the client's organization (the OpenAI-Organization header) to it.",
                param="OpenAI-Organization",
            )
        return own

    # --- files ---------------------------------------------------------------------------------

    async def create_file(self, request: web.Request) -> web.Response:
        namespace = await self._authorize(request, "create")
        if not request.content_type.startswith("multipart/"):
            raise ApiError(400, "Upload a file as multipart/form-data with fields 'purpose' and 'file'.")
        purpose: str | None = None
        filename: str | None = None
        if self._uploads >= self.settings.api_max_concurrent_uploads:
            # Each upload may spool up to api_max_file_bytes to the pod's scratch volume.
            raise ApiError(
                429, f"{self._uploads} uploads are in progress, this API's limit; try again shortly",
                "rate_limit_error", code="rate_limit_exceeded", retry_after=UPLOAD_RETRY_SECONDS,
            )  # fmt: skip
        self._uploads += 1
        spooled = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 - closed below
        try:
            try:
                reader = await request.multipart()
                while (part := await reader.next()) is not None:
                    if not isinstance(part, BodyPartReader):
                        continue
                    if part.name == "purpose":
                        purpose = (await part.text()).strip()
                    elif part.name == "file":
                        filename = part.filename or "upload.jsonl"
                        await self._spool(part, spooled)
            except (ValueError, AssertionError, HttpProcessingError) as error:
                # aiohttp's parser on a body that is not multipart as RFC 7578 writes it.
                raise ApiError(400, f"Malformed multipart body: {error}".strip()) from None
            if filename is None:
                raise ApiError(400, "Missing the 'file' field.", param="file")
            if purpose != "batch":
                raise ApiError(
                    400,
                    f"purpose {purpose!r} is not supported: this API takes 'batch' files",
                    param="purpose",
                )
            spooled.seek(0)
            upload_id = mapping.new_upload_id()
            try:
                upload = await asyncio.to_thread(
                    self.files.upload,
                    namespace,
                    upload_id,
                    filename,
                    spooled,
                    self.settings.api_max_file_lines,
                )
            except UploadProblem as error:
                raise ApiError(
                    400, f"Invalid batch input file: {error}", param="file", code="invalid_file"
                ) from None
        finally:
            spooled.close()
            self._uploads -= 1
        return web.json_response(upload.file.model_dump())

    async def _spool(self, part: BodyPartReader, spooled: Any) -> None:
        size = 0
        while chunk := await part.read_chunk(1 << 20):
            size += len(chunk)
            if size > self.settings.api_max_file_bytes:
                raise ApiError(
                    413,
                    f"The file is larger than {self.settings.api_max_file_bytes} bytes (this API's limit).",
                    param="file",
                    code="file_too_large",
                )
            spooled.write(chunk)

    async def _job_file(self, namespace: str, name: str, part: JobFile) -> tuple[FileObject, str]:
        raw = await asyncio.to_thread(self.jobs.get, namespace, name)
        if raw is None:
            raise not_found("file", mapping.job_file_id(part, name))
        return await self._job_record(namespace, BatchInference.model_validate(raw), part)

    async def _job_record(
        self, namespace: str, job: BatchInference, part: JobFile, grants: Sequence[StorageGrant] | None = None
    ) -> tuple[FileObject, str]:
        """A job's own file (its input, output or error file) and its URL (found under one of
        `grants` when given: a listing resolves the namespace's grants once)."""
        ident = mapping.job_file_id(part, job.metadata.name)
        status = job.status
        url = {
            JobFile.INPUT: job.spec.input_url,
            JobFile.OUTPUT: status.output_url if status else None,
            JobFile.ERRORS: status.error_url if status else None,
        }[part]
        if url is None:
            raise not_found("file", ident)
        size = await asyncio.to_thread(self.files.size, namespace, url, grants)
        made = job.metadata.creationTimestamp if part == JobFile.INPUT else (status and status.finished_at)
        record = FileObject(
            id=ident,
            bytes=size,
            created_at=_epoch(made or job.metadata.creationTimestamp),
            filename=url.rstrip("/").rsplit("/", 1)[-1],
            purpose="batch" if part == JobFile.INPUT else "batch_output",
        )
        return record, url

    async def _file(self, namespace: str, ident: str) -> tuple[FileObject, str]:
        ref = mapping.parse_file_id(ident)
        if ref is None:
            raise not_found("file", ident)
        if ref.upload is not None:
            upload = await asyncio.to_thread(self.files.find, namespace, ref.upload)
            if upload is None:
                raise not_found("file", ident)
            return upload.file, upload.url
        assert ref.job is not None and ref.part is not None  # noqa: PT018 - parse_file_id sets both
        return await self._job_file(namespace, ref.job, ref.part)

    async def get_file(self, request: web.Request) -> web.Response:
        namespace = await self._authorize(request, "get")
        record, _ = await self._file(namespace, request.match_info["file_id"])
        return web.json_response(record.model_dump())

    async def file_content(self, request: web.Request) -> web.StreamResponse:
        namespace = await self._authorize(request, "get")
        record, url = await self._file(namespace, request.match_info["file_id"])
        chunks: Iterator[bytes] = await asyncio.to_thread(self.files.chunks, namespace, url)
        first = await asyncio.to_thread(next, chunks, b"")  # a failure to open is still an error answer
        response = web.StreamResponse(headers={"Content-Type": "application/jsonl"})
        response.content_length = record.bytes
        await response.prepare(request)
        while first:
            await response.write(first)
            first = await asyncio.to_thread(next, chunks, b"")
        await response.write_eof()
        return response

    async def delete_file(self, request: web.Request) -> web.Response:
        namespace = await self._authorize(request, "delete")
        ident = request.match_info["file_id"]
        ref = mapping.parse_file_id(ident)
        if ref is not None and ref.job is not None:
            raise ApiError(
                400,
                f"{ident} belongs to batch {mapping.batch_id(ref.job)}: "
                "it goes when its BatchInference is deleted",
                param="file_id",
            )
        if ref is None or not await asyncio.to_thread(self.files.delete, namespace, ident):
            raise not_found("file", ident)
        return web.json_response(FileDeleted(id=ident, deleted=True).model_dump())

    async def list_files(self, request: web.Request) -> web.Response:
        namespace = await self._authorize(request, "list")
        purpose = request.query.get("purpose")
        order = request.query.get("order", "desc")
        if order not in {"asc", "desc"}:
            raise ApiError(400, f"order {order!r} must be 'asc' or 'desc'", param="order")
        limit = _limit(request, DEFAULT_FILE_PAGE, 10_000)
        found: list[FileObject] = list(await asyncio.to_thread(self.files.uploads, namespace))
        grants = await asyncio.to_thread(self.jobs.grants, namespace)
        for raw in await asyncio.to_thread(self.jobs.in_namespace, namespace):
            job = BatchInference.model_validate(raw)
            for part in (JobFile.OUTPUT, JobFile.ERRORS):
                # A job file gone between the listing and the lookup is left out.
                with contextlib.suppress(ApiError, StorageError, NoStorageError):
                    found.append((await self._job_record(namespace, job, part, grants))[0])
        if purpose:
            found = [f for f in found if f.purpose == purpose]
        found.sort(key=lambda f: (f.created_at, f.id), reverse=order == "desc")
        page = _page(found, request.query.get("after"), limit)
        return web.json_response(page.model_dump())

    # --- batches -------------------------------------------------------------------------------

    async def create_batch(self, request: web.Request) -> web.Response:
        namespace = await self._authorize(request, "create")
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "The body is not JSON.") from None
        try:
            create = CreateBatch.model_validate(body)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or None
            raise ApiError(400, f"{where or 'body'}: {first['msg']}", param=where) from None
        try:
            endpoint = mapping.endpoint_of(create)
            mapping.completion_window_of(create)
        except CreateProblem as error:
            raise ApiError(400, str(error), param=error.param) from None
        input_url = await self._input_url(namespace, create.input_file_id, endpoint.value)
        template = (create.metadata or {}).get(mapping.TEMPLATE_METADATA_KEY) or await asyncio.to_thread(
            self.jobs.default_template, namespace
        )
        if not template:
            raise ApiError(
                400,
                f"No ModelTemplate: name one in metadata[{mapping.TEMPLATE_METADATA_KEY!r}], or an admin "
                f"sets the namespace's default (annotation {DEFAULT_TEMPLATE_ANNOTATION})",
                param="metadata",
            )
        name = mapping.new_job_name()
        output = await asyncio.to_thread(self.files.output_prefix, namespace, name)
        manifest = mapping.job_manifest(
            name=name,
            namespace=namespace,
            request=create,
            input_url=input_url,
            output_url=output,
            template=template,
        )
        try:
            made = await asyncio.to_thread(self.jobs.create, namespace, manifest)
        except Conflict as error:
            raise ApiError(400, f"The cluster refused the batch: {error}", param=None) from None
        return web.json_response(self._batch(made).model_dump())

    async def _input_url(self, namespace: str, ident: str, endpoint: str) -> str:
        ref = mapping.parse_file_id(ident)
        if ref is not None and ref.upload is not None:
            upload = await asyncio.to_thread(self.files.find, namespace, ref.upload)
            if upload is None:
                raise _no_input(ident)
            if set(upload.endpoints) != {endpoint}:
                raise ApiError(
                    400,
                    f"The file's requests call {', '.join(upload.endpoints)}; "
                    f"the batch's endpoint is {endpoint}",
                    param="endpoint",
                )
            return upload.url
        if ref is not None and ref.part == JobFile.INPUT and ref.job is not None:
            raw = await asyncio.to_thread(self.jobs.get, namespace, ref.job)
            if raw is not None:
                return BatchInference.model_validate(raw).spec.input_url
        raise _no_input(ident)

    def _batch(self, raw: dict[str, Any]) -> Batch:
        job = BatchInference.model_validate(raw)
        batch = mapping.to_batch(job, datetime.now(UTC))
        if job.spec.cancel and batch.status not in ENDED:
            requested = job.metadata.annotations.get(mapping.CANCEL_ANNOTATION, "")
            batch = batch.model_copy(
                update={
                    "status": "cancelling",
                    "cancelling_at": int(requested) if requested.isdigit() else None,
                }
            )
        return batch

    async def get_batch(self, request: web.Request) -> web.Response:
        namespace = await self._authorize(request, "get")
        ident = request.match_info["batch_id"]
        name = mapping.job_name(ident)
        raw = await asyncio.to_thread(self.jobs.get, namespace, name) if name else None
        if raw is None:
            raise not_found("batch", ident)
        return web.json_response(self._batch(raw).model_dump())

    async def cancel_batch(self, request: web.Request) -> web.Response:
        namespace = await self._authorize(request, "patch")
        ident = request.match_info["batch_id"]
        name = mapping.job_name(ident)
        raw = await asyncio.to_thread(self.jobs.get, namespace, name) if name else None
        if raw is None or name is None:
            raise not_found("batch", ident)
        current = self._batch(raw)
        if current.status in ENDED:
            raise ApiError(409, f"Cannot cancel a batch with status {current.status}.", code="conflict")
        try:
            patched = await asyncio.to_thread(self.jobs.cancel, namespace, name, int(time.time()))
        except Conflict as error:
            raise ApiError(409, f"The cluster refused the cancel: {error}", code="conflict") from None
        if patched is None:
            raise not_found("batch", ident)
        return web.json_response(self._batch(patched).model_dump())

    async def list_batches(self, request: web.Request) -> web.Response:
        namespace = await self._authorize(request, "list")
        limit = _limit(request, DEFAULT_BATCH_PAGE, MAX_PAGE)
        raws = await asyncio.to_thread(self.jobs.in_namespace, namespace)
        batches = [self._batch(raw) for raw in raws]
        batches.sort(key=lambda b: (b.created_at, b.id), reverse=True)  # newest first, as OpenAI lists
        return web.json_response(_page(batches, request.query.get("after"), limit).model_dump())

    # --- the rest ------------------------------------------------------------------------------

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(document())

    async def healthy(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def _no_input(ident: str) -> ApiError:
    return ApiError(
        400, f"No file found with id '{ident}' in this namespace.", param="input_file_id", code="not_found"
    )


def _limit(request: web.Request, default: int, most: int) -> int:
    text = request.query.get("limit")
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= most:
        raise ApiError(400, f"limit must be an integer from 1 to {most}", param="limit")
    return value


def _page(items: list[Listed], after: str | None, limit: int) -> Page[Listed]:
    if after:
        ids = [item.id for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    shown = items[:limit]
    return Page[Listed](
        data=shown,
        first_id=shown[0].id if shown else None,
        last_id=shown[-1].id if shown else None,
        has_more=len(items) > limit,
    )
