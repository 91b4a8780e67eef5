"""`troughfill ledger`: the ledger service, the only way a job's workers reach the ledger.

Workers run in their tenant's namespace, and a tenant with `edit` there controls them (exec,
image, labels) and every credential they hold. So they hold no Redis credential: they call this
service with their job's token (ledger.credentials), and the service does exactly that job's
operations (claim, renew, release, nack, commit, partial outputs, heartbeat, ...), each body
checked against bounds the operator owns (ledger.wire; indices below the job's total, which the
operator indexed) and each job rate-limited, before one of the ledger's scripts runs in Redis
with the service's own credential. The service is stateless: any replica serves any job, and
Redis needs one credential, no per-job users and no ACL commands (a managed Redis or Valkey that
refuses them works).

Answers: 200 with JSON; 400 a body outside the bounds; 401 no valid token; 404 no such job;
409 the job accepts no more results; 422 the job's ledger is corrupt; 429 over the job's rate
(Retry-After); 503 Redis unavailable (Retry-After). Workers retry 429 and 503 (ledger.remote).
"""

import asyncio
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pydantic
import redis.exceptions
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from redis.asyncio import Redis

from troughfill.ledger import wire
from troughfill.ledger.contract import Heartbeat
from troughfill.ledger.credentials import LedgerKey, read_token
from troughfill.ledger.keys import JobKeys
from troughfill.ledger.ledger import (
    MAX_HEARTBEAT_BYTES,
    JobLedger,
    JobNotRecordedError,
    LedgerClosedError,
    LedgerCorruptError,
    Outcome,
    Partial,
)
from troughfill.ratelimit import KeyedLimits

log = logging.getLogger("troughfill.ledger.service")

JOBS_KEPT = 10_000
"""Jobs whose ledger clients and rate buckets the service keeps (the least recently used go)."""
KEY_RELOAD_SECONDS = 10.0
"""A token that does not verify makes the service re-read the signing key at most this often."""
CONCURRENT_CALLS_PER_JOB = 32
"""Calls of one job that run against Redis at once; more wait their turn."""

CALLS = Counter(
    "troughfill_ledger_calls_total", "Ledger service calls by operation and status", ["op", "status"]
)
LATENCY = Histogram(
    "troughfill_ledger_call_seconds", "Ledger service call time by operation", ["op"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)  # fmt: skip

Handler = Callable[["_Job", Any], Awaitable[Any]]


class RefusedError(Exception):
    """An answer other than 200, with its status and message."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


@dataclass
class _Job:
    ledger: JobLedger
    slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(CONCURRENT_CALLS_PER_JOB))
    total: int | None = None
    """The job's request count once indexed (fixed from then on: the operator wrote it)."""


@dataclass(frozen=True)
class Limits:
    calls_per_second: float = 2000.0
    """Each job's calls a second, over all its workers (a worker makes a few a second)."""
    burst: float = 4000.0


class LedgerService:
    def __init__(self, client: Redis, limits: Limits | None = None) -> None:
        self.client = client
        self.key = LedgerKey(client)
        self.limits = limits or Limits()
        self._jobs: OrderedDict[JobKeys, _Job] = OrderedDict()
        self._rates = KeyedLimits(self.limits.calls_per_second, self.limits.burst, kept=JOBS_KEPT)
        self._key_read_at = 0.0
        self._tokens: dict[str, JobKeys] = {}
        """Tokens verified under the current key (a job's workers send the same one each call)."""
        self._operations: dict[str, Handler] = {
            "config": self._config,
            "claim": self._claim,
            "renew": self._renew,
            "release": self._release,
            "nack": self._nack,
            "reap": lambda job, _: job.ledger.reap(),
            "commit": self._commit,
            "save-partials": self._save_partials,
            "load-partials": self._load_partials,
            "drop-partials": self._drop_partials,
            "spans": self._spans,
            "pending": lambda job, _: job.ledger.pending(),
            "progress": self._progress,
            "heartbeat": self._heartbeat,
            "last-heartbeat": self._last_heartbeat,
            "clear-heartbeat": lambda job, body: job.ledger.clear_heartbeat(body.worker),
            "stop-mode": self._stop_mode,
            "record-waste": lambda job, body: job.ledger.record_waste(body.tokens),
            "input-changed": lambda job, body: job.ledger.report_input_changed(body.message),
        }
        assert set(self._operations) == set(wire.OPERATIONS)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=wire.MAX_BODY_BYTES)
        app.router.add_post("/v1/job/{operation}", self._handle)
        app.router.add_get("/healthz", self._health)
        app.router.add_get("/metrics", self._metrics)
        return app

    # --- the request path -----------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        operation = request.match_info["operation"]
        started = time.perf_counter()
        status = 200
        try:
            if operation not in self._operations:
                raise RefusedError(404, f"no operation {operation!r}")
            job = await self._authenticate(request)
            body = wire.OPERATIONS[operation].model_validate_json(await request.read() or b"{}")
            wait = self._rates.take(job.ledger.keys, time.monotonic())
            if wait:
                raise RefusedError(429, "over this job's rate of ledger calls", retry_after=wait)
            async with job.slots:
                result = await self._operations[operation](job, body)
            return web.json_response({"result": result}, dumps=_dumps)
        except RefusedError as refused:
            status = refused.status
            return _refusal(refused)
        except pydantic.ValidationError as error:
            status = 400
            return _refusal(RefusedError(400, _first_problem(error)))
        except web.HTTPRequestEntityTooLarge:
            status = 413
            return _refusal(RefusedError(413, f"the body is over {wire.MAX_BODY_BYTES} bytes"))
        except LedgerClosedError as error:
            status = 409
            return _refusal(RefusedError(409, str(error)))
        except JobNotRecordedError as error:
            status = 404
            return _refusal(RefusedError(404, str(error)))
        except LedgerCorruptError as error:
            status = 422
            return _refusal(RefusedError(422, str(error)))
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
            status = 503
            log.warning("ledger Redis unavailable: %s", error)
            return _refusal(RefusedError(503, "the ledger's Redis is unavailable", retry_after=1.0))
        finally:
            CALLS.labels(operation if operation in self._operations else "unknown", str(status)).inc()
            LATENCY.labels(operation if operation in self._operations else "unknown").observe(
                time.perf_counter() - started
            )

    async def _authenticate(self, request: web.Request) -> _Job:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise RefusedError(401, "a job's ledger token is required (Authorization: Bearer ...)")
        keys = self._tokens.get(token)
        if keys is None:
            keys = read_token(await self.key.get(), token)
            if keys is None and time.monotonic() - self._key_read_at > KEY_RELOAD_SECONDS:
                self._key_read_at = time.monotonic()  # Redis lost its data (and the key) since
                self._tokens.clear()
                keys = read_token(await self.key.get(fresh=True), token)
            if keys is None:
                raise RefusedError(401, "the ledger token is not valid")
            if len(self._tokens) >= JOBS_KEPT:
                self._tokens.clear()
            self._tokens[token] = keys
        job = self._jobs.get(keys)
        if job is None:
            job = _Job(JobLedger(self.client, keys))
            self._jobs[keys] = job
            if len(self._jobs) > JOBS_KEPT:
                self._jobs.popitem(last=False)
        else:
            self._jobs.move_to_end(keys)
        return job

    async def _total(self, job: _Job) -> int:
        """The job's request count (0 until it is indexed: no index is valid then)."""
        if job.total is None:
            total = await job.ledger.indexed_total()
            if total is None:
                return 0
            job.total = total
        return job.total

    async def _check_indices(self, job: _Job, indices: Iterable[int]) -> None:
        total = await self._total(job)
        beyond = [index for index in indices if index >= total]
        if beyond:
            raise RefusedError(400, f"request {beyond[0]} is not one of this job's {total}")

    # --- operations ------------------------------------------------------------------------------

    async def _config(self, job: _Job, _: wire.Empty) -> dict[str, Any]:
        config = await job.ledger.config()
        return {
            "input_url": config.input_url,
            "output_url": config.output_url,
            "endpoint": config.endpoint.value,
            "max_attempts": config.max_attempts,
            "lease_seconds": config.lease_seconds,
            "input_identity": config.input_identity,
        }

    async def _claim(self, job: _Job, body: wire.ClaimBody) -> dict[str, Any] | None:
        claim = await job.ledger.claim(body.worker, body.max_count, idle=body.idle)
        if claim is None:
            return None
        return {
            "lease_id": claim.lease_id,
            "indices": claim.indices,
            "failed_attempts": claim.failed_attempts,
            "lease_seconds": await job.ledger.lease_seconds(),
            "solo": claim.solo,
        }

    async def _renew(self, job: _Job, body: wire.LeaseBody) -> bool:
        return await job.ledger.renew(body.worker, body.lease_id)

    async def _release(self, job: _Job, body: wire.LeaseBody) -> int:
        return await job.ledger.release(body.worker, body.lease_id)

    async def _nack(self, job: _Job, body: wire.NackBody) -> int:
        await self._check_indices(job, body.indices)
        return await job.ledger.nack(
            body.worker,
            body.lease_id,
            body.indices,
            count_attempt=body.how == "1",
            crashed=body.how == "crash",
        )

    async def _commit(self, job: _Job, body: wire.CommitBody) -> int:
        await self._check_indices(job, (o[0] for o in body.outcomes))
        outcomes = [Outcome(*o) for o in body.outcomes]
        return await job.ledger.commit(body.segment_id, outcomes, body.lease_id)

    async def _save_partials(self, job: _Job, body: wire.SavePartialsBody) -> int:
        await self._check_indices(job, body.partials)
        if sum(len(p.text) for p in body.partials.values()) > wire.MAX_PARTIALS_CHARS:
            raise RefusedError(400, f"partial outputs over {wire.MAX_PARTIALS_CHARS} characters in one call")
        return await job.ledger.save_partials(
            {i: Partial(p.text, p.tokens, p.prompt_tokens) for i, p in body.partials.items()}
        )

    async def _load_partials(self, job: _Job, body: wire.IndicesBody) -> dict[str, Any]:
        await self._check_indices(job, body.indices)
        found = await job.ledger.load_partials(body.indices)
        return {
            str(i): {"text": p.text, "tokens": p.tokens, "prompt_tokens": p.prompt_tokens}
            for i, p in found.items()
        }

    async def _drop_partials(self, job: _Job, body: wire.IndicesBody) -> None:
        await self._check_indices(job, body.indices)
        await job.ledger.drop_partials(body.indices)

    async def _spans(self, job: _Job, body: wire.IndicesBody) -> list[list[int]]:
        await self._check_indices(job, body.indices)
        return [[start, length] for start, length in await job.ledger.spans(body.indices)]

    async def _progress(self, job: _Job, _: wire.Empty) -> dict[str, Any]:
        progress = await job.ledger.progress()
        if progress.corrupt:
            raise LedgerCorruptError("the ledger", progress.corrupt)
        state = progress.state.value if progress.state else None
        return {"state": state, **{name: getattr(progress, name) for name in wire.PROGRESS_COUNTS}}

    async def _heartbeat(self, job: _Job, body: wire.HeartbeatBody) -> None:
        if len(body.beat.model_dump_json()) > MAX_HEARTBEAT_BYTES:
            raise RefusedError(400, f"a heartbeat is at most {MAX_HEARTBEAT_BYTES} bytes")
        await job.ledger.heartbeat(body.worker, body.beat, ttl=body.ttl)

    async def _last_heartbeat(self, job: _Job, body: wire.WorkerBody) -> dict[str, Any] | None:
        beat: Heartbeat | None = await job.ledger.last_heartbeat(body.worker)
        return beat.model_dump(mode="json") if beat else None

    async def _stop_mode(self, job: _Job, body: wire.WorkerBody) -> str | None:
        mode = await job.ledger.stop_mode(body.worker)
        return mode.value if mode else None

    # --- probes and metrics ---------------------------------------------------------------------

    async def _health(self, _: web.Request) -> web.Response:
        try:
            await self.client.ping()
        except redis.exceptions.RedisError as error:
            return web.json_response({"ok": False, "error": str(error)[:200]}, status=503)
        return web.json_response({"ok": True})

    async def _metrics(self, _: web.Request) -> web.Response:
        response = web.Response(body=generate_latest())
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _refusal(refused: RefusedError) -> web.Response:
    headers = {}
    if refused.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(refused.retry_after)))
    return web.json_response({"error": str(refused)}, status=refused.status, headers=headers)


def _first_problem(error: pydantic.ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    return f"{where}: {first['msg']}"[:500]
