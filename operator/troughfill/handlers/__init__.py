"""Kopf handlers: thin. They look objects up, call troughfill.controller.jobs and write what it returns.

Run with `troughfill operator` or `kopf run -m troughfill.handlers`. The only module that
imports kopf. Kopf's own annotations and the finalizer use troughfill's names
(constants.ANNOTATION_PREFIX, constants.FINALIZER), so another Kopf operator on the same
cluster never reads this one's state.
"""

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import kopf
import pydantic

from troughfill import constants, metrics
from troughfill.api.admission import admit
from troughfill.api.batchinference import BatchInference
from troughfill.api.batchpool import BatchPool
from troughfill.api.conditions import Reason
from troughfill.api.modeltemplate import ModelTemplate
from troughfill.config import Settings
from troughfill.controller import jobs as lifecycle
from troughfill.controller.pools import PoolController, pool_status
from troughfill.kube.adapter import KubeWorkers, api_client
from troughfill.kube.workerpod import WorkerEnvironment
from troughfill.ledger import TERMINAL, connect
from troughfill.signals import PrometheusSignals
from troughfill.storage import store_for

INTERVAL = Settings().reconcile_interval_seconds
"""Read at import (Kopf's decorators need it then); everything else is read at startup."""
JOBS = (constants.API_GROUP, constants.API_VERSION, BatchInference.crd.plural)
POOLS = (constants.API_GROUP, constants.API_VERSION, BatchPool.crd.plural)
TEMPLATES = (constants.API_GROUP, constants.API_VERSION, ModelTemplate.crd.plural)
TEMPLATE_RECHECK_SECONDS = 30.0
"""How often a template's Ready condition is re-checked (its pool may come or go)."""


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
    api = api_client()
    memo.settings = own = Settings()
    if own.metrics_port:
        metrics.serve(own.metrics_port)
    memo.cluster = KubeWorkers(api)
    memo.redis = connect(own)
    memo.store = store_for(own)
    memo.pools = PoolController(
        memo.cluster,
        PrometheusSignals(own.prometheus_url, own.prometheus_timeout_seconds),
        memo.redis,
        WorkerEnvironment(
            redis_url=own.redis_url,
            redis_password_secret=own.redis_password_secret,
            s3_endpoint_url=own.s3_endpoint_url,
            s3_addressing_style=own.s3_addressing_style,
            storage_secret=own.storage_secret,
            worker_command=own.worker_command,
        ),
    )


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    if "redis" in memo:
        await memo.redis.aclose()


def _write(patch: kopf.Patch, body: kopf.Body, update: lifecycle.StatusUpdate) -> None:
    new = update.status.model_dump(mode="json", by_alias=True, exclude_none=True)
    if new != dict(body.get("status", {})):
        patch.status.update(new)
    for event in update.events:  # posted whatever settings.posting.level filters from the logs
        kopf.event(
            body,
            type="Warning" if event.warning else "Normal",
            reason=event.reason.value,
            message=event.message,
        )


def _parse(body: Mapping[str, Any]) -> BatchInference | str:
    try:
        return BatchInference.model_validate(dict(body))
    except pydantic.ValidationError as error:
        return str(error)


@kopf.on.create(*JOBS)
@kopf.on.resume(*JOBS)
async def start_job(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    job = _parse(body)
    now = lifecycle.now_utc()
    if isinstance(job, str):
        status = body.get("status") or {}
        if status.get("phase") != "failed":
            kopf.event(body, type="Warning", reason=Reason.INVALID_SPEC.value, message=job[:1000])
            patch.status["phase"] = "failed"
        return
    if job.status and job.status.phase in TERMINAL:
        return
    template = await asyncio.to_thread(memo.cluster.template, job.spec.template_ref)
    pool = await asyncio.to_thread(memo.cluster.pool, template.spec.pool_ref) if template else None
    admission = admit(job, template, pool)
    update = await lifecycle.start(job, admission, lifecycle.ledger_for(job, memo.redis), memo.store, now)
    _write(patch, body, update)


@kopf.timer(*JOBS, interval=INTERVAL, initial_delay=INTERVAL, backoff=max(1.0, 2 * INTERVAL))
async def reconcile_job(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    job = _parse(body)
    if isinstance(job, str) or job.status is None or job.status.phase is None or job.status.phase in TERMINAL:
        return
    status = job.status.model_copy(deep=True)
    ledger = lifecycle.ledger_for(job, memo.redis)
    view = memo.pools.views.get(job.metadata.uid or "")
    workers = (
        lifecycle.Workers(view.desired, view.ready, view.limit.value, view.at_risk, view.crash_loop)
        if view is not None
        else None
    )
    status.gpu_seconds += memo.pools.gpu_seconds.pop(job.metadata.uid or "", 0.0)
    update = await lifecycle.refresh_status(
        job, status, ledger, memo.store, lifecycle.now_utc(), workers=workers
    )
    _write(patch, body, update)


@kopf.on.update(*JOBS, field="spec")
async def update_job(
    old: Any, new: Any, body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any
) -> None:
    """Suspend and resume take effect through the pool's next cycle (it reads the spec each
    time); fields fixed at admission are refused (see lifecycle.spec_changed)."""
    job = _parse(body)
    if isinstance(job, str):
        return
    try:
        previous = job.model_copy(update={"spec": type(job.spec).model_validate(old)})
        current = job.model_copy(update={"spec": type(job.spec).model_validate(new)})
    except pydantic.ValidationError:
        return  # an invalid spec: start_job's parse reports it
    update = await lifecycle.spec_changed(
        previous, current, lifecycle.ledger_for(job, memo.redis), lifecycle.now_utc()
    )
    if update is not None:
        _write(patch, body, update)


@kopf.on.delete(*JOBS)
async def delete_job(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Deleting cancels: workers stop, what is done is merged into the output (the rest as
    batch_cancelled), the ledger's keys go; the output stays."""
    job = _parse(body)
    if isinstance(job, str):
        return
    await asyncio.to_thread(
        memo.cluster.delete_job_workers, job.metadata.namespace or "default", job.metadata.uid or ""
    )
    report = await lifecycle.cancel(lifecycle.ledger_for(job, memo.redis), memo.store)
    memo.pools.views.pop(job.metadata.uid or "", None)
    if report is not None:
        kopf.event(
            body,
            type="Normal",
            reason=Reason.DELETED.value,
            message=f"cancelled: {report.outputs} results, {report.errors} errors in {report.output_url}",
        )


# Sharp: a cycle starts every INTERVAL however long the last took (yield latency depends on it).
@kopf.timer(*POOLS, interval=INTERVAL, sharp=True, backoff=max(1.0, 2 * INTERVAL))
async def reconcile_pool(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """Plan the pool's batch workers and carry the plan out; the pool's status reports it."""
    pool = BatchPool.model_validate(dict(body))
    cycle = await memo.pools.cycle(pool)
    status = pool_status(pool, cycle, lifecycle.now_utc()).model_dump(
        mode="json", by_alias=True, exclude_none=True
    )
    old = dict(body.get("status", {}))
    # The signal's read time moves every cycle; it alone is not worth a write.
    if {k: v for k, v in status.items() if k != "lastSignalTime"} != {
        k: v for k, v in old.items() if k != "lastSignalTime"
    }:
        patch.status.update(status)
    if cycle.stopped:
        modes = ", ".join(f"{worker} ({mode.value.lower()})" for worker, mode in cycle.stopped)
        reason = "Yield" if any(m.value == "Yield" for _, m in cycle.stopped) else "ScaleDown"
        kopf.event(
            body,
            type="Normal",
            reason=reason,
            message=f"stopping {modes}; trough {cycle.plan.trough_gpus} GPUs",
        )
    if cycle.failures:
        kopf.event(
            body, type="Warning", reason="WorkerCreateFailed", message="; ".join(cycle.failures)[:1000]
        )
    if cycle.created:
        kopf.event(
            body,
            type="Normal",
            reason="ScaleUp",
            message=f"starting {', '.join(cycle.created)}; trough {cycle.plan.trough_gpus} GPUs",
        )


@kopf.on.delete(*POOLS)
async def delete_pool(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A pool going away takes its batch workers with it (they yield: the GPUs are not batch's any more)."""
    name = body["metadata"]["name"]
    stopped = await asyncio.to_thread(memo.cluster.delete_pool_workers, name)
    memo.pools.forget(name)
    if stopped:
        kopf.event(body, type="Normal", reason="Yield", message=f"pool deleted: stopping {stopped} workers")


@kopf.on.create(*TEMPLATES)
@kopf.on.update(*TEMPLATES)
@kopf.on.resume(*TEMPLATES)
@kopf.timer(*TEMPLATES, interval=TEMPLATE_RECHECK_SECONDS, initial_delay=TEMPLATE_RECHECK_SECONDS)
async def check_template(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """The template's Ready condition: valid (parsed) and its pool exists."""
    try:
        template = ModelTemplate.model_validate(dict(body))
    except pydantic.ValidationError as error:
        kopf.event(body, type="Warning", reason=Reason.INVALID_SPEC.value, message=str(error)[:1000])
        return
    pool = await asyncio.to_thread(memo.cluster.pool, template.spec.pool_ref)
    status = lifecycle.template_status(template, pool, lifecycle.now_utc())
    new = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    if new != dict(body.get("status", {})):
        patch.status.update(new)


@kopf.on.delete(*TEMPLATES, optional=True)
async def delete_template(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Jobs still using a deleted template lose their workers (the pool no longer plans for
    them); each gets a warning Event saying so. Nothing to clean up: no finalizer."""
    name = body["metadata"]["name"]
    for raw in await asyncio.to_thread(memo.cluster.jobs):
        job = _parse(raw)
        if isinstance(job, str) or job.spec.template_ref != name:
            continue
        if job.status is None or job.status.phase in TERMINAL:
            continue
        kopf.event(
            raw,
            type="Warning",
            reason=Reason.TEMPLATE_DELETED.value,
            message=f"ModelTemplate {name} was deleted: this job gets no workers until it exists again",
        )
