"""The Kopf handlers called as Kopf calls them (keyword arguments, a Body, a Patch, a Memo), with
a real Redis ledger: errors the Kopf way, and cleanup that does not depend on a parseable spec."""

import asyncio
import collections
import dataclasses
import importlib
import logging
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import kopf
import pytest
import redis.exceptions
from kubernetes.client.exceptions import ApiException
from redis.asyncio import Redis

from tests.builders import batch_inference, pool, template
from tests.ledgertools import request_line, write_input
from troughfill.api import BatchInference, BatchPool, ModelTemplate, admit
from troughfill.api.batchpool import BatchPoolStatus
from troughfill.config import Settings
from troughfill.controller import jobs
from troughfill.controller.stores import JobStores
from troughfill.planner import Limit
from troughfill.storage import ERROR_FILE, ObjectStore, WriteError

LOG = logging.getLogger("test")


@pytest.fixture(scope="module")
def handlers() -> Iterator[ModuleType]:
    """troughfill.handlers, imported into a registry of its own: importing it registers its
    handlers in Kopf's default registry, and any operator a later test runs in this process
    (an e2e probe operator) would then run them too, metrics server on port 9090 included."""
    previous = kopf.get_default_registry()
    fresh = "troughfill.handlers" not in sys.modules
    kopf.set_default_registry(kopf.OperatorRegistry())
    try:
        yield importlib.import_module("troughfill.handlers")
    finally:
        kopf.set_default_registry(previous)
        if fresh:  # a later `kopf run -m troughfill.handlers` imports (and registers) it anew
            sys.modules.pop("troughfill.handlers", None)


class Workers:
    """The one cluster call delete_job makes."""

    def __init__(self) -> None:
        self.deleted: list[tuple[str, str]] = []

    def delete_job_workers(self, namespace: str, job_uid: str) -> int:
        self.deleted.append((namespace, job_uid))
        return 1


class Pools:
    def __init__(self) -> None:
        self.forgotten: list[str] = []

    def forget_job(self, uid: str) -> None:
        self.forgotten.append(uid)


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    posted: list[dict[str, Any]] = []
    monkeypatch.setattr(kopf, "event", lambda body, **event: posted.append(event))
    return posted


async def started_job(aredis: Redis, tmp_path: Path) -> dict[str, Any]:
    input_url = write_input(tmp_path / "in.jsonl", [request_line(f"r{i}") for i in range(5)])
    wire = batch_inference(inputURL=input_url, outputURL=(tmp_path / "out").as_uri() + "/")
    wire["metadata"].update(
        uid=uuid.uuid4().hex, generation=1, creationTimestamp=datetime.now(UTC).isoformat()
    )
    job = BatchInference.model_validate(wire)
    admission = admit(job, ModelTemplate.model_validate(template()), BatchPool.model_validate(pool()))
    started = await jobs.start(job, admission, jobs.ledger_for(job, aredis), ObjectStore(), datetime.now(UTC))
    wire["status"] = started.status.model_dump(mode="json", by_alias=True, exclude_none=True)
    return wire


async def test_deleting_a_job_whose_spec_cannot_be_parsed_still_removes_its_ledger_keys(
    handlers: ModuleType, aredis: Redis, tmp_path: Path, events: list[dict[str, Any]]
) -> None:
    wire = await started_job(aredis, tmp_path)
    uid = wire["metadata"]["uid"]
    assert await aredis.keys(f"*{uid}*")
    del wire["spec"]["inputURL"]  # what a stored object the models no longer accept looks like
    memo = kopf.Memo(
        quiet=jobs.QuietJobs(), redis=aredis, store=ObjectStore(), cluster=Workers(), pools=Pools()
    )
    await handlers.delete_job(body=kopf.Body(wire), memo=memo, logger=LOG)
    assert await aredis.keys(f"*{uid}*") == []
    assert memo.cluster.deleted == [("team-a", uid)]
    assert memo.pools.forgotten == [uid]
    # Nothing is merged: where its output goes is not taken from Redis, and its spec is unreadable.
    assert events == []
    assert not (tmp_path / "out" / ERROR_FILE).exists()


async def test_an_unparseable_job_fails_permanently_with_its_phase_written(
    handlers: ModuleType, aredis: Redis, tmp_path: Path, events: list[dict[str, Any]]
) -> None:
    wire = batch_inference(inputURL="ftp://nowhere/in.jsonl")
    wire["metadata"]["uid"] = uuid.uuid4().hex
    patch = kopf.Patch()
    memo = kopf.Memo(quiet=jobs.QuietJobs(), redis=aredis, store=ObjectStore())
    with pytest.raises(kopf.PermanentError, match=r"InvalidSpec: spec\.inputURL"):
        await handlers.start_job(body=kopf.Body(wire), patch=patch, memo=memo, logger=LOG)
    assert patch.status["phase"] == "failed"  # Kopf applies the patch although the handler failed
    wire["status"] = {"phase": "failed"}
    patch = kopf.Patch()
    await handlers.reconcile_job(body=kopf.Body(wire), patch=patch, memo=memo, logger=LOG)
    assert not patch  # the job timer leaves an ended job alone, parseable or not


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.ConnectionError("connection refused"),
        redis.exceptions.TimeoutError("timed out"),
        ApiException(status=503, reason="Service Unavailable"),
        ApiException(status=429, reason="Too Many Requests"),
    ],
)
def test_an_unavailable_redis_or_api_server_is_a_temporary_error(
    handlers: ModuleType, error: Exception
) -> None:
    counted = handlers.metrics.REGISTRY.get_sample_value("troughfill_ledger_unavailable_total") or 0.0
    with pytest.raises(kopf.TemporaryError) as caught, handlers.transient("reading"):
        raise error
    assert caught.value.delay == handlers.RETRY_SECONDS
    assert str(caught.value).startswith("reading: ")
    # Redis away counts towards the ledger-unreachable alert; the API server does not
    more = 1.0 if isinstance(error, redis.exceptions.RedisError) else 0.0
    assert handlers.metrics.REGISTRY.get_sample_value("troughfill_ledger_unavailable_total") == counted + more


def test_an_api_refusal_is_not_retried_as_if_transient(handlers: ModuleType) -> None:
    with pytest.raises(ApiException), handlers.transient("creating"):
        raise ApiException(status=403, reason="Forbidden")


def test_a_status_is_written_only_when_more_than_its_volatile_fields_changed(handlers: ModuleType) -> None:
    now = datetime.now(UTC)
    status = BatchPoolStatus(capacity_gpus=8, last_signal_time=now)
    body = kopf.Body({"status": status.model_dump(mode="json", by_alias=True, exclude_none=True)})
    later = status.model_copy(update={"last_signal_time": datetime(2030, 1, 1, tzinfo=UTC)})
    patch = kopf.Patch()
    assert not handlers.write_status(patch, body, later, volatile=frozenset({"lastSignalTime"}))
    assert not patch
    assert handlers.write_status(patch, body, later.model_copy(update={"capacity_gpus": 4}))
    assert patch.status["capacityGPUs"] == 4


class Unwritable(ObjectStore):
    """An output prefix nobody may write to (the merge at deletion cannot succeed)."""

    def writer(self, url: str) -> Any:
        raise WriteError("writing", url, PermissionError(13, "Permission denied"))


class Stores:
    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def for_admission(self, admission: Any) -> ObjectStore:
        return self.store


class Cluster(Workers):
    def template(self, name: str) -> ModelTemplate:
        return ModelTemplate.model_validate(template())

    def pool(self, name: str) -> BatchPool:
        return BatchPool.model_validate(pool())


async def test_a_deletion_whose_merge_cannot_succeed_still_finishes(
    handlers: ModuleType, aredis: Redis, tmp_path: Path, events: list[dict[str, Any]]
) -> None:
    wire = await started_job(aredis, tmp_path)
    uid = wire["metadata"]["uid"]
    memo = kopf.Memo(
        quiet=jobs.QuietJobs(), redis=aredis, cluster=Cluster(), pools=Pools(), stores=Stores(Unwritable())
    )
    await handlers.delete_job(body=kopf.Body(wire), memo=memo, logger=LOG, retry=0)  # no retry loop
    assert await aredis.keys(f"*{uid}*") == []  # the keys go all the same
    (event,) = events
    assert event["type"] == "Warning"
    assert "the partial output was not merged: writing" in event["message"]
    assert "Permission denied" in event["message"]


async def test_a_deletion_gives_up_on_redis_after_its_attempts(
    handlers: ModuleType, tmp_path: Path, events: list[dict[str, Any]]
) -> None:
    wire = batch_inference(inputURL=(tmp_path / "in.jsonl").as_uri(), outputURL=(tmp_path / "o").as_uri())
    wire["metadata"]["uid"] = uuid.uuid4().hex
    gone = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    memo = kopf.Memo(
        quiet=jobs.QuietJobs(), redis=gone, cluster=Cluster(), pools=Pools(), stores=Stores(ObjectStore())
    )
    with pytest.raises(kopf.TemporaryError):  # not the last attempt: Kopf tries again later
        await handlers.delete_job(body=kopf.Body(wire), memo=memo, logger=LOG, retry=0)
    last = handlers.MAX_DELETE_ATTEMPTS - 1
    await handlers.delete_job(body=kopf.Body(wire), memo=memo, logger=LOG, retry=last)  # finishes
    assert "gave up cleaning up after" in events[-1]["message"]
    assert memo.pools.forgotten == [wire["metadata"]["uid"]]
    await gone.aclose()


async def test_redis_away_shows_on_the_job_as_degraded_while_kopf_retries(
    handlers: ModuleType, aredis: Redis, tmp_path: Path
) -> None:
    wire = await started_job(aredis, tmp_path)
    gone = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)

    class NoViews:
        def workers_of(self, uid: str) -> None:
            return None

    memo = kopf.Memo(
        quiet=jobs.QuietJobs(),
        redis=gone,
        cluster=Cluster(),
        pools=NoViews(),
        stores=Stores(ObjectStore()),
        settings=Settings(),
    )
    patch = kopf.Patch()
    with pytest.raises(kopf.TemporaryError, match="Redis unavailable"):
        await handlers.reconcile_job(body=kopf.Body(wire), patch=patch, memo=memo, logger=LOG)
    degraded = next(c for c in patch.status["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "LedgerUnavailable")
    await gone.aclose()


class StatusWrites(Cluster):
    """Records the status patches the job daemon writes; `exists` False: the job is gone."""

    def __init__(self, exists: bool = True) -> None:
        self.written: list[tuple[str, str, dict[str, Any]]] = []
        self.exists = exists

    def patch_job_status(self, namespace: str, name: str, status: dict[str, Any]) -> bool:
        self.written.append((namespace, name, status))
        return self.exists


class NotStopped:
    def __bool__(self) -> bool:
        return False


async def test_the_job_daemon_writes_what_a_failed_refresh_says_and_waits_the_retry_delay(
    handlers: ModuleType, aredis: Redis, tmp_path: Path
) -> None:
    """The daemon is the loop around `reconcile_job`: a refresh that meets Redis away writes
    its Degraded condition through the API and waits the error's delay (5 s) before the next
    try; a job deleted meanwhile (the write finds no object) ends the daemon."""
    wire = await started_job(aredis, tmp_path)
    gone = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)

    class NoViews:
        def workers_of(self, uid: str) -> None:
            return None

    cluster = StatusWrites()
    memo = kopf.Memo(
        quiet=jobs.QuietJobs(), redis=gone, cluster=cluster, pools=NoViews(), stores=Stores(ObjectStore())
    )
    memo.settings = Settings()
    daemon = asyncio.create_task(
        handlers.refresh_job(stopped=NotStopped(), body=kopf.Body(wire), memo=memo, logger=LOG)
    )
    for _ in range(200):
        if cluster.written:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(handlers.RETRY_SECONDS / 2)
    assert not daemon.done()
    daemon.cancel()
    ((namespace, name, status),) = cluster.written  # one write: the next try waits the delay
    assert (namespace, name) == (wire["metadata"]["namespace"], wire["metadata"]["name"])
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "LedgerUnavailable")

    memo.cluster = StatusWrites(exists=False)
    await asyncio.wait_for(
        handlers.refresh_job(stopped=NotStopped(), body=kopf.Body(wire), memo=memo, logger=LOG), timeout=10
    )  # returns: the job is gone
    wire["status"]["phase"] = "completed"
    await asyncio.wait_for(
        handlers.refresh_job(stopped=NotStopped(), body=kopf.Body(wire), memo=memo, logger=LOG), timeout=1
    )  # returns at once: an ended job never changes again
    await gone.aclose()


async def test_a_quiet_jobs_refresh_touches_nothing_until_its_view_or_object_changes(
    handlers: ModuleType, aredis: Redis, tmp_path: Path
) -> None:
    """A thousand waiting jobs refresh every tick; one whose object and pool view are as they
    were at its last refresh is skipped (here: Redis is away and nothing fails), and one whose
    view moved is refreshed again (and meets the outage)."""
    wire = await started_job(aredis, tmp_path)
    view = jobs.WorkerView(desired=0, ready=0, limit=Limit.FAIR_SHARE, at_risk=False)

    class OneView:
        current = view

        def workers_of(self, uid: str) -> jobs.WorkerView:
            return self.current

    pools = OneView()
    memo = kopf.Memo(
        quiet=jobs.QuietJobs(),
        redis=aredis,
        cluster=Cluster(),
        pools=pools,
        stores=Stores(ObjectStore()),
        settings=Settings(),
    )
    await handlers.reconcile_job(body=kopf.Body(wire), patch=kopf.Patch(), memo=memo, logger=LOG)
    gone = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    memo.redis = gone
    await handlers.reconcile_job(body=kopf.Body(wire), patch=kopf.Patch(), memo=memo, logger=LOG)  # skipped
    pools.current = dataclasses.replace(view, desired=1)
    with pytest.raises(kopf.TemporaryError, match="Redis unavailable"):
        await handlers.reconcile_job(body=kopf.Body(wire), patch=kopf.Patch(), memo=memo, logger=LOG)
    await gone.aclose()


def test_successful_timer_runs_are_not_logged_but_failures_and_other_handlers_are(
    handlers: ModuleType,
) -> None:
    quiet = handlers.QuietTimers()

    def record(level: int, message: str) -> logging.LogRecord:
        return logging.LogRecord("kopf.objects", level, __file__, 1, message, None, None)

    assert not quiet.filter(record(logging.INFO, "Timer 'reconcile_job' succeeded."))
    assert quiet.filter(record(logging.ERROR, "Timer 'reconcile_job' failed temporarily: Redis unavailable"))
    assert quiet.filter(record(logging.INFO, "Handler 'start_job' succeeded."))


@dataclasses.dataclass
class Admitting:
    """The cluster reads start_job makes: the template, its pool, every job."""

    capped: BatchPool
    listed: list[dict[str, Any]]

    def template(self, name: str) -> ModelTemplate:
        return ModelTemplate.model_validate(template())

    def pool(self, name: str) -> BatchPool:
        return self.capped

    def jobs(self) -> list[dict[str, Any]]:
        return self.listed


async def test_two_jobs_of_a_namespace_starting_at_once_do_not_pass_its_cap_together(
    handlers: ModuleType, aredis: Redis, tmp_path: Path, events: list[dict[str, Any]]
) -> None:
    """maxRequests 5, two jobs of 4 requests created together: counted one at a time, the second
    sees the first's 4 (from the ledger, before any status says so) and fails; without that, each
    counted the other as 0 and both ran."""
    capped = BatchPool.model_validate(
        pool(
            quotas=[
                {"namespace": "team-a", "maxGPUs": 4, "maxRequests": 5, "storage": [{"prefix": "file:///"}]}
            ]
        )
    )
    wires = []
    for name in ("first", "second"):
        input_url = write_input(tmp_path / name / "in.jsonl", [request_line(f"{name}-{i}") for i in range(4)])
        wire = batch_inference(name, inputURL=input_url, outputURL=(tmp_path / name / "out").as_uri() + "/")
        wire["metadata"].update(
            uid=uuid.uuid4().hex, generation=1, creationTimestamp=datetime.now(UTC).isoformat()
        )
        wires.append(wire)
    cluster = Admitting(capped, wires)
    memo = kopf.Memo(
        quiet=jobs.QuietJobs(), redis=aredis, cluster=cluster, stores=JobStores(cluster, Settings()),
        admitting=collections.defaultdict(asyncio.Lock),
    )  # fmt: skip
    patches = [kopf.Patch(), kopf.Patch()]
    await asyncio.gather(
        *(
            handlers.start_job(body=kopf.Body(wire), patch=patch, memo=memo, logger=LOG)
            for wire, patch in zip(wires, patches, strict=True)
        )
    )
    phases = sorted(patch.status["phase"] for patch in patches)
    assert phases == ["failed", "in_progress"], phases
    failed = next(p for p in patches if p.status["phase"] == "failed")
    (condition,) = [c for c in failed.status["conditions"] if c["type"] == "Failed"]
    assert condition["reason"] == "RequestQuotaExceeded"
    assert "its other jobs hold 4" in condition["message"]
