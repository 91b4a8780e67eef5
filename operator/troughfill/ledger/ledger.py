"""JobLedger: one BatchInference's durable state in Redis (asyncio)."""

import hashlib
import json
import re
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import pydantic
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript

from troughfill import constants
from troughfill.api.batchfile import ErrorCode
from troughfill.api.batchinference import Endpoint, Phase
from troughfill.config import Settings
from troughfill.errors import TroughfillError
from troughfill.ledger import lua
from troughfill.ledger.contract import Heartbeat, StopMode
from troughfill.ledger.keys import CUSTOM_IDS, OFFSETS, JobKeys
from troughfill.ledger.states import InvalidTransitionError, sources_of

SPAN = struct.Struct(">QI")
WON = struct.Struct(">I")
U32 = struct.Struct(">I")
# One outcome on the wire to the commit script: index, failed, prompt, completion, cached tokens.
OUTCOME = struct.Struct(">IBIII")
DEFAULT_LEASE_SECONDS = 15.0
BITMAP_READ_BYTES = 64 << 10

Redis = aioredis.Redis


ID_DIGEST_BYTES = 16
"""custom_ids are compared by their 128-bit BLAKE2b digests: two different ids of one job
collide with probability below 1e-21 even at MAX_REQUESTS_PER_JOB."""
IDS_PER_BUCKET = 64
"""Mean digests per bucket: Redis keeps a hash of up to 128 entries as a listpack (about 20
bytes an entry), and a Poisson(64) bucket passes 128 with probability about 1e-12."""


def id_buckets(expected_ids: int) -> int:
    """How many digest hashes a job expecting this many ids gets: a power of two, enough for
    IDS_PER_BUCKET in each on average. More ids than expected cost memory (buckets past 128
    become hash tables), never correctness."""
    buckets = 1
    while buckets * IDS_PER_BUCKET < expected_ids:
        buckets *= 2
    return buckets


DEAD_CODES = frozenset(code.encode() for code in (ErrorCode.MAX_ATTEMPTS, ErrorCode.CRASHED_ENGINE))
"""The error codes the ledger's scripts dead-letter requests with."""
MAX_HEARTBEAT_BYTES = 4096
"""A heartbeat is about 200 bytes; a longer value is not read."""
MAX_TOKENS: Final = 2**53
"""Token counts past this are not ones any job reaches (and a float could not hold them)."""
MAX_TEXT_FIELD = 2048
"""The longest free-text field (a worker's report, a refusal) the operator carries on."""

SEGMENT_ID = re.compile(rb"[a-z0-9][a-z0-9.-]{0,252}-[0-9a-f]{16}")
"""What `storage.segments.new_segment_id` makes of a writer's name (a pod name, or "index"): no
slash, so a committed id names an object in the job's own segment directory and nowhere else."""

MAX_CONNECTIONS = 64
"""Connections one process keeps to the ledger at most; more callers at once wait their turn."""
POOL_WAIT_SECONDS = 30.0
"""How long a caller waits for a free connection before the call fails."""
PATIENT_RETRIES = 20
"""A worker's client rides out a Redis restart: 20 reconnects backing off from 0.25 s to 4 s,
about a minute, before a ledger call fails (and with it the worker)."""


def connect(settings: Settings, *, patient: bool = False) -> Redis:
    """A client for the ledger Redis: URL, password and TLS from settings. `patient` (workers):
    connection failures are retried for about a minute, so a Redis restart costs a pause, not the
    worker and its leases; the operator fails fast instead and says so (Degraded) while Kopf retries."""
    options: dict[str, Any] = {"health_check_interval": 30}
    if patient:
        options["retry"] = Retry(ExponentialBackoff(cap=4.0, base=0.25), PATIENT_RETRIES)
        options["retry_on_error"] = [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError]
    if settings.redis_username:
        options["username"] = settings.redis_username
    if settings.redis_password is not None:
        options["password"] = settings.redis_password.get_secret_value()
    if settings.redis_tls_ca_file:
        options["ssl_ca_certs"] = settings.redis_tls_ca_file
    if settings.redis_tls_ca_pem:
        options["ssl_ca_data"] = settings.redis_tls_ca_pem
    # A bounded pool whose callers wait for a free connection: a thousand jobs' refreshes at once
    # queue here instead of failing with "Too many connections" (redis-py's default pool).
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=MAX_CONNECTIONS, timeout=POOL_WAIT_SECONDS, **options
    )
    client: Redis = aioredis.Redis(connection_pool=pool)
    return client


@dataclass(frozen=True)
class JobConfig:
    """What the ledger needs to know of a job, fixed when the job is created."""

    input_url: str
    output_url: str
    endpoint: Endpoint
    max_attempts: int
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    input_identity: str = ""
    """The input's identity when it was indexed (ObjectStore.identity); "" before."""


@dataclass(frozen=True)
class Claim:
    lease_id: int
    indices: list[int]
    failed_attempts: list[int]
    """Failed attempts each request had before this claim."""
    expires_at: float
    solo: bool = False
    """One request a crash made a suspect: run it with nothing else in the engine."""


@dataclass(slots=True)
class Outcome:
    """The result of one request as the ledger counts it (slots, not frozen: one per request)."""

    index: int
    failed: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    resumed: bool = False
    """Continued from another attempt's saved partial output (counted when it wins)."""


@dataclass(frozen=True)
class Progress:
    state: Phase | None
    total: int
    completed: int
    failed: int
    dead: int
    failed_attempts: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    wasted_tokens: int
    leases: int
    indexed: bool
    state_times: dict[str, float] = field(default_factory=dict)
    resumed: int = 0
    """Requests continued from a saved partial generation (after their worker yielded)."""
    refused: str | None = None
    """Why the operator stopped acting on the job (a spec change it refused), if it did."""
    cleaned: bool = False
    """The job's segments were deleted after its merge."""
    expiring: bool = False
    """The ended job's keys are set to expire."""
    input_changed: str | None = None
    """A worker found the input changed since it was indexed (what it saw)."""
    corrupt: str | None = None
    """What in the job's ledger could not be read (the key and field, and why): a job's pods
    hold its ledger credentials, so anything there may be whatever a tenant wrote. The job fails
    with LedgerCorrupt; the other fields are then zero, not read."""

    @property
    def finished(self) -> int:
        return self.completed + self.failed

    @property
    def all_done(self) -> bool:
        return self.indexed and self.finished >= self.total


@dataclass(frozen=True)
class Partial:
    text: str
    tokens: int
    prompt_tokens: int | None = None


class LedgerClosedError(TroughfillError):
    """The job no longer accepts results (finalizing or terminal)."""


class LedgerCorruptError(TroughfillError, ValueError):
    """A value in a job's ledger is not one the operator or the job's workers write. Everything a
    job's pods can write is tenant-controlled (they hold the job's credentials), so every read of
    it is parsed defensively and a bad value fails that job alone, naming where it was."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where


class JobNotRecordedError(TroughfillError, LookupError):
    """The ledger has no record of the job (never admitted, or its keys are gone)."""


class JobLedger:
    """Claims, leases, completions and usage of one job. All moves are single Lua scripts."""

    def __init__(self, client: Redis, keys: JobKeys, clock: Callable[[], float] | None = None) -> None:
        """`clock`: None (production) times leases by Redis's own clock, whatever this host's
        clock says; a test passes its own to move time by hand."""
        self.client = client
        self.keys = keys
        self.clock = clock
        self._scripts: dict[str, AsyncScript] = {}
        self._lease_seconds: float | None = None
        self.job_token = hashlib.sha256(keys.prefix.encode()).hexdigest()[:12]
        """Short stable id of this job, used in request ids."""

    def _script(self, name: str) -> AsyncScript:
        script = self._scripts.get(name)
        if script is None:
            script = self.client.register_script(getattr(lua, name))
            self._scripts[name] = script
        return script

    def _now(self) -> float | str:
        """ "now" for a script: the given clock's, or '' for the server's."""
        return self.clock() if self.clock is not None else ""

    def _local_now(self) -> float:
        return self.clock() if self.clock is not None else time.time()

    async def _run(self, name: str, *args: Any) -> Any:
        return await self._script(name)(keys=self.keys.script_keys, args=[self.keys.prefix, *args])

    # --- lifecycle -----------------------------------------------------------------------

    async def create(self, config: JobConfig) -> bool:
        """Record a new job in state validating, all of it at once; False (and nothing changed)
        if it exists."""
        fields: dict[str, str | float | int] = {
            "state": Phase.VALIDATING.value,
            "at:validating": self._local_now(),
            "input_url": config.input_url,
            "output_url": config.output_url,
            "endpoint": config.endpoint.value,
            "max_attempts": config.max_attempts,
            "lease_seconds": config.lease_seconds,
            "indexed": 0,
        }
        pairs = [str(part) for item in fields.items() for part in item]
        return bool(await self._script("CREATE")(keys=[self.keys.key("meta")], args=pairs))

    async def record_input(self, identity: str) -> None:
        """The input as it was indexed: what workers and the merge compare against."""
        await self.client.hset(self.keys.key("meta"), "input_identity", identity)

    async def input_identity(self) -> str:
        return _text(await self.client.hget(self.keys.key("meta"), "input_identity") or b"")

    async def report_input_changed(self, message: str) -> None:
        """A worker found the input is not what was indexed: the operator ends the job."""
        await self.client.hset(self.keys.key("meta"), "input_changed", message)

    async def mark_cleaned(self) -> None:
        await self.client.hset(self.keys.key("meta"), "cleaned", "1")

    async def count_failure(self, what: str) -> int:
        """One more failure in a row of `what` (the operator's data path: index, finalize)."""
        return int(await self.client.hincrby(self.keys.key("meta"), f"failures:{what}", 1))

    async def clear_failures(self, what: str) -> None:
        await self.client.hdel(self.keys.key("meta"), f"failures:{what}")

    async def config(self) -> JobConfig:
        meta = await self._meta()
        if "input_url" not in meta:
            raise JobNotRecordedError(f"no job at {self.keys.prefix}")
        return JobConfig(
            input_url=meta["input_url"],
            output_url=meta["output_url"],
            endpoint=Endpoint(meta["endpoint"]),
            max_attempts=int(meta["max_attempts"]),
            lease_seconds=float(meta["lease_seconds"]),
            input_identity=meta.get("input_identity", ""),
        )

    async def _meta(self) -> dict[str, str]:
        raw = await self.client.hgetall(self.keys.key("meta"))
        return {_text(k): _text(v) for k, v in raw.items()}

    async def state(self) -> Phase | None:
        """The job's state; LedgerCorruptError when meta or its state is not one we write."""
        try:
            value = await self.client.hget(self.keys.key("meta"), "state")
        except redis.exceptions.ResponseError as error:  # WRONGTYPE: meta is not a hash
            raise LedgerCorruptError("meta", str(error)) from None
        return _phase(value) if value else None

    async def transition(self, target: Phase) -> bool:
        """Move to `target` if the table allows it from the current state.

        Returns False when the job is already in `target` (idempotent); raises
        InvalidTransitionError for any other move the table does not allow.
        """
        sources = sorted(s.value for s in sources_of(target))
        moved, current = await self._run("TRANSITION", target.value, self._now(), *sources)
        if moved:
            return True
        state = _phase(current) if current else None
        if state == target:
            return False
        raise InvalidTransitionError(state, target)

    async def condemn(self, why: str) -> None:
        """End a job whose ledger is corrupt: failed and closed, whatever its keys say now."""
        await self.client.register_script(lua.CONDEMN)(
            keys=[self.keys.key("meta")], args=[self._local_now(), why]
        )

    async def close(self) -> None:
        """Accept no more results; what is committed now is what finalize merges."""
        await self._run("CLOSE")

    async def expire_after(self, seconds: float) -> int:
        """Every key of an ended job goes `seconds` from now (its status already says all there
        is to say; the custom resource may stay much longer). How many keys were set to go."""
        await self.client.hset(self.keys.key("meta"), "expiring", "1")
        count = 0
        pipe = self.client.pipeline(transaction=False)
        async for key in self.client.scan_iter(match=_glob_escape(self.keys.prefix) + "*", count=1000):
            pipe.pexpire(key, int(seconds * 1000))
            count += 1
            if len(pipe) >= 500:
                await pipe.execute()
        await pipe.execute()
        return count

    async def delete(self) -> int:
        """Remove every key of the job (outputs in object storage are kept)."""
        removed = 0
        batch: list[bytes] = []
        async for key in self.client.scan_iter(match=_glob_escape(self.keys.prefix) + "*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                removed += await self.client.unlink(*batch)
                batch = []
        if batch:
            removed += await self.client.unlink(*batch)
        return removed

    # --- indexing --------------------------------------------------------------------------

    async def reset_index(self) -> None:
        """Forget a partial indexing pass (validating only): everything but the job's config."""
        if await self.state() != Phase.VALIDATING:
            raise InvalidTransitionError(await self.state(), Phase.VALIDATING)
        meta = self.keys.key("meta")
        keep = {
            "state",
            "at:validating",
            "input_url",
            "output_url",
            "endpoint",
            "max_attempts",
            "lease_seconds",
        }
        async for key in self.client.scan_iter(match=_glob_escape(self.keys.prefix) + "*", count=1000):
            if _text(key) != meta:
                await self.client.unlink(key)
        fields = [f for f in await self.client.hkeys(meta) if _text(f) not in keep]
        if fields:
            await self.client.hdel(meta, *fields)
        await self.client.hset(meta, "indexed", 0)

    async def add_custom_ids(self, custom_ids: Sequence[str], buckets: int) -> list[bool]:
        """For each id, whether it is new to this job (False: a duplicate). Ids are kept as their
        128-bit digests in `buckets` hashes (see `id_buckets`), so Redis holds about 20 bytes an
        id whatever the ids' length."""
        if not custom_ids:
            return []
        args: list[bytes | int] = []
        for custom_id in custom_ids:
            digest = hashlib.blake2b(custom_id.encode(), digest_size=ID_DIGEST_BYTES).digest()
            args += [int.from_bytes(digest[:8], "big") % buckets, digest]
        flags = await self._script("NEW_CUSTOM_IDS")(keys=[self.keys.key(CUSTOM_IDS + ":")], args=args)
        return [flag == ord("1") for flag in _bytes(flags)]

    async def append_spans(self, spans: Sequence[tuple[int, int]]) -> None:
        """Append where the next requests' lines are: (byte offset, length) each."""
        packed = b"".join(SPAN.pack(start, length) for start, length in spans)
        await self.client.append(self.keys.key(OFFSETS), packed)

    async def finish_index(self, total: int, buckets: int) -> None:
        stored = await self.client.strlen(self.keys.key(OFFSETS))
        if stored != total * SPAN.size:
            raise ValueError(f"index holds {stored // SPAN.size} spans, expected {total}")
        await self.client.hset(self.keys.key("meta"), mapping={"total": total, "indexed": 1})
        for first in range(0, buckets, 1000):
            names = [self.keys.key(f"{CUSTOM_IDS}:{b}") for b in range(first, min(buckets, first + 1000))]
            await self.client.unlink(*names)

    async def spans(self, indices: Sequence[int]) -> list[tuple[int, int]]:
        """(byte offset, length) of each request's line, reading runs of indices in one call."""
        runs = _runs(sorted(set(indices)))
        pipe = self.client.pipeline(transaction=False)
        for first, last in runs:
            pipe.getrange(self.keys.key(OFFSETS), first * SPAN.size, (last + 1) * SPAN.size - 1)
        found: dict[int, tuple[int, int]] = {}
        try:
            blobs = await pipe.execute()
        except redis.exceptions.ResponseError as error:
            raise LedgerCorruptError(OFFSETS, str(error)) from None
        for (first, last), blob in zip(runs, blobs, strict=True):
            if len(blob) != (last - first + 1) * SPAN.size:
                raise LedgerCorruptError(
                    OFFSETS, f"no span recorded for request {first + len(blob) // SPAN.size}"
                )
            for k, (start, length) in enumerate(SPAN.iter_unpack(blob)):
                # The operator indexed no line longer than this: a longer span was written by
                # someone else, and reading it would hold that much in memory.
                if length > constants.MAX_LINE_BYTES:
                    raise LedgerCorruptError(
                        OFFSETS,
                        f"request {first + k} spans {length} bytes, over a line's {constants.MAX_LINE_BYTES}",
                    )
                found[first + k] = (start, length)
        return [found[i] for i in indices]

    # --- work ----------------------------------------------------------------------------------

    async def indexed_total(self) -> int | None:
        """The job's request count once it is indexed; None before (or with no such job)."""
        indexed, total = await self.client.hmget(self.keys.key("meta"), ["indexed", "total"])
        if indexed != b"1" or total is None:
            return None
        return _count("meta.total", total, constants.MAX_REQUESTS_PER_JOB)

    async def lease_seconds(self) -> float:
        """How long a lease lasts without a renewal (fixed when the job was created)."""
        if self._lease_seconds is None:  # fixed at creation: read once
            stored = await self.client.hget(self.keys.key("meta"), "lease_seconds")
            self._lease_seconds = float(stored) if stored else DEFAULT_LEASE_SECONDS
        return self._lease_seconds

    async def claim(self, worker: str, max_count: int, *, idle: bool = False) -> Claim | None:
        """Lease up to `max_count` pending requests (retries first), or None if there are none now.
        An `idle` worker (holding nothing) gets a suspect alone first, if there is one."""
        lease_seconds = await self.lease_seconds()
        lease_id, _, indices, attempts, solo = await self._run(
            "CLAIM", worker, max_count, self._now(), lease_seconds, "1" if idle else "0"
        )
        if not lease_id:
            return None
        return Claim(
            lease_id=int(lease_id),
            indices=[i for (i,) in U32.iter_unpack(indices)],
            failed_attempts=[a for (a,) in U32.iter_unpack(attempts)],
            expires_at=self._local_now() + lease_seconds,  # by this host's clock, for scheduling
            solo=bool(solo),
        )

    async def renew(self, worker: str, lease_id: int) -> bool:
        """Extend a lease by the job's lease time; False if it already expired or is not ours."""
        lease_seconds = await self.lease_seconds()
        return bool(await self._run("RENEW", worker, lease_id, self._now(), lease_seconds))

    async def release(self, worker: str, lease_id: int) -> int:
        """Give a lease back: its unfinished requests are pending again, no attempt counted."""
        return int(await self._run("RELEASE", worker, lease_id))

    async def nack(
        self,
        worker: str,
        lease_id: int,
        indices: Iterable[int],
        *,
        count_attempt: bool = True,
        crashed: bool = False,
    ) -> int:
        """Give some requests of a lease back. Counted (a failed attempt): pending again, or dead
        past max attempts. Not counted (aborted by a shutdown, not the request's fault): pending.
        `crashed` (the engine died with them in it): suspects, each retried alone, nothing counted;
        a request that was alone in a crash for the second time is dead-lettered."""
        how = "crash" if crashed else "1" if count_attempt else "0"
        return int(await self._run("NACK", worker, lease_id, how, *indices))

    async def reap(self) -> int:
        """Return the requests of expired leases to pending, charging nothing (their worker died
        or lost touch); one lost with three leases becomes a suspect. The number reaped."""
        return int(await self._run("REAP", self._now()))

    async def commit(self, segment_id: str, outcomes: Sequence[Outcome], lease_id: int | None = None) -> int:
        """Mark requests done once their segment is stored; returns how many this segment won.

        A request already done (a crash between upload and commit, a late worker) is not won
        again, so its tokens are not counted twice and its record is not merged twice.
        """
        packed = b"".join(
            OUTCOME.pack(
                o.index, o.failed | o.resumed << 1, o.prompt_tokens, o.completion_tokens, o.cached_tokens
            )
            for o in outcomes
        )
        won, state = await self._run("COMMIT", lease_id if lease_id is not None else "", segment_id, packed)
        if won < 0:
            raise LedgerClosedError(f"job is {_text(state) or 'gone'}; results are no longer accepted")
        return int(won)

    async def mark_refused(self, message: str) -> None:
        """Remember, with the job, that the operator no longer acts on it and why: every status
        writer reads it back, so a status written from an older read cannot undo the refusal."""
        await self.client.hset(self.keys.key("meta"), "refused", message)

    async def record_waste(self, tokens: int) -> None:
        """Tokens generated and then thrown away (an aborted attempt), for accounting."""
        if tokens:
            await self.client.hincrby(self.keys.key("counters"), "wasted_tokens", tokens)

    # --- partial generations -------------------------------------------------------------

    async def save_partial(
        self, index: int, text: str, tokens: int, prompt_tokens: int | None = None
    ) -> bool:
        """What an interrupted request generated so far, for the worker that resumes it.

        False when the request is already done (or the ledger closed): nothing is written."""
        return bool(await self.save_partials({index: Partial(text, tokens, prompt_tokens)}))

    async def save_partials(self, partials: dict[int, Partial]) -> int:
        """Several partial outputs in one round trip; those of done requests are dropped.

        Returns how many were written."""
        items: list[str] = []
        for index, p in partials.items():
            items += [
                str(index),
                json.dumps({"text": p.text, "tokens": p.tokens, "prompt_tokens": p.prompt_tokens}),
            ]
        if not items:
            return 0
        return int(await self._run("SAVE_PARTIALS", *items))

    async def drop_partials(self, indices: Sequence[int]) -> None:
        """Forget saved partial outputs: their requests start over when next claimed."""
        if indices:
            await self.client.hdel(self.keys.key("partial"), *[str(i) for i in indices])

    async def load_partials(self, indices: Sequence[int]) -> dict[int, Partial]:
        if not indices:
            return {}
        values = await self.client.hmget(self.keys.key("partial"), [str(i) for i in indices])
        found = {}
        for index, value in zip(indices, values, strict=True):
            if value:
                item = json.loads(value)
                found[index] = Partial(
                    text=item["text"], tokens=int(item["tokens"]), prompt_tokens=item.get("prompt_tokens")
                )
        return found

    async def pending(self) -> int:
        """Requests nobody holds: retries, suspects and never-claimed ones (some may be done)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.llen(self.keys.key("retry"))
        pipe.llen(self.keys.key("suspects"))
        pipe.hmget(self.keys.key("meta"), ["total", "cursor"])
        retries, suspects, (total, cursor) = await pipe.execute()
        return int(retries) + int(suspects) + max(0, int(total or 0) - int(cursor or 0))

    # --- workers ---------------------------------------------------------------------------------

    async def heartbeat(self, worker: str, beat: Heartbeat, ttl: float) -> None:
        """A worker's liveness key; it vanishes `ttl` seconds after the last beat."""
        await self.client.set(self.keys.key(f"worker:{worker}"), beat.model_dump_json(), px=int(ttl * 1000))

    async def clear_heartbeat(self, worker: str) -> None:
        await self.client.unlink(self.keys.key(f"worker:{worker}"))

    async def last_heartbeat(self, worker: str) -> Heartbeat | None:
        """The worker's last beat; None when there is none or it cannot be read (what a worker
        says of itself is advice: nothing the operator decides may fail on it)."""
        try:
            value = await self.client.get(self.keys.key(f"worker:{worker}"))
            if not value or len(value) > MAX_HEARTBEAT_BYTES:
                return None
            return Heartbeat.model_validate_json(value)
        except (redis.exceptions.ResponseError, pydantic.ValidationError):
            return None

    async def request_stop(self, worker: str, mode: StopMode, ttl: float = 600.0) -> None:
        """How `worker` should stop on its next SIGTERM (the operator sets this before deleting it)."""
        await self.client.set(self.keys.key(f"stop:{worker}"), mode.value, px=int(ttl * 1000))

    async def stop_mode(self, worker: str) -> StopMode | None:
        """The mode the operator asked for, if any (an unknown value is ignored: the default applies)."""
        value = await self.client.get(self.keys.key(f"stop:{worker}"))
        try:
            return StopMode(_text(value)) if value else None
        except ValueError:
            return None

    # --- reading back ------------------------------------------------------------------------

    async def progress(self) -> Progress:
        """The job's state and counts (`Progress.corrupt` says what could not be read)."""
        return (await progress_of(self.client, [self]))[0]

    async def segments(self, page: int = 1000) -> AsyncIterator[str]:
        """Committed segment ids, in commit order; LedgerCorruptError on one that is not an id
        a worker makes (`SEGMENT_ID`: a name, never a path into another job's directory)."""
        start = 0
        while True:
            try:
                chunk = await self.client.lrange(self.keys.key("segments"), start, start + page - 1)
            except redis.exceptions.ResponseError as error:
                raise LedgerCorruptError("segments", str(error)) from None
            for item in chunk:
                if not SEGMENT_ID.fullmatch(_bytes(item)):
                    raise LedgerCorruptError("segments", f"{_shown(item)} is not a segment id")
                yield _text(item)
            if len(chunk) < page:
                return
            start += page

    async def segment_won(self, segment_id: str, total: int) -> set[int]:
        """The requests this segment's commit won; LedgerCorruptError when the record is larger
        than any commit of `total` requests makes, or names a request past them."""
        key = self.keys.segment_won(segment_id)
        try:
            size = await self.client.strlen(key)
            if size > total * WON.size or size % WON.size:
                raise LedgerCorruptError(
                    f"segwon:{segment_id}", f"{size} bytes for a job of {total} requests"
                )
            blob = _bytes(await self.client.get(key))
        except redis.exceptions.ResponseError as error:
            raise LedgerCorruptError(f"segwon:{segment_id}", str(error)) from None
        won = {index for (index,) in WON.iter_unpack(blob)}
        if won and max(won) >= total:
            raise LedgerCorruptError(f"segwon:{segment_id}", f"request {max(won)} of a job of {total}")
        return won

    async def dead_letters(self, total: int) -> AsyncIterator[tuple[int, str]]:
        """(request, error code) of each dead-lettered request; LedgerCorruptError on an entry
        that is not a request of this job with a known code."""
        try:
            async for index, code in self.client.hscan_iter(self.keys.key("dead"), count=1000):
                number = _count("dead", index, total - 1)
                if code not in DEAD_CODES:
                    raise LedgerCorruptError(
                        f"dead.{number}", f"{_shown(code)} is not an error code the ledger writes"
                    )
                yield number, _text(code)
        except redis.exceptions.ResponseError as error:
            raise LedgerCorruptError("dead", str(error)) from None

    async def unfinished(self, total: int, batch: int = 10_000) -> AsyncIterator[list[int]]:
        """Requests not done, at most `batch` at a time, reading the done bitmap 64 KiB at a time."""
        done_key = self.keys.key("done")
        bitmap_bytes = (total + 7) // 8
        pending: list[int] = []
        for byte_start in range(0, bitmap_bytes, BITMAP_READ_BYTES):
            chunk = _bytes(
                await self.client.getrange(done_key, byte_start, byte_start + BITMAP_READ_BYTES - 1)
            )
            chunk = chunk.ljust(min(BITMAP_READ_BYTES, bitmap_bytes - byte_start), b"\0")
            for offset, byte in enumerate(chunk):
                if byte == 0xFF:
                    continue
                for bit in range(8):
                    index = (byte_start + offset) * 8 + bit
                    if index < total and not byte & (0x80 >> bit):
                        pending.append(index)
                if len(pending) >= batch:
                    yield pending[:batch]
                    pending = pending[batch:]
        while pending:
            yield pending[:batch]
            pending = pending[batch:]


def _runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted indices as (first, last) runs of consecutive values."""
    runs: list[tuple[int, int]] = []
    for index in indices:
        if runs and index == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], index)
        else:
            runs.append((index, index))
    return runs


def _bytes(value: object) -> bytes:
    """redis-py types replies as bytes or str; this client never decodes, so it is bytes."""
    if isinstance(value, bytes):
        return value
    return value.encode() if isinstance(value, str) else b""


def _text(value: object) -> str:
    return _bytes(value).decode()


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


async def progress_of(client: Redis, ledgers: Sequence["JobLedger"]) -> list[Progress]:
    """Every ledger's progress in one round trip (a pool cycle reads all its jobs'). A job whose
    keys hold what no writer of ours writes gets `Progress.corrupt`; the others are unaffected."""
    if not ledgers:
        return []
    keys = [ledger.keys.key(name) for ledger in ledgers for name in ("meta", "counters", "leases")]
    replies = await client.register_script(lua.PROGRESS_MANY)(
        keys=keys, args=[lua.PROGRESS_MAX_FIELDS, lua.PROGRESS_MAX_BYTES]
    )
    return [
        _progress_from(replies[3 * k], replies[3 * k + 1], replies[3 * k + 2]) for k in range(len(ledgers))
    ]


def _pairs(where: str, flat: object) -> dict[str, bytes]:
    """A script's HGETALL reply (field, value, field, value, ...) as a dictionary; the script
    answers a string instead when the key could not be read (wrong type, too large)."""
    if not isinstance(flat, list):
        raise LedgerCorruptError(where, _text(flat) or "not a hash")
    fields = {}
    for name, value in zip(flat[::2], flat[1::2], strict=True):
        try:
            fields[_bytes(name).decode("ascii")] = _bytes(value)
        except UnicodeDecodeError:
            raise LedgerCorruptError(where, f"a field named {_shown(name)}") from None
    return fields


def _shown(value: object, limit: int = 40) -> str:
    """A tenant-written value, quoted for a message: printable, and short."""
    text = _bytes(value).decode("utf-8", "replace")
    clean = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return repr(clean + ("..." if len(text) > limit else ""))


def _count(where: str, raw: bytes | str, limit: int) -> int:
    """A whole number in [0, limit], or LedgerCorruptError saying where."""
    value = _bytes(raw)
    if not value.isdigit() or len(value) > 20 or int(value) > limit:
        raise LedgerCorruptError(where, f"{_shown(value)} is not a count from 0 to {limit}")
    return int(value)


def _phase(raw: bytes | str, where: str = "meta.state") -> Phase:
    try:
        return Phase(_bytes(raw).decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise LedgerCorruptError(where, f"{_shown(raw)} is not a job state") from None


def _moment(where: str, raw: bytes) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 <= value < 1e11:  # also false for NaN
        raise LedgerCorruptError(where, f"{_shown(raw)} is not a time")
    return value


def _free_text(raw: bytes | None) -> str | None:
    """A report a worker or the operator wrote (printed in conditions): decoded, printable, bounded."""
    if raw is None:
        return None
    text = raw.decode("utf-8", "replace")[:MAX_TEXT_FIELD]
    return "".join(c if c.isprintable() or c == " " else " " for c in text)


def _progress_from(meta_raw: object, counters_raw: object, leases: object) -> Progress:
    try:
        return _read_progress(_pairs("meta", meta_raw), _pairs("counters", counters_raw), leases)
    except LedgerCorruptError as error:
        return Progress(
            state=None, total=0, completed=0, failed=0, dead=0, failed_attempts=0, prompt_tokens=0,
            completion_tokens=0, cached_tokens=0, wasted_tokens=0, leases=0, indexed=False,
            corrupt=str(error),
        )  # fmt: skip


REQUEST_COUNTERS = ("completed", "failed", "dead", "resumed")
TOKEN_COUNTERS = ("failed_attempts", "prompt_tokens", "completion_tokens", "cached_tokens", "wasted_tokens")


def _read_progress(meta: dict[str, bytes], counters_raw: dict[str, bytes], leases: object) -> Progress:
    if not isinstance(leases, int) or leases < 0:
        raise LedgerCorruptError("leases", _text(leases) or "not a sorted set")
    limit = constants.MAX_REQUESTS_PER_JOB
    counters = {
        name: _count(f"counters.{name}", counters_raw.get(name, b"0"), limit) for name in REQUEST_COUNTERS
    }
    counters |= {
        name: _count(f"counters.{name}", counters_raw.get(name, b"0"), MAX_TOKENS) for name in TOKEN_COUNTERS
    }
    total = _count("meta.total", meta.get("total", b"0"), limit)
    if counters["completed"] + counters["failed"] > total and meta.get("indexed") == b"1":
        raise LedgerCorruptError(
            "counters",
            f"{counters['completed']} completed and {counters['failed']} failed of {total} requests",
        )
    return Progress(
        state=_phase(meta["state"]) if "state" in meta else None,
        total=total,
        completed=counters["completed"],
        failed=counters["failed"],
        dead=counters["dead"],
        failed_attempts=counters["failed_attempts"],
        prompt_tokens=counters["prompt_tokens"],
        completion_tokens=counters["completion_tokens"],
        cached_tokens=counters["cached_tokens"],
        wasted_tokens=counters["wasted_tokens"],
        resumed=counters["resumed"],
        refused=_free_text(meta.get("refused")),
        cleaned=meta.get("cleaned") == b"1",
        expiring=meta.get("expiring") == b"1",
        input_changed=_free_text(meta.get("input_changed")),
        leases=leases,
        indexed=meta.get("indexed") == b"1",
        state_times={k[3:]: _moment(f"meta.{k}", v) for k, v in meta.items() if k.startswith("at:")},
    )
