"""The batch worker: claim requests, keep the engine saturated, store results exactly once.

One asyncio loop. Requests are claimed in chunks no larger than the engine can take, sent at
the concurrency the engine's own gauges allow, and their results buffered and flushed as
output segments. Leases are renewed by a heartbeat and released once all their requests are
committed.

SIGTERM stops claiming at once; then
- drain: finish in-flight requests (up to the drain timeout), flush, release, exit;
- yield: save every in-flight request's partial output, abort the calls, flush what is
  done, give every lease back without counting an attempt, exit (in well under 2 s).
The operator can choose the mode per stop (`JobLedger.request_stop`); the flag is the default.
"""

import asyncio
import contextlib
import enum
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from troughfill.api.batchfile import RequestLine, output_record
from troughfill.api.batchinference import Endpoint
from troughfill.ledger import Heartbeat, JobConfig, LedgerClosedError, Outcome, Partial, StopMode
from troughfill.ledger.port import WorkerLedger
from troughfill.results import InputChangedError, ResultWriter, check_input, load_requests
from troughfill.storage import ObjectStore, RecordKind, SegmentRecord, StorageError
from troughfill.worker import calls
from troughfill.worker.concurrency import ConcurrencyPolicy, PaceMeter, next_limit
from troughfill.worker.engine import EngineClient, EngineDeadError, EngineHttpError

log = logging.getLogger("troughfill.worker")


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1
    ENGINE_DIED = 3


@dataclass
class WorkerOptions:
    worker_id: str
    served_model: str | None = None
    """Overrides `body.model`: the template, not the user, chooses the model."""
    max_claim: int = 64
    initial_concurrency: int = 4
    """Few at first: an engine's first step prefills every prompt sent, and on a slow engine a
    large first batch is a first step longer than a short trough (seen: 12 prompts, 15 s on a
    CPU engine). The limit grows by half each second while the engine keeps up."""
    policy: ConcurrencyPolicy = field(default_factory=ConcurrencyPolicy)
    flush_results: int = 64
    flush_seconds: float = 2.0
    checkpoint_seconds: float = 1.0
    """How often the partial output of streamed requests is saved."""
    resume: bool = True
    """Save partial output and resume from it; off, an interrupted request starts over."""
    resume_min_tokens: int = 256
    """Only requests allowed at least this many tokens are streamed and checkpointed."""
    burst: bool = False
    """Exit 0 as soon as the job has no pending work."""
    stop_mode: StopMode = StopMode.YIELD
    drain_timeout: float = 25.0
    engine_ready_timeout: float = 600.0
    poll_seconds: float = 0.5


@dataclass
class Item:
    index: int
    lease_id: int
    request: RequestLine
    saved: calls.Progress | None
    streamed: bool = False
    """Streamed and checkpointed: a yield does not lose what it generated."""


@dataclass
class Finished:
    item: Item
    record: SegmentRecord | None = None
    outcome: Outcome | None = None
    retry: bool = False
    count_attempt: bool = True
    crashed: bool = False
    """The engine went away under it: the crash, not the request, decides what happens."""
    start_over: bool = False
    """Its saved partial output could not be continued faithfully: dropped, redone from the start."""


@dataclass
class Stats:
    results: int = 0
    errors: int = 0
    retries: int = 0
    resumed: int = 0
    wasted_tokens: int = 0


class Worker:
    def __init__(
        self, ledger: WorkerLedger, store: ObjectStore, engine: EngineClient, options: WorkerOptions
    ) -> None:
        self.ledger = ledger
        self.store = store
        self.engine = engine
        self.options = options
        self.limit = options.initial_concurrency
        self.queue: list[Item] = []
        self.in_flight: dict[asyncio.Task[Finished], Item] = {}
        self.progress: dict[int, calls.Progress] = {}
        """Streamed requests in flight: what each has generated so far."""
        self.checkpointed: dict[int, int] = {}
        """Tokens of each in-flight request already saved as partial output."""
        self.outstanding: dict[int, set[int]] = {}
        """lease id -> requests of it not yet committed or given back."""
        self.stats = Stats()
        self.stopping = asyncio.Event()
        self.engine_dead = False
        self.crashed: list[Item] = []
        """Requests the engine failed under while it looked dead: held until the engine watch
        decides (dead: suspects, each retried alone; alive after all: back, nothing counted)."""
        self.solo_lease: int | None = None
        """A lease of one suspect: nothing else is claimed while it runs."""
        self.job_closed = False
        self.writer: ResultWriter | None = None
        self.input: JobConfig | None = None
        self._claim_after = 0.0
        """No claims before this (monotonic): the store could not be read just now."""
        self.endpoint = Endpoint.CHAT_COMPLETIONS
        self._last_flush = time.monotonic()
        self.pace = PaceMeter()
        """The engine's throughput and the requests' length, for the time-to-result bound."""

    # --- lifecycle -------------------------------------------------------------------------

    def request_stop(self) -> None:
        log.info("stop requested with %d requests in flight", len(self.in_flight))
        self.stopping.set()

    async def run(self) -> ExitCode:
        config = await self.ledger.config()
        try:
            await check_input(self.store, config.input_url, config.input_identity)
        except InputChangedError as error:
            log.error("%s", error)
            await self.ledger.report_input_changed(str(error))  # the operator ends the job
            return ExitCode.OK  # nothing of this worker's failed: the job did
        self.input = config
        self.endpoint = config.endpoint
        self.writer = ResultWriter(self.ledger, self.store, config.output_url, writer=self.options.worker_id)
        if not await self._engine_ready():
            return ExitCode.OK if self.stopping.is_set() else ExitCode.ENGINE_DIED
        lease_seconds = config.lease_seconds
        background = [
            asyncio.create_task(
                supervised("heartbeat", lambda: self._heartbeat(lease_seconds)), name="heartbeat"
            ),
            asyncio.create_task(supervised("tuning", self._tune), name="tuning"),
            asyncio.create_task(supervised("engine watch", self._watch_engine), name="engine watch"),
        ]
        if self.options.resume:
            background.append(
                asyncio.create_task(supervised("checkpoints", self._checkpoint), name="checkpoints")
            )
        try:
            await self._loop()
            mode = await self._stop_mode()
            log.info("stopping: %s", mode.value)
            if self.engine_dead:
                await self._abandon_in_flight(crashed=True)
            elif mode == StopMode.DRAIN:
                await self._drain()
            else:
                await self._yield()
            await self._flush(force=True)
            await self._give_back_everything()
        except LedgerClosedError:
            log.info("job no longer accepts results; stopping")
            self.job_closed = True
            await self._abandon_in_flight(crashed=False)
        except InputChangedError as error:
            log.error("%s", error)
            await self.ledger.report_input_changed(str(error))
            self.job_closed = True
            await self._abandon_in_flight(crashed=False)
        finally:
            for task in background:
                task.cancel()
            # A cancel delivered while a task awaits the ledger can be lost in the client library
            # (see _checkpoint): waiting for the tasks without a bound hung the worker's exit.
            _, stuck = await asyncio.wait(background, timeout=BACKGROUND_STOP_SECONDS)
            if stuck:
                names = ", ".join(sorted(task.get_name() for task in stuck))
                log.warning("background tasks did not stop within %.0fs: %s", BACKGROUND_STOP_SECONDS, names)
            await self.ledger.clear_heartbeat(self.options.worker_id)
        await self.ledger.record_waste(self.stats.wasted_tokens)
        return ExitCode.ENGINE_DIED if self.engine_dead else ExitCode.OK

    async def _engine_ready(self) -> bool:
        """Wait for the engine; False when it died first or the worker was told to stop first
        (a worker stopped while its engine loads holds nothing worth waiting for)."""
        ready = asyncio.create_task(self.engine.wait_ready(within=self.options.engine_ready_timeout))
        stopped = asyncio.create_task(self.stopping.wait())
        await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not ready.done():
            ready.cancel()
            await asyncio.gather(ready, return_exceptions=True)
            log.info("stopped before the engine was ready")
            return False
        try:
            ready.result()
        except EngineDeadError as error:
            log.error("engine never became ready: %s", error)
            return False
        return True

    async def _stop_mode(self) -> StopMode:
        return await self.ledger.stop_mode(self.options.worker_id) or self.options.stop_mode

    # --- the loop --------------------------------------------------------------------------

    async def _loop(self) -> None:
        while not self.stopping.is_set() and not self.engine_dead:
            await self._fill()
            if not self.in_flight and not self.queue:
                if self.writer and len(self.writer):
                    await self._flush(force=True)
                    continue  # stored (or dropped, if the store refused): claim again at once
                if self.options.burst and await self._job_has_no_pending_work():
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), self.options.poll_seconds)
                continue
            await self._collect(wait=0.25)
            if not self.stopping.is_set():
                await self._flush()

    async def _job_has_no_pending_work(self) -> bool:
        """Nothing to claim now and no lease anywhere that could return work later."""
        if self.outstanding or await self.ledger.pending():
            return False
        await self.ledger.reap()
        progress = await self.ledger.progress()
        return progress.all_done or (progress.leases == 0 and not await self.ledger.pending())

    async def _fill(self) -> None:
        # Keep a local queue of about half the limit, refilled when it runs low: claims come in
        # batches (each costs a round trip the engine's free slots would wait on), and no worker
        # hoards more than it can start soon.
        # What is queued goes to the engine before the claim's round trips, not after them.
        self._start_queued()
        if len(self.queue) < max(1, self.limit // 4) and not self.stopping.is_set():
            wanted = self.limit - len(self.in_flight) + self.limit // 2 - len(self.queue)
            if wanted > 0:
                await self._claim(min(wanted, self.options.max_claim))
                self._start_queued()

    def _start_queued(self) -> None:
        while self.queue and len(self.in_flight) < self.limit and not self.stopping.is_set():
            item = self.queue.pop(0)
            self.in_flight[asyncio.create_task(self._process(item))] = item

    async def _claim(self, count: int) -> None:
        if time.monotonic() < self._claim_after or self.solo_lease in self.outstanding:
            return
        idle = not (self.queue or self.in_flight or self.outstanding or self.crashed)
        claim = await self.ledger.claim(self.options.worker_id, count, idle=idle)
        if claim is None:
            return
        self.outstanding[claim.lease_id] = set(claim.indices)
        if claim.solo:
            log.info("request %s runs alone: it was in the engine when it died", claim.indices[0])
            self.solo_lease = claim.lease_id
        try:
            requests = await load_requests(self.ledger, self.store, claim.indices)
        except StorageError as error:
            if not error.transient:
                raise
            # The input cannot be read just now: the lease goes back (no attempt) and claiming
            # pauses, so an object store that is away costs time, not attempts.
            log.warning("input unreadable for now (%s); claiming again in %.0fs", error, STORE_PAUSE_SECONDS)
            del self.outstanding[claim.lease_id]
            await self.ledger.release(self.options.worker_id, claim.lease_id)
            self._claim_after = time.monotonic() + STORE_PAUSE_SECONDS
            return
        except ValueError:  # pydantic's ValidationError too: indexed lines no longer parse
            assert self.input is not None
            await check_input(self.store, self.input.input_url, self.input.input_identity)
            raise
        partials = await self.ledger.load_partials(claim.indices) if self.options.resume else {}
        claimed = []
        for index, request in zip(claim.indices, requests, strict=True):
            partial = partials.get(index)
            saved = (
                calls.Progress(
                    text=partial.text, completion_tokens=partial.tokens, prompt_tokens=partial.prompt_tokens
                )
                if partial and partial.text
                else None
            )
            claimed.append(Item(index, claim.lease_id, request, saved))
        # Shortest first within a claim (resumed requests have the least left): in a short
        # window the most requests become results. Never ahead of what was claimed before, so
        # a long request waits one claim at most.
        claimed.sort(key=shortest_first)
        self.queue.extend(claimed)

    async def _collect(self, wait: float) -> None:
        if not self.in_flight:
            return
        # A stop request wakes the loop at once: yielding must not wait for a request to finish.
        stop = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait([*self.in_flight, stop], timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        for task in [task for task in self.in_flight if task.done()]:
            item = self.in_flight.pop(task)
            self.progress.pop(item.index, None)
            self.checkpointed.pop(item.index, None)
            if task.cancelled():
                continue
            error = task.exception()
            if error is not None:
                log.warning("request %s failed in the worker: %r", item.index, error)
                await self._give_back([item], count_attempt=True)
                continue
            await self._settle(task.result())

    async def _settle(self, finished: Finished) -> None:
        if finished.crashed:
            self.crashed.append(finished.item)
            return
        if finished.start_over:
            await self.ledger.drop_partials([finished.item.index])
        if finished.retry:
            self.stats.retries += 1
            await self._give_back([finished.item], count_attempt=finished.count_attempt)
            return
        if finished.record is None or finished.outcome is None or self.writer is None:
            raise RuntimeError(f"request {finished.item.index} finished without a result")
        self.writer.add(finished.record, finished.outcome)
        if finished.record.kind == RecordKind.OUTPUT:
            self.stats.results += 1
            if not finished.item.streamed:
                self.pace.result(finished.outcome.completion_tokens)
        else:
            self.stats.errors += 1

    # --- one request -------------------------------------------------------------------------

    async def _process(self, item: Item) -> Finished:
        body = item.request.body
        if calls.budget_spent(body, item.saved) and item.saved is not None:
            item.saved.finish_reason = item.saved.finish_reason or "length"
            return self._result(
                item, calls.assembled_body(self.endpoint, item.saved), item.saved.stream_id or ""
            )
        min_tokens = self.options.resume_min_tokens if self.options.resume else 1 << 62
        request, streamed = calls.engine_body(
            self.endpoint, body, self.options.served_model, item.saved, min_tokens
        )
        item.streamed = streamed
        try:
            if streamed:
                return await self._stream(item, request)
            payload, upstream = await self.engine.call(self.endpoint.value, request)
        except EngineHttpError as failure:
            if failure.status in {408, 429} or failure.status >= 500:
                return Finished(item, retry=True)
            if item.saved is not None:
                # The continuation was refused (its saved text re-tokenized past the engine's
                # context, say), not necessarily the request: it gets a fresh start.
                return self._start_over(
                    item, item.saved.completion_tokens, f"engine answered {failure.status}"
                )
            return self._http_error(item, failure)
        except (aiohttp.ClientError, OSError, TimeoutError, asyncio.IncompleteReadError) as error:
            log.warning("request %s: engine connection failed: %r", item.index, error)
            healthy = await self.engine.healthy()
            return Finished(item, retry=True, count_attempt=healthy, crashed=not healthy)
        if calls.ABORTED in calls.finish_reasons(payload):
            return Finished(item, retry=True, count_attempt=False)
        return self._result(item, payload, upstream)

    async def _stream(self, item: Item, request: dict[str, Any]) -> Finished:
        progress = calls.Progress(
            text=item.saved.text if item.saved else "",
            completion_tokens=item.saved.completion_tokens if item.saved else 0,
            prompt_tokens=item.saved.prompt_tokens if item.saved else None,
        )
        if item.saved:
            self.stats.resumed += 1
        self.progress[item.index] = progress
        self.checkpointed[item.index] = progress.completion_tokens
        # No awaits but the stream's own in this loop: a yield cancels this task, and
        # checkpoints are written by `_checkpoint` from `self.progress` instead.
        async with self.engine.stream(self.endpoint.value, request) as reply:
            async for line in reply.content:
                chunk = calls.parse_sse_line(line)
                if chunk is not None:
                    calls.apply_chunk(progress, chunk, item.saved)
        if progress.finish_reason in (None, calls.ABORTED):
            # Stream ended without an answer (the engine stopped): not a result.
            self._waste(item, progress, self.checkpointed.get(item.index, 0))
            crashed = progress.finish_reason is None and not await self.engine.healthy()
            return Finished(item, retry=True, count_attempt=False, crashed=crashed)
        if calls.cut_short(item.request.body, item.saved, progress):
            return self._start_over(item, progress.completion_tokens, "the engine's context ran out early")
        return self._result(item, calls.assembled_body(self.endpoint, progress), progress.stream_id or "")

    def _start_over(self, item: Item, wasted: int, why: str) -> Finished:
        """A continuation that would not give the answer an uninterrupted call gives: its saved
        output is dropped (by `_settle`, outside this request's task) and the request redone
        from the start, no attempt charged. Everything generated for it so far is waste."""
        log.warning("request %s: resuming it failed (%s); redoing it from the start", item.index, why)
        self.stats.wasted_tokens += wasted
        return Finished(item, retry=True, count_attempt=False, start_over=True)

    def _result(self, item: Item, body: dict[str, Any], upstream: str) -> Finished:
        prompt, completion, cached = calls.usage_of(body)
        record = output_record(
            self.ledger.job_token,
            item.index,
            item.request.custom_id,
            status_code=200,
            body=body,
            upstream_id=upstream,
        )
        return Finished(
            item,
            record=SegmentRecord(item.index, RecordKind.OUTPUT, record),
            outcome=Outcome(
                item.index,
                prompt_tokens=prompt,
                completion_tokens=completion,
                cached_tokens=cached,
                resumed=item.saved is not None,
            ),
        )

    def _http_error(self, item: Item, failure: EngineHttpError) -> Finished:
        record = output_record(
            self.ledger.job_token,
            item.index,
            item.request.custom_id,
            status_code=failure.status,
            body=failure.body,
            upstream_id="",
        )
        return Finished(
            item,
            record=SegmentRecord(item.index, RecordKind.ERROR, record),
            outcome=Outcome(item.index, failed=True),
        )

    def _waste(self, item: Item, progress: calls.Progress, checkpointed: int) -> None:
        """Tokens generated in this attempt that no later attempt will reuse."""
        reusable = (
            checkpointed if self.options.resume else (item.saved.completion_tokens if item.saved else 0)
        )
        self.stats.wasted_tokens += max(0, progress.completion_tokens - reusable)

    # --- results and leases ------------------------------------------------------------------

    async def _flush(self, force: bool = False) -> None:
        writer = self.writer
        if writer is None or not len(writer):
            return
        due = (
            len(writer) >= self.options.flush_results
            or time.monotonic() - self._last_flush >= self.options.flush_seconds
        )
        if not (force or due):
            return
        committed = [record.index for record in writer.records]
        try:
            await writer.flush()
        except StorageError as error:
            self._last_flush = time.monotonic()  # the next try comes a flush interval later
            if force or not error.transient:
                # Stopping (or a store that refuses for good): these results are not stored and
                # their leases go back without an attempt, so they are redone, never duplicated.
                log.error("%d results not stored (%s); their requests will be redone", len(writer), error)
                writer.records.clear()
                writer.outcomes.clear()
                return
            log.warning("%d results wait for the store (%s); their leases are kept", len(writer), error)
            return
        self._last_flush = time.monotonic()
        await self._forget(committed)

    async def _forget(self, indices: list[int]) -> None:
        """Requests that are settled; leases with nothing left are released."""
        wanted = set(indices)
        for lease_id in list(self.outstanding):
            remaining = self.outstanding[lease_id]
            remaining -= wanted
            if not remaining:
                del self.outstanding[lease_id]
                await self.ledger.release(self.options.worker_id, lease_id)

    async def _give_back(self, items: list[Item], *, count_attempt: bool, crashed: bool = False) -> None:
        by_lease: dict[int, list[int]] = {}
        for item in items:
            by_lease.setdefault(item.lease_id, []).append(item.index)
        for lease_id, indices in by_lease.items():
            await self.ledger.nack(
                self.options.worker_id, lease_id, indices, count_attempt=count_attempt, crashed=crashed
            )
        await self._forget([item.index for item in items])

    async def _give_back_everything(self) -> None:
        """Release every lease still held: its unfinished requests go back without an attempt."""
        self.queue.clear()
        for lease_id in list(self.outstanding):
            del self.outstanding[lease_id]
            await self.ledger.release(self.options.worker_id, lease_id)

    # --- stopping --------------------------------------------------------------------------

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.options.drain_timeout
        while self.in_flight and time.monotonic() < deadline and not self.engine_dead:
            await self._collect(wait=min(0.25, max(0.0, deadline - time.monotonic())))
            await self._flush()
        if self.in_flight:
            log.warning("drain timeout with %d requests in flight; yielding them", len(self.in_flight))
            await self._yield()

    async def _yield(self) -> None:
        """Checkpoint and abort everything in flight; done results are kept, nothing counts as an attempt."""
        interrupted = list(self.in_flight.items())
        for task, _ in interrupted:
            task.cancel()
        # Bounded: what matters is in self.progress; a task slow to die must not hold up the yield.
        if interrupted:
            await asyncio.wait([task for task, _ in interrupted], timeout=0.5)
        saves: dict[int, calls.Progress] = {}
        for task, item in interrupted:
            self.in_flight.pop(task, None)
            if task.done() and not task.cancelled() and task.exception() is None:
                await self._settle(task.result())  # finished just before the cancel
                continue
            progress = self.progress.pop(item.index, None)
            if progress is None:
                continue
            if self.options.resume and progress.text:
                saves[item.index] = progress
            else:
                self._waste(item, progress, 0)
        if saves:
            await self._save_partials(saves)
        log.info(
            "yielded: %d requests were in flight, %d partial outputs saved", len(interrupted), len(saves)
        )

    async def _abandon_in_flight(self, *, crashed: bool) -> None:
        """The engine died (or the job closed): in-flight requests are not results. After a
        crash they are suspects (the ledger retries each alone and charges no attempt), since
        any one of them may have killed the engine; requests only queued go back as they were."""
        interrupted = [*self.in_flight.values(), *self.crashed]
        for task in list(self.in_flight):
            task.cancel()
        if self.in_flight:
            await asyncio.wait(list(self.in_flight), timeout=0.5)
        self.in_flight.clear()
        self.crashed.clear()
        if not self.job_closed:
            with contextlib.suppress(LedgerClosedError):
                await self._flush(force=True)
            await self._give_back(interrupted, count_attempt=False, crashed=crashed)
            await self._give_back_everything()

    # --- background --------------------------------------------------------------------------

    def unsaved_tokens(self) -> int:
        """Tokens streamed requests in flight generated since their last checkpoint: what
        killing this worker now would throw away (the operator's victim order reads it)."""
        return sum(
            max(0, progress.completion_tokens - self.checkpointed.get(index, 0))
            for index, progress in self.progress.items()
        )

    async def _heartbeat(self, lease_seconds: float) -> None:
        interval = max(0.5, lease_seconds / 3)
        while True:
            for lease_id in list(self.outstanding):
                await self.ledger.renew(self.options.worker_id, lease_id)
            beat = Heartbeat(
                pid=os.getpid(),
                at=time.time(),
                in_flight=len(self.in_flight),
                unsaved_tokens=self.unsaved_tokens(),
                limit=self.limit,
                engine_pid=self.engine.process.process.pid if self.engine.process else None,
                engine_url=self.engine.base_url,
                engine_alive=not self.engine_dead,
                results=self.stats.results,
            )
            await self.ledger.heartbeat(self.options.worker_id, beat, ttl=interval * 3)
            await asyncio.sleep(interval)

    async def _checkpoint(self) -> None:
        """Save the partial output of streamed requests in flight, all in one round trip.

        Kept out of the request tasks on purpose: cancelling a task while it awaits Redis can
        be lost in the client library (seen with redis-py 8.1), and a yield relies on cancel.
        """
        while True:
            await asyncio.sleep(self.options.checkpoint_seconds)
            due = {
                index: progress
                for index, progress in list(self.progress.items())
                # Tokens that decoded to no text yet cannot be continued from.
                if progress.text
                and progress.finish_reason is None
                and progress.completion_tokens > self.checkpointed.get(index, 0)
            }
            if due:
                await self._save_partials(due)

    async def _save_partials(self, partials: dict[int, calls.Progress]) -> None:
        await self.ledger.save_partials(
            {i: Partial(p.text, p.completion_tokens, p.prompt_tokens) for i, p in partials.items()}
        )
        for index, progress in partials.items():
            self.checkpointed[index] = progress.completion_tokens

    async def _tune(self) -> None:
        policy = self.options.policy
        if policy.minimum >= policy.maximum:
            return  # a fixed limit: reading the engine's load (a metrics page it renders) buys nothing
        while True:
            await asyncio.sleep(1.0)
            with contextlib.suppress(OSError, TimeoutError, ValueError):
                load = await self.engine.load()
                self.pace.observe(load.generated_tokens, time.monotonic())
                budgets = [  # of the requests a yield would lose
                    budget
                    for item in self.in_flight.values()
                    if not item.streamed
                    and (budget := calls.remaining_budget(item.request.body, item.saved)) is not None
                ]
                pace = self.pace.pace(budgets)
                limit = next_limit(self.limit, load, len(self.in_flight), self.options.policy, pace)
                if limit != self.limit:
                    log.debug("in-flight limit %d -> %d (%s, %s)", self.limit, limit, load, pace)
                self.limit = limit

    async def _watch_engine(self) -> None:
        failures = 0
        while True:
            await asyncio.sleep(1.0)
            healthy = await self.engine.healthy()
            failures = 0 if healthy else failures + 1
            if healthy and self.crashed:  # it only looked dead: nothing to suspect anyone of
                held, self.crashed = self.crashed, []
                await self._give_back(held, count_attempt=False)
            if not self.engine.process_alive() or failures >= 3:
                log.error("engine is gone; stopping without marking in-flight requests done")
                self.engine_dead = True
                self.stopping.set()
                return


def shortest_first(item: Item) -> tuple[int, int]:
    """Sort key: the fewest tokens left to generate first; no budget last, in input order."""
    budget = calls.remaining_budget(item.request.body, item.saved)
    return (budget if budget is not None else 1 << 62, item.index)


BACKGROUND_STOP_SECONDS = 5.0
"""How long a stopping worker waits for its background tasks (heartbeat, checkpoints) to end."""
SUPERVISOR_BACKOFF_SECONDS = (0.5, 1.0, 2.0, 5.0)
STORE_PAUSE_SECONDS = 5.0
"""How long a worker waits before claiming again when the input could not be read."""


async def supervised(name: str, task: Callable[[], Awaitable[None]]) -> None:
    """Run a worker's background task; if it fails (the ledger away longer than the client's
    reconnects, say), log it and run it again after a back-off, so a heartbeat or checkpoint loop
    never dies quietly while the worker carries on without it."""
    failures = 0
    while True:
        try:
            await task()
            return
        except asyncio.CancelledError:
            raise
        except Exception as error:
            delay = SUPERVISOR_BACKOFF_SECONDS[min(failures, len(SUPERVISOR_BACKOFF_SECONDS) - 1)]
            failures += 1
            log.warning("%s failed (%r); again in %.1fs", name, error, delay)
            await asyncio.sleep(delay)


def install_signal_handlers(worker: Worker) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.request_stop)
