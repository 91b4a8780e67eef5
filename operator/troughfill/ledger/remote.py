"""A job's ledger as its workers reach it: through the ledger service (ledger.service), with the
job's token, never through Redis. The same calls as JobLedger's worker side (ledger.port), so
the worker runs on either.

Calls ride out a restart of the service or of Redis: connection failures, 429 (Retry-After) and
502/503/504 are tried again, backing off from 0.25 s to 4 s, for about a minute before the call
fails (and with it the worker), as the worker's Redis client did.
"""

import asyncio
import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

import aiohttp

from troughfill.api.batchinference import Endpoint, Phase
from troughfill.errors import TroughfillError
from troughfill.ledger import wire
from troughfill.ledger.contract import Heartbeat, StopMode
from troughfill.ledger.keys import JobKeys
from troughfill.ledger.ledger import (
    Claim,
    JobConfig,
    JobNotRecordedError,
    LedgerClosedError,
    LedgerCorruptError,
    Outcome,
    Partial,
    Progress,
)

RETRY_STATUSES = frozenset({429, 502, 503, 504})
RETRY_SECONDS = 60.0
"""How long a call keeps trying while the service or Redis is away."""
BACKOFF_SECONDS = (0.25, 0.5, 1.0, 2.0, 4.0)
CALL_TIMEOUT_SECONDS = 30.0


class LedgerServiceError(TroughfillError):
    """The ledger service refused a call (a bad body, a token it does not take), or stayed away
    past RETRY_SECONDS."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"ledger service answered {status}: {message}" if status else message)
        self.status = status


class RemoteLedger:
    """One job's ledger through the ledger service at `url`, as `token` (the job's)."""

    def __init__(
        self,
        keys: JobKeys,
        url: str,
        token: str,
        *,
        ca_file: str | None = None,
        retry_seconds: float = RETRY_SECONDS,
    ) -> None:
        self.keys = keys
        self.retry_seconds = retry_seconds
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self._ca_file = ca_file
        self._session: aiohttp.ClientSession | None = None
        self.job_token = hashlib.sha256(keys.prefix.encode()).hexdigest()[:12]
        """Short stable id of this job, used in request ids (as JobLedger's)."""

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            ssl: Any = None
            if self._ca_file:
                import ssl as ssl_module  # noqa: PLC0415

                ssl = ssl_module.create_default_context(cafile=self._ca_file)
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_SECONDS),
                connector=aiohttp.TCPConnector(limit=16, ssl=ssl if ssl is not None else True),
            )
        return self._session

    async def _call(self, operation: str, body: wire.Body | dict[str, Any] | None = None) -> Any:
        if isinstance(body, dict):
            payload = json.dumps(body, separators=(",", ":")).encode()
        else:
            payload = (body or wire.Empty()).model_dump_json().encode()
        deadline = time.monotonic() + self.retry_seconds
        attempt = 0
        while True:
            try:
                async with self._client().post(
                    f"{self.url}/v1/job/{operation}",
                    data=payload,
                    headers={**self._headers, "Content-Type": "application/json"},
                ) as response:
                    if response.status == 200:
                        return (await response.json())["result"]
                    message = await _message(response)
                    if response.status not in RETRY_STATUSES:
                        raise _error(response.status, message)
                    wait = _retry_after(response, attempt)
                    problem = f"{response.status}: {message}"
            except (aiohttp.ClientConnectionError, TimeoutError) as error:
                wait = BACKOFF_SECONDS[min(attempt, len(BACKOFF_SECONDS) - 1)]
                problem = repr(error)
            attempt += 1
            if time.monotonic() + wait > deadline:
                raise LedgerServiceError(0, f"the ledger service at {self.url} stayed unavailable: {problem}")
            await asyncio.sleep(wait)

    # --- the job ---------------------------------------------------------------------------------

    async def config(self) -> JobConfig:
        found = await self._call("config")
        return JobConfig(
            input_url=found["input_url"],
            output_url=found["output_url"],
            endpoint=Endpoint(found["endpoint"]),
            max_attempts=int(found["max_attempts"]),
            lease_seconds=float(found["lease_seconds"]),
            input_identity=found["input_identity"],
        )

    async def report_input_changed(self, message: str) -> None:
        await self._call("input-changed", wire.InputChangedBody(message=message[: wire.MAX_MESSAGE_CHARS]))

    async def record_waste(self, tokens: int) -> None:
        if tokens:
            await self._call("record-waste", wire.WasteBody(tokens=min(tokens, wire.MAX_WASTE_PER_CALL)))

    async def pending(self) -> int:
        return int(await self._call("pending"))

    async def reap(self) -> int:
        return int(await self._call("reap"))

    async def progress(self) -> Progress:
        found = await self._call("progress")
        return Progress(
            state=Phase(found["state"]) if found.get("state") else None,
            **{name: found[name] for name in wire.PROGRESS_COUNTS},
        )

    async def spans(self, indices: Sequence[int]) -> list[tuple[int, int]]:
        spans: list[tuple[int, int]] = []
        for chunk in _chunks(indices):
            found = await self._call("spans", wire.IndicesBody(indices=chunk))
            spans += [(int(start), int(length)) for start, length in found]
        return spans

    # --- leases ----------------------------------------------------------------------------------

    async def claim(self, worker: str, max_count: int, *, idle: bool = False) -> Claim | None:
        count = max(1, min(max_count, wire.MAX_CLAIM))
        found = await self._call("claim", wire.ClaimBody(worker=worker, max_count=count, idle=idle))
        if found is None:
            return None
        return Claim(
            lease_id=int(found["lease_id"]),
            indices=[int(i) for i in found["indices"]],
            failed_attempts=[int(a) for a in found["failed_attempts"]],
            expires_at=time.time() + float(found["lease_seconds"]),  # by this host's clock
            solo=bool(found["solo"]),
        )

    async def renew(self, worker: str, lease_id: int) -> bool:
        return bool(await self._call("renew", wire.LeaseBody(worker=worker, lease_id=lease_id)))

    async def release(self, worker: str, lease_id: int) -> int:
        return int(await self._call("release", wire.LeaseBody(worker=worker, lease_id=lease_id)))

    async def nack(
        self,
        worker: str,
        lease_id: int,
        indices: Iterable[int],
        *,
        count_attempt: bool = True,
        crashed: bool = False,
    ) -> int:
        how: wire.StopHow = "crash" if crashed else "1" if count_attempt else "0"
        back = 0
        for chunk in _chunks(list(indices)):
            body = wire.NackBody(worker=worker, lease_id=lease_id, indices=chunk, how=how)
            back += int(await self._call("nack", body))
        return back

    async def commit(self, segment_id: str, outcomes: Sequence[Outcome], lease_id: int | None = None) -> int:
        if not wire.SEGMENT_ID.fullmatch(segment_id):
            raise ValueError(f"{segment_id!r} is not a segment id")
        # Built by hand, not through the model: a commit is the hottest call, and the service
        # validates every field of it anyway.
        body = {
            "segment_id": segment_id,
            "lease_id": lease_id,
            "outcomes": [
                (o.index, o.failed, o.prompt_tokens, o.completion_tokens, o.cached_tokens, o.resumed)
                for o in outcomes
            ],
        }
        return int(await self._call("commit", body))

    # --- partial generations ---------------------------------------------------------------------

    async def save_partials(self, partials: dict[int, Partial]) -> int:
        if not partials:
            return 0
        body = wire.SavePartialsBody(
            partials={
                i: wire.PartialWire(text=p.text, tokens=p.tokens, prompt_tokens=p.prompt_tokens)
                for i, p in partials.items()
            }
        )
        return int(await self._call("save-partials", body))

    async def load_partials(self, indices: Sequence[int]) -> dict[int, Partial]:
        found: dict[int, Partial] = {}
        for chunk in _chunks(indices):
            answer = await self._call("load-partials", wire.IndicesBody(indices=chunk))
            for index, item in answer.items():
                found[int(index)] = Partial(item["text"], int(item["tokens"]), item.get("prompt_tokens"))
        return found

    async def drop_partials(self, indices: Sequence[int]) -> None:
        for chunk in _chunks(indices):
            await self._call("drop-partials", wire.IndicesBody(indices=chunk))

    # --- the worker ------------------------------------------------------------------------------

    async def heartbeat(self, worker: str, beat: Heartbeat, ttl: float) -> None:
        ttl = min(max(ttl, 1.0), wire.MAX_HEARTBEAT_TTL_SECONDS)
        await self._call("heartbeat", wire.HeartbeatBody(worker=worker, beat=beat, ttl=ttl))

    async def clear_heartbeat(self, worker: str) -> None:
        await self._call("clear-heartbeat", wire.WorkerBody(worker=worker))

    async def last_heartbeat(self, worker: str) -> Heartbeat | None:
        found = await self._call("last-heartbeat", wire.WorkerBody(worker=worker))
        return Heartbeat.model_validate(found) if found else None

    async def stop_mode(self, worker: str) -> StopMode | None:
        found = await self._call("stop-mode", wire.WorkerBody(worker=worker))
        return StopMode(found) if found else None


def _chunks(indices: Sequence[int]) -> list[list[int]]:
    items = list(indices)
    return [items[k : k + wire.MAX_BATCH] for k in range(0, len(items), wire.MAX_BATCH)] or [[]]


async def _message(response: aiohttp.ClientResponse) -> str:
    try:
        return str((await response.json())["error"])
    except (aiohttp.ContentTypeError, ValueError, KeyError, TypeError):
        return (await response.text())[:500]


def _retry_after(response: aiohttp.ClientResponse, attempt: int) -> float:
    try:
        return max(0.05, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return BACKOFF_SECONDS[min(attempt, len(BACKOFF_SECONDS) - 1)]


def _error(status: int, message: str) -> TroughfillError:
    if status == 409:
        return LedgerClosedError(message)
    if status == 404:
        return JobNotRecordedError(message)
    if status == 422:
        return LedgerCorruptError("the ledger", message)
    return LedgerServiceError(status, message)
