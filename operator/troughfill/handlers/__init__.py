"""Kopf handlers: thin. They look objects up, call troughfill.controller and write what it returns.

Run with `troughfill operator` or `kopf run -m troughfill.handlers`. The only module that
imports kopf. Kopf's own annotations and the finalizer use troughfill's names
(constants.ANNOTATION_PREFIX, constants.FINALIZER), so another Kopf operator on the same
cluster never reads this one's state.

Errors the Kopf way: an object that cannot be parsed raises kopf.PermanentError (Kopf logs it,
posts it as an Event and does not retry); Redis or the Kubernetes API being unavailable raises
kopf.TemporaryError with a delay (Kopf retries). Each decision is logged through Kopf's
per-object logger (Events only from warnings up: settings.posting.level).
"""

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

import kopf
import pydantic
import redis.exceptions
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from troughfill import constants, metrics
from troughfill.api.admission import Admission, admit
from troughfill.api.batchinference import BatchInference
from troughfill.api.batchpool import BatchPool
from troughfill.api.conditions import Reason
from troughfill.api.modeltemplate import ModelTemplate
from troughfill.api.resource import ObjectMeta
from troughfill.collection import FullCollections
from troughfill.config import Settings
from troughfill.controller import jobs
from troughfill.controller.pools import Cycle, PoolController, pool_status
from troughfill.controller.stores import GrantSecretMissingError, JobStores
from troughfill.kube.adapter import KubeCluster, WatchedCluster, api_client
from troughfill.kube.workerpod import WorkerEnvironment
from troughfill.ledger import TERMINAL, JobKeys, JobLedger, StopMode, connect
from troughfill.results import MergeError
from troughfill.signals import PrometheusSignals
from troughfill.storage import ObjectStore, StorageError

INTERVAL = Settings().reconcile_interval_seconds
"""Read at import (Kopf's decorators need it then); everything else is read at startup."""
TERMINAL_PHASES = frozenset(phase.value for phase in TERMINAL)
JOBS = (constants.API_GROUP, constants.API_VERSION, BatchInference.crd.plural)
POOLS = (constants.API_GROUP, constants.API_VERSION, BatchPool.crd.plural)
TEMPLATES = (constants.API_GROUP, constants.API_VERSION, ModelTemplate.crd.plural)
TEMPLATE_RECHECK_SECONDS = 30.0
"""How often a template's Ready condition is re-checked (its pool may come or go)."""
Parsed = TypeVar("Parsed", bound=pydantic.BaseModel)
RETRY_SECONDS = 5.0
"""How long Kopf waits before retrying a handler that met an unavailable Redis or API server."""
SLOW_CYCLE_SECONDS = 0.2
"""A pool cycle slower than this logs how long each of its phases took."""
REFRESH_BACKOFF_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0)
"""Waits after a job refresh failed unexpectedly, growing with each failure in a row."""
MAX_DELETE_ATTEMPTS = 8
"""Tries of a job's deletion before its cleanup is given up (about 5 minutes with back-off)."""


class QuietTimers(logging.Filter):
    """Kopf logs every successful handler run at INFO; for timers that is a line per job per
    tick (500 a second with a thousand jobs) saying nothing. Failures still log."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (
            record.levelno == logging.INFO
            and message.startswith("Timer ")
            and message.endswith(" succeeded.")
        )


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = constants.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=constants.ANNOTATION_PREFIX
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=constants.ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    # A replica that died without saying so blocks the others this long (a clean stop: not at all).
    settings.peering.lifetime = 15
    settings.posting.level = logging.WARNING  # Kopf's own log lines become Events only from warnings up
    objects = logging.getLogger("kopf.objects")
    if not any(isinstance(f, QuietTimers) for f in objects.filters):
        objects.addFilter(QuietTimers())
    api = api_client()
    memo.settings = own = Settings()
    if own.metrics_port:
        metrics.serve(own.metrics_port)
    memo.cluster = WatchedCluster(api).start() if own.watch_cache else KubeCluster(api)
    memo.redis = connect(own)
    memo.stores = JobStores(memo.cluster, own)
    memo.quiet = jobs.QuietJobs()
    memo.admitting = collections.defaultdict(asyncio.Lock)
    memo.pools = PoolController(
        memo.cluster,
        PrometheusSignals(own.prometheus_url, own.prometheus_timeout_seconds),
        memo.redis,
        WorkerEnvironment(
            ledger_url=own.worker_ledger_url,  # workers reach the ledger only through its service
            s3_endpoint_url=own.s3_endpoint_url,
            s3_addressing_style=own.s3_addressing_style,
            worker_command=own.worker_command,
        ),
        memo.stores,
    )
    # Python's full collections run between pool cycles, not inside them (troughfill.collection).
    memo.collections = FullCollections(constants.FULL_COLLECTION_SECONDS, metrics.FULL_COLLECTION.observe)
    memo.collections.take_over()
    memo.collector = asyncio.create_task(memo.collections.run(), name="full collections")


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    if "collector" in memo:
        memo.collector.cancel()
        memo.collections.give_back()
    if isinstance(memo.get("cluster"), WatchedCluster):
        memo.cluster.stop()
    if "redis" in memo:
        await memo.redis.aclose()


# --- shared -------------------------------------------------------------------------------------


@contextlib.contextmanager
def transient(what: str, delay: float = RETRY_SECONDS) -> Iterator[None]:
    """Redis or the API server unavailable: kopf.TemporaryError, so Kopf retries after a delay
    (an API refusal other than overload is not transient and propagates)."""
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
        metrics.LEDGER_UNAVAILABLE.inc()
        raise kopf.TemporaryError(f"{what}: Redis unavailable: {error}", delay=delay) from error
    except urllib3.exceptions.HTTPError as error:
        raise kopf.TemporaryError(f"{what}: API server unreachable: {error}", delay=delay) from error
    except ApiException as error:
        if error.status in {0, 429} or error.status >= 500:
            raise kopf.TemporaryError(
                f"{what}: API server answered {error.status} {error.reason}", delay=delay
            ) from error
        raise


def write_status(
    patch: kopf.Patch, body: kopf.Body, status: pydantic.BaseModel, *, volatile: frozenset[str] = frozenset()
) -> bool:
    """Patch the status where it differs from the object's (fields in `volatile` alone do not
    warrant a write). True when something is written."""
    new = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    old = dict(body.get("status", {}))
    if {k: v for k, v in new.items() if k not in volatile} == {
        k: v for k, v in old.items() if k not in volatile
    }:
        return False
    patch.status.update(new)
    return True


def _post(body: Any, reason: Reason, message: str, *, warning: bool = False) -> None:
    """An Event about the object (`body`: a kopf.Body, or an object as the API returned it)."""
    kopf.event(body, type="Warning" if warning else "Normal", reason=reason.value, message=message[:1000])


def _write(patch: kopf.Patch, body: kopf.Body, update: jobs.StatusUpdate, logger: kopf.Logger) -> None:
    """Write the status and post the Events; a retry it asks for is a kopf.TemporaryError (Kopf
    applies the patch all the same, so the Degraded condition is seen while it waits)."""
    if write_status(patch, body, update.status) and update.status.phase != body.get("status", {}).get(
        "phase"
    ):
        logger.info("phase %s (%s)", update.status.phase, update.status.progress)
    for event in update.events:  # posted whatever settings.posting.level filters from the logs
        _post(body, event.reason, event.message, warning=event.warning)
        (logger.warning if event.warning else logger.info)("%s: %s", event.reason.value, event.message)
    if update.retry_in is not None:
        raise kopf.TemporaryError("retrying after a failure that may pass", delay=update.retry_in)


def _degraded(patch: kopf.Patch, body: kopf.Body, job: BatchInference, error: kopf.TemporaryError) -> None:
    """Redis (or the API server) is away: say so on the job while Kopf retries."""
    if isinstance(error.__cause__, redis.exceptions.RedisError):
        write_status(patch, body, jobs.ledger_unavailable(job, str(error), jobs.now_utc()))


def parse(kind: type[Parsed], body: Mapping[str, Any]) -> Parsed:
    """The object as its model; one that the model refuses is a permanent error (Kopf logs it,
    posts it as an Event and does not retry the handler)."""
    try:
        return kind.model_validate(dict(body))
    except pydantic.ValidationError as error:
        raise kopf.PermanentError(f"{Reason.INVALID_SPEC.value}: {_problems(error)}") from error


def _problems(error: pydantic.ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in problem['loc']) or '(object)'}: {problem['msg']}"
        for problem in error.errors()
    )[:1000]


# --- BatchInference -----------------------------------------------------------------------------


@kopf.on.create(*JOBS)
@kopf.on.resume(*JOBS)
async def start_job(
    body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    try:
        job = parse(BatchInference, body)
    except kopf.PermanentError:
        if (body.get("status") or {}).get("phase") != "failed":
            patch.status["phase"] = "failed"  # the handler's patch is applied even though it fails
        raise
    if job.status and job.status.phase in TERMINAL:
        return
    with transient("starting the job"):
        admission = await _admit(memo, job)
        logger.info("admission: %s (%s)", admission.reason.value, admission.message)
        try:
            store = await asyncio.to_thread(memo.stores.for_admission, admission)
        except GrantSecretMissingError as error:
            admission = Admission(False, Reason.STORAGE_NOT_GRANTED, str(error))
            store = None
        # One job of a namespace is counted and indexed at a time: two of its jobs starting at
        # once would each see the other's requests uncounted and pass the cap together.
        async with memo.admitting[job.metadata.ns]:
            unfinished = 0
            if admission.allowed and admission.max_requests is not None:  # the namespace's cap counts them
                listed = await asyncio.to_thread(memo.cluster.jobs)
                unfinished = await jobs.namespace_unfinished(memo.redis, listed, job)
            update = await jobs.start(
                job,
                admission,
                jobs.ledger_for(job, memo.redis),
                store,
                jobs.now_utc(),
                namespace_unfinished=unfinished,
            )
    _write(patch, body, update, logger)


async def _admit(memo: kopf.Memo, job: BatchInference) -> Admission:
    """The job admitted against its template and pool as they are now."""
    template = await asyncio.to_thread(memo.cluster.template, job.spec.template_ref)
    pool = await asyncio.to_thread(memo.cluster.pool, template.spec.pool_ref) if template else None
    return admit(job, template, pool)


async def _store(memo: kopf.Memo, job: BatchInference, admission: Admission | None) -> ObjectStore | None:
    """The job's object store, with the credentials of the grant that admits it now (None: none
    does, or its Secret is missing: nothing of the job's storage is touched)."""
    if admission is None:
        admission = await _admit(memo, job)
    try:
        store: ObjectStore | None = await asyncio.to_thread(memo.stores.for_admission, admission)
    except GrantSecretMissingError:
        return None
    return store


@kopf.daemon(*JOBS, initial_delay=INTERVAL, cancellation_backoff=2 * INTERVAL, cancellation_timeout=10.0)
async def refresh_job(
    stopped: kopf.DaemonStopped, body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    """Each job's status, refreshed every cycle interval until the job ends (`reconcile_job`).

    A daemon with a plain sleep, not a kopf.timer: a timer's tick runs Kopf's handler machinery
    and an `asyncio.wait_for` per object, which with a thousand quiet jobs took most of a CPU
    (profiled) and so the pool cycles' latency, for ticks that find nothing changed. `body` is
    Kopf's live view of the object; the status is merged into its subresource here."""
    failures = 0
    while not stopped:
        if (body.get("status") or {}).get("phase") in TERMINAL_PHASES:
            return  # ended: nothing will change it again
        if _refresh_inputs(body, memo)[3]:
            await asyncio.sleep(INTERVAL)
            continue
        patch = kopf.Patch()
        delay = INTERVAL
        try:
            await reconcile_job(body=body, patch=patch, memo=memo, logger=logger)
            failures = 0
        except kopf.TemporaryError as error:
            logger.error("refreshing the status failed temporarily: %s", error)
            delay = error.delay if error.delay is not None else RETRY_SECONDS
        except kopf.PermanentError as error:
            logger.error("refreshing the status failed: %s", error)
            delay = REFRESH_BACKOFF_SECONDS[-1]  # until the object is edited into shape
        except Exception:
            logger.exception("refreshing the status failed")
            delay = REFRESH_BACKOFF_SECONDS[min(failures, len(REFRESH_BACKOFF_SECONDS) - 1)]
            failures += 1
        if patch.status:
            meta = body["metadata"]
            try:
                written = await asyncio.to_thread(
                    memo.cluster.patch_job_status, meta["namespace"], meta["name"], dict(patch.status)
                )
            except (ApiException, urllib3.exceptions.HTTPError) as error:
                logger.error("writing the status failed: %s", error)
                delay = min(delay, RETRY_SECONDS)
            else:
                if not written:
                    return  # deleted meanwhile
        await asyncio.sleep(delay)


def _refresh_inputs(body: kopf.Body, memo: kopf.Memo) -> tuple[str, jobs.WorkerView | None, object, bool]:
    """(uid, its pool's view of its workers, what a refresh reads, whether that is as at the
    last refresh: nothing to do)."""
    uid = str(body["metadata"]["uid"])
    workers = memo.pools.workers_of(uid)
    fingerprint = (body["metadata"].get("resourceVersion"), workers)
    quiet = workers is not None and bool(memo.quiet.unchanged(uid, fingerprint, time.time()))
    return uid, workers, fingerprint, quiet


async def reconcile_job(
    body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    """One refresh of a job's status into `patch` (a retry it asks for: kopf.TemporaryError)."""
    if (body.get("status") or {}).get("phase") in TERMINAL_PHASES:
        return  # ended (an unparseable job too: start_job marked it failed)
    uid, workers, fingerprint, quiet = _refresh_inputs(body, memo)
    if quiet:
        return  # nothing it would read has changed since it last ran
    job = parse(BatchInference, body)
    if job.status is None or job.status.phase is None:
        return  # start_job has not recorded it yet
    try:
        with transient("refreshing the job's status"):
            update = await jobs.refresh_status(
                job,
                job.status.model_copy(deep=True),
                jobs.ledger_for(job, memo.redis),
                await _store(memo, job, workers.admission if workers else None),
                jobs.now_utc(),
                workers=workers,
                retention_seconds=memo.settings.finished_job_retention_seconds,
            )
    except kopf.TemporaryError as error:
        _degraded(patch, body, job, error)
        raise
    _write(patch, body, update, logger)
    if workers is not None:
        memo.quiet.refreshed(uid, fingerprint, job)


@kopf.on.update(*JOBS, field="spec")
async def update_job(
    *, old: Any, new: Any, body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    """Suspend and resume take effect through the pool's next cycle (it reads the spec each
    time); fields fixed at admission are refused (see controller.jobs.spec_changed)."""
    job = parse(BatchInference, body)
    previous = job.model_copy(update={"spec": parse(type(job.spec), old)})
    current = job.model_copy(update={"spec": parse(type(job.spec), new)})
    with transient("applying the spec change"):
        update = await jobs.spec_changed(previous, current, jobs.ledger_for(job, memo.redis), jobs.now_utc())
    if update is not None:
        _write(patch, body, update, logger)


@kopf.on.delete(*JOBS)
async def delete_job(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, retry: int = 0, **_: Any) -> None:
    """Deleting cancels: workers stop, what is done is merged into the output (the rest as
    batch_cancelled), the ledger's keys go; the output stays. Needs only the object's metadata,
    so a job whose spec cannot be parsed is cleaned up too.

    Deletion always finishes: a merge that cannot succeed (the output unwritable, a segment
    gone) or that keeps failing (MAX_DELETE_ATTEMPTS tries) is given up, with a warning Event
    saying so, and the keys go without it; Redis away that long leaves its keys behind."""
    meta = ObjectMeta.model_validate(dict(body.get("metadata", {})))
    try:
        job: BatchInference | None = BatchInference.model_validate(dict(body))
    except pydantic.ValidationError:
        job = None  # its keys go all the same; nothing is merged (no URL is taken from Redis)
    last = retry + 1 >= MAX_DELETE_ATTEMPTS
    ledger = JobLedger(memo.redis, JobKeys.of(meta))
    config = jobs.job_config(job) if job else None
    stopped, report = 0, None
    try:
        with transient("cancelling the job", delay=RETRY_SECONDS * 2 ** min(retry, 4)):
            stopped = await asyncio.to_thread(memo.cluster.delete_job_workers, meta.ns, meta.uid_text)
            try:
                store = await _store(memo, job, None) if job else None
                report = await jobs.cancel(ledger, store, config)
            except (StorageError, MergeError) as error:
                if isinstance(error, StorageError) and error.transient and not last:
                    raise kopf.TemporaryError(f"cancelling the job: {error}", delay=RETRY_SECONDS) from error
                _post(body, Reason.DELETED, f"the partial output was not merged: {error}", warning=True)
                await jobs.cancel(ledger, None, config)  # the keys, user and claim go all the same
    except kopf.TemporaryError as error:
        if not last:
            raise
        message = f"gave up cleaning up after {retry + 1} attempts: {error}"
        _post(body, Reason.DELETED, message, warning=True)
        logger.warning(message)
    memo.pools.forget_job(meta.uid_text)
    memo.quiet.forget(meta.uid_text)
    logger.info("deleted: %d worker pods stopped, ledger keys removed", stopped)
    if report is not None:
        message = f"cancelled: {report.outputs} results, {report.errors} errors in {report.output_url}"
        logger.info(message)
        _post(body, Reason.DELETED, message)


# --- BatchPool ----------------------------------------------------------------------------------


# Sharp: a cycle starts every INTERVAL however long the last took (yield latency depends on it).
@kopf.timer(*POOLS, interval=INTERVAL, sharp=True, backoff=max(1.0, 2 * INTERVAL))
async def reconcile_pool(
    body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    """Plan the pool's batch workers and carry the plan out; the pool's status reports it."""
    pool = parse(BatchPool, body)
    with (
        transient("planning the pool", delay=max(1.0, 2 * INTERVAL)),  # soon: yields wait for it
        metrics.CYCLE_SECONDS.labels(pool.metadata.name).time(),
    ):
        cycle = await memo.pools.cycle(pool)
    if "collections" in memo:  # absent only where a test calls this handler alone
        memo.collections.cycle_ended()
    # The signal's read time moves every cycle; it alone is not worth a write.
    write_status(
        patch, body, pool_status(pool, cycle, jobs.now_utc()), volatile=frozenset({"lastSignalTime"})
    )
    _report_cycle(body, cycle, logger)


def _report_cycle(body: kopf.Body, cycle: Cycle, logger: kopf.Logger) -> None:
    took = sum(cycle.phase_seconds.values())
    if took > SLOW_CYCLE_SECONDS:
        parts = ", ".join(f"{name} {seconds:.3f}s" for name, seconds in cycle.phase_seconds.items())
        logger.info("slow cycle: %.3fs for %d jobs (%s)", took, cycle.jobs, parts)
    trough = f"trough {cycle.plan.trough_gpus} GPUs"
    if cycle.stopped:
        modes = ", ".join(f"{worker} ({mode.value})" for worker, mode in cycle.stopped)
        yielding = any(mode is StopMode.YIELD for _, mode in cycle.stopped)
        _post(body, Reason.YIELD if yielding else Reason.SCALE_DOWN, f"stopping {modes}; {trough}")
        logger.info("stopping %s; %s, online %s GPUs", modes, trough, cycle.online.gpus_in_use)
    if cycle.freed:
        gone = ", ".join(f"{worker} ({mode.value}) {seconds:.2f}s" for worker, mode, seconds in cycle.freed)
        _post(body, Reason.WORKER_STOPPED, f"GPUs free after the decision to stop: {gone}")
    if cycle.failures:
        _post(body, Reason.WORKER_CREATE_FAILED, "; ".join(cycle.failures), warning=True)
        logger.warning("workers refused: %s", "; ".join(cycle.failures))
    if cycle.created:
        _post(body, Reason.SCALE_UP, f"starting {', '.join(cycle.created)}; {trough}")
        logger.info(
            "starting %s; %s, online %s GPUs", ", ".join(cycle.created), trough, cycle.online.gpus_in_use
        )


@kopf.on.delete(*POOLS)
async def delete_pool(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """A pool going away takes its batch workers with it (they yield: the GPUs are not batch's any more)."""
    name = body["metadata"]["name"]
    with transient("stopping the pool's workers"):
        stopped = await asyncio.to_thread(memo.cluster.delete_pool_workers, name)
    memo.pools.forget_pool(name)
    if stopped:
        _post(body, Reason.YIELD, f"pool deleted: stopping {stopped} workers")
        logger.info("pool deleted: stopping %d workers", stopped)


# --- ModelTemplate ------------------------------------------------------------------------------


@kopf.on.create(*TEMPLATES)
@kopf.on.update(*TEMPLATES)
@kopf.on.resume(*TEMPLATES)
@kopf.timer(*TEMPLATES, interval=TEMPLATE_RECHECK_SECONDS, initial_delay=TEMPLATE_RECHECK_SECONDS)
async def check_template(
    body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    """The template's Ready condition: valid (parsed) and its pool exists."""
    template = parse(ModelTemplate, body)
    with transient("checking the template's pool"):
        pool = await asyncio.to_thread(memo.cluster.pool, template.spec.pool_ref)
    if write_status(patch, body, jobs.template_status(template, pool, jobs.now_utc())):
        logger.info("pool %s %s", template.spec.pool_ref, "found" if pool else "not found")


@kopf.on.delete(*TEMPLATES, optional=True)
async def delete_template(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """Jobs still using a deleted template lose their workers (the pool no longer plans for
    them); each gets a warning Event saying so. Nothing to clean up: no finalizer."""
    name = body["metadata"]["name"]
    with transient("listing the template's jobs"):
        listed = await asyncio.to_thread(memo.cluster.jobs)
    for raw in listed:
        try:
            job = BatchInference.model_validate(raw)
        except pydantic.ValidationError:
            continue  # its own handlers report it
        if job.spec.template_ref != name or job.status is None or job.status.phase in TERMINAL:
            continue
        message = f"ModelTemplate {name} was deleted: this job gets no workers until it exists again"
        _post(raw, Reason.TEMPLATE_DELETED, message, warning=True)
        logger.warning("%s: %s", job.metadata.key, message)
