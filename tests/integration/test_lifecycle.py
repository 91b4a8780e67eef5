"""A job's life as status, against a real Redis ledger and real files: the functions the Kopf
handlers call (admission outcome, indexing, progress, completion, expiry, cancellation)."""

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from redis.asyncio import Redis

from tests.builders import batch_inference, pool, template
from tests.ledgertools import FakeWorker, drain, read_jsonl, request_line, write_input
from troughfill.api import BatchInference, BatchPool, ModelTemplate, admit, immutable_changes
from troughfill.api.admission import Admission
from troughfill.api.conditions import find_condition
from troughfill.controller import jobs as lifecycle
from troughfill.planner import Limit
from troughfill.storage import ObjectStore

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def make_job(tmp_path: Path, count: int, created: datetime = NOW, **spec: object) -> BatchInference:
    input_url = write_input(tmp_path / "in.jsonl", [request_line(f"r{i}") for i in range(count)])
    wire = batch_inference(inputURL=input_url, outputURL=(tmp_path / "out").as_uri() + "/", **spec)
    wire["metadata"].update(uid=uuid.uuid4().hex, generation=1, creationTimestamp=created.isoformat())
    return BatchInference.model_validate(wire)


def admitted(job: BatchInference) -> Admission:
    return admit(job, ModelTemplate.model_validate(template()), BatchPool.model_validate(pool()))


async def test_a_job_is_indexed_then_completes_with_its_counts(aredis: Redis, tmp_path: Path) -> None:
    job = make_job(tmp_path, 12)
    ledger, store = lifecycle.ledger_for(job, aredis), ObjectStore()
    started = await lifecycle.start(job, admitted(job), ledger, store, NOW)
    assert started.status.phase == "in_progress"
    assert started.status.request_counts.total == 12
    assert [e.reason for e in started.events] == ["Admitted"]
    again = await lifecycle.start(job, admitted(job), ledger, store, NOW)
    assert again.events == []  # a resumed handler does not re-admit or re-index
    await drain(ledger, store, job.spec.output_url)
    workers = lifecycle.WorkerView(desired=1, ready=1, limit=Limit.NONE, at_risk=False)
    done = await lifecycle.refresh_status(job, started.status, ledger, store, NOW, workers=workers)
    assert done.status.phase == "completed"
    assert done.status.progress == "12/12 (100%)"
    complete = find_condition(done.status.conditions, "Complete")
    assert complete is not None
    assert complete.status == "True"
    assert done.status.workers.desired == 0  # a finished job wants none
    assert len(read_jsonl(tmp_path / "out" / "output.jsonl")) == 12


async def test_a_refused_job_fails_with_the_admission_reason(aredis: Redis, tmp_path: Path) -> None:
    job = make_job(tmp_path, 1)
    refusal = admit(job, None, BatchPool.model_validate(pool()))
    outcome = await lifecycle.start(job, refusal, lifecycle.ledger_for(job, aredis), ObjectStore(), NOW)
    failed = find_condition(outcome.status.conditions, "Failed")
    assert failed is not None
    assert failed.reason == "TemplateNotFound"
    assert outcome.status.phase == "failed"
    assert outcome.events[0].warning
    assert await lifecycle.ledger_for(job, aredis).state() is None  # nothing recorded


async def test_unreadable_input_fails_the_job(aredis: Redis, tmp_path: Path) -> None:
    wire = batch_inference(
        inputURL=(tmp_path / "missing.jsonl").as_uri(), outputURL=(tmp_path / "o").as_uri()
    )
    wire["metadata"].update(uid=uuid.uuid4().hex, creationTimestamp=NOW.isoformat())
    job = BatchInference.model_validate(wire)
    outcome = await lifecycle.start(
        job,
        admitted(job),
        lifecycle.ledger_for(job, aredis),
        ObjectStore(),
        NOW,
    )
    failed = find_condition(outcome.status.conditions, "Failed")
    assert failed is not None
    assert failed.reason == "InputUnreadable"
    admitted_condition = find_condition(outcome.status.conditions, "Admitted")
    assert admitted_condition is not None
    assert admitted_condition.status == "True"  # the spec passed; its input did not


async def test_the_completion_window_expires_what_is_left(aredis: Redis, tmp_path: Path) -> None:
    job = make_job(tmp_path, 10, created=NOW - timedelta(hours=2), completionWindow="1h")
    ledger, store = lifecycle.ledger_for(job, aredis), ObjectStore()
    started = await lifecycle.start(job, admitted(job), ledger, store, NOW - timedelta(hours=2))
    worker = FakeWorker(ledger, store, job.spec.output_url, "w")
    assert await worker.take(4)
    await worker.finish()
    expired = await lifecycle.refresh_status(job, started.status, ledger, store, NOW)
    assert expired.status.phase == "expired"
    assert [e.reason for e in expired.events] == ["CompletionWindowEnded"]
    errors = read_jsonl(tmp_path / "out" / "errors.jsonl")
    assert len(read_jsonl(tmp_path / "out" / "output.jsonl")) == 4
    assert len(errors) == 6
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}


async def test_deleting_cancels_keeps_what_was_done_and_removes_the_ledger(
    aredis: Redis, tmp_path: Path
) -> None:
    job = make_job(tmp_path, 8)
    ledger, store = lifecycle.ledger_for(job, aredis), ObjectStore()
    await lifecycle.start(job, admitted(job), ledger, store, NOW)
    worker = FakeWorker(ledger, store, job.spec.output_url, "w")
    assert await worker.take(3)
    await worker.finish()
    report = await lifecycle.cancel(ledger, store, lifecycle.job_config(job))
    assert report is not None
    assert (report.outputs, report.errors) == (3, 5)
    errors = read_jsonl(tmp_path / "out" / "errors.jsonl")
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert await aredis.keys(f"*{job.metadata.uid}*") == []
    assert await lifecycle.cancel(ledger, store, lifecycle.job_config(job)) is None  # nothing left


async def test_cancel_in_the_spec_keeps_the_job_ends_it_cancelled_and_cannot_be_undone(
    aredis: Redis, tmp_path: Path
) -> None:
    job = make_job(tmp_path, 8)
    ledger, store = lifecycle.ledger_for(job, aredis), ObjectStore()
    running = job.model_copy(
        update={"status": (await lifecycle.start(job, admitted(job), ledger, store, NOW)).status}
    )
    worker = FakeWorker(ledger, store, job.spec.output_url, "w")
    assert await worker.take(3)
    await worker.finish()
    asked = running.model_copy(update={"spec": running.spec.model_copy(update={"cancel": True})})
    announced = await lifecycle.spec_changed(running, asked, ledger, NOW)
    assert announced is not None
    assert [e.reason for e in announced.events] == ["CancelRequested"]
    assert running.status is not None
    workers = lifecycle.WorkerView(desired=0, ready=0, limit=Limit.NONE, at_risk=False)
    done = await lifecycle.refresh_status(asked, running.status, ledger, store, NOW, workers=workers)
    assert done.status.phase == "cancelled"
    assert [e.reason for e in done.events] == ["CancelRequested"]
    cancelled = find_condition(done.status.conditions, "Cancelled")
    assert cancelled is not None
    assert (cancelled.status, cancelled.reason) == ("True", "CancelRequested")
    assert "3 results, 5 errors" in cancelled.message
    assert done.status.output_url == (tmp_path / "out" / "output.jsonl").as_uri()
    assert len(read_jsonl(tmp_path / "out" / "output.jsonl")) == 3
    assert {e["error"]["code"] for e in read_jsonl(tmp_path / "out" / "errors.jsonl")} == {"batch_cancelled"}
    assert done.status.finished_at == NOW
    again = await lifecycle.refresh_status(asked, done.status, ledger, store, NOW, workers=workers)
    assert again.events == []  # ended: nothing merged twice
    # Setting it back (a cluster without the CEL rule accepts that) is refused like an immutable field.
    ended = asked.model_copy(update={"status": done.status})
    assert immutable_changes(asked.spec, running.spec) == ["cancel"]
    assert immutable_changes(running.spec, asked.spec) == []
    assert (
        await lifecycle.spec_changed(ended, running.model_copy(update={"status": done.status}), ledger, NOW)
        is None
    )


async def test_a_changed_immutable_field_is_refused_and_a_restart_does_not_readmit_it(
    aredis: Redis, tmp_path: Path
) -> None:
    job = make_job(tmp_path, 2)
    ledger, store = lifecycle.ledger_for(job, aredis), ObjectStore()
    running = job.model_copy(
        update={"status": (await lifecycle.start(job, admitted(job), ledger, store, NOW)).status}
    )
    moved = running.model_copy(update={"spec": running.spec.model_copy(update={"template_ref": "bigger"})})
    update = await lifecycle.spec_changed(running, moved, ledger, NOW)
    assert update is not None
    condition = find_condition(update.status.conditions, "Admitted")
    assert condition is not None
    assert (condition.status, condition.reason) == ("False", "ImmutableFieldChanged")
    assert "templateRef" in condition.message
    assert [e.reason for e in update.events] == ["ImmutableFieldChanged"]
    assert update.events[0].warning
    refused = moved.model_copy(update={"status": update.status})
    restarted = await lifecycle.start(refused, admitted(refused), ledger, store, NOW)  # operator restart
    again = find_condition(restarted.status.conditions, "Admitted")
    assert again is not None
    assert again.reason == "ImmutableFieldChanged"
    # A status writer that started from a status read before the refusal writes it back.
    stale = await lifecycle.refresh_status(moved, running.status.model_copy(deep=True), ledger, store, NOW)
    kept = find_condition(stale.status.conditions, "Admitted")
    assert kept is not None
    assert (kept.status, kept.reason) == ("False", "ImmutableFieldChanged")


async def test_suspend_and_resume_are_announced_and_other_changes_are_quiet(
    aredis: Redis, tmp_path: Path
) -> None:
    job = make_job(tmp_path, 2)
    job = job.model_copy(update={"status": job.status or lifecycle.BatchInferenceStatus(phase="in_progress")})
    suspended = job.model_copy(update={"spec": job.spec.model_copy(update={"suspend": True})})
    wider = job.model_copy(update={"spec": job.spec.model_copy(update={"max_workers": 4})})
    ledger = lifecycle.ledger_for(job, aredis)
    down = await lifecycle.spec_changed(job, suspended, ledger, NOW)
    up = await lifecycle.spec_changed(suspended, job, ledger, NOW)
    assert down is not None
    assert up is not None
    assert [e.reason for e in down.events] == ["Suspended"]
    assert [e.reason for e in up.events] == ["Resumed"]
    assert await lifecycle.spec_changed(job, wider, ledger, NOW) is None
    assert (await ledger.progress()).refused is None


def test_a_template_is_ready_when_its_pool_exists() -> None:
    tpl = ModelTemplate.model_validate(template(pool_ref="gpus"))
    ready = lifecycle.template_status(tpl, BatchPool.model_validate(pool("gpus")), NOW)
    waiting = lifecycle.template_status(tpl, None, NOW)
    assert [(c.type, c.status, c.reason) for c in ready.conditions] == [("Ready", "True", "PoolFound")]
    assert [(c.type, c.status, c.reason) for c in waiting.conditions] == [("Ready", "False", "PoolNotFound")]


async def test_two_live_jobs_never_share_an_output_prefix(aredis: Redis, tmp_path: Path) -> None:
    first = make_job(tmp_path, 3)
    ledger, store = lifecycle.ledger_for(first, aredis), ObjectStore()
    assert (await lifecycle.start(first, admitted(first), ledger, store, NOW)).status.phase == "in_progress"
    # Same output, written without the trailing "/": the same prefix.
    wire = first.to_wire()
    wire["metadata"].update(name="second", uid=uuid.uuid4().hex)
    wire["spec"]["outputURL"] = first.spec.output_url.rstrip("/")
    wire.pop("status", None)
    second = BatchInference.model_validate(wire)
    refused = await lifecycle.start(
        second, admitted(second), lifecycle.ledger_for(second, aredis), store, NOW
    )
    failed = find_condition(refused.status.conditions, "Failed")
    assert failed is not None
    assert failed.reason == "OutputInUse"
    assert "is the output of BatchInference job, which has not ended" in failed.message
    assert await lifecycle.ledger_for(second, aredis).state() is None  # nothing recorded for it
    # Deleting the first frees the prefix (its output stays); a job created then may use it.
    await lifecycle.cancel(ledger, store, lifecycle.job_config(first))
    wire["metadata"].update(name="third", uid=uuid.uuid4().hex)
    third = BatchInference.model_validate(wire)
    taken = await lifecycle.start(third, admitted(third), lifecycle.ledger_for(third, aredis), store, NOW)
    assert taken.status.phase == "in_progress"


async def test_an_ended_jobs_prefix_is_taken_over_and_its_segments_are_left_alone(
    aredis: Redis, tmp_path: Path
) -> None:
    """The same output prefix, one job after another (a job re-created under its name): the
    second's segments live under its own uid, and its finalize deletes those alone."""
    first = make_job(tmp_path, 4)
    first_ledger, store = lifecycle.ledger_for(first, aredis), ObjectStore()
    started = await lifecycle.start(first, admitted(first), first_ledger, store, NOW)
    await drain(first_ledger, store, first.spec.output_url)
    ended = await lifecycle.refresh_status(first, started.status, first_ledger, store, NOW)
    assert ended.status.phase == "completed"
    planted = tmp_path / "out" / "_segments" / first.metadata.uid_text / "kept.jsonl"
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_text("what another job of this prefix still needs\n")
    wire = first.to_wire()
    wire["metadata"]["uid"] = uuid.uuid4().hex
    wire.pop("status", None)
    again = BatchInference.model_validate(wire)
    ledger = lifecycle.ledger_for(again, aredis)
    resumed = await lifecycle.start(again, admitted(again), ledger, store, NOW)
    assert resumed.status.phase == "in_progress"  # the first has ended: its claim is taken over
    await drain(ledger, store, again.spec.output_url)
    done = await lifecycle.refresh_status(again, resumed.status, ledger, store, NOW)
    assert done.status.phase == "completed"
    assert planted.exists()
    assert not (tmp_path / "out" / "_segments" / again.metadata.uid_text).exists()


async def test_a_forged_output_url_in_redis_does_not_redirect_the_merge(
    aredis: Redis, tmp_path: Path
) -> None:
    """Whatever Redis says, the operator merges where the custom resource says (it never takes a
    URL from Redis that it can read from the resource)."""
    job = make_job(tmp_path, 3)
    ledger, store = lifecycle.ledger_for(job, aredis), ObjectStore()
    started = await lifecycle.start(job, admitted(job), ledger, store, NOW)
    await drain(ledger, store, job.spec.output_url)
    elsewhere = (tmp_path / "attacker").as_uri() + "/"
    await aredis.hset(ledger.keys.key("meta"), mapping={"output_url": elsewhere, "input_url": elsewhere})
    done = await lifecycle.refresh_status(job, started.status, ledger, store, NOW)
    assert done.status.phase == "completed"
    assert len(read_jsonl(tmp_path / "out" / "output.jsonl")) == 3
    assert not (tmp_path / "attacker").exists()


async def test_an_ended_jobs_keys_go_after_the_retention(aredis: Redis, tmp_path: Path) -> None:
    job = make_job(tmp_path, 3)
    ledger, store = lifecycle.ledger_for(job, aredis), ObjectStore()
    started = await lifecycle.start(job, admitted(job), ledger, store, NOW)
    await drain(ledger, store, job.spec.output_url)
    done = await lifecycle.refresh_status(job, started.status, ledger, store, NOW, retention_seconds=3600)
    assert done.status.phase == "completed"
    keys = await aredis.keys(f"*{job.metadata.uid}*")
    assert keys
    ttls = [await aredis.ttl(key) for key in keys]
    assert all(3500 < ttl <= 3600 for ttl in ttls), ttls


async def test_a_job_no_pool_plans_any_more_shows_no_workers(aredis: Redis, tmp_path: Path) -> None:
    """Its pool was deleted (its workers with it): the status does not keep the last counts."""
    job = make_job(tmp_path, 3)
    ledger, store = lifecycle.ledger_for(job, aredis), ObjectStore()
    started = await lifecycle.start(job, admitted(job), ledger, store, NOW)
    planned = lifecycle.WorkerView(desired=2, ready=2, limit=Limit.NONE, at_risk=False)
    running = await lifecycle.refresh_status(job, started.status, ledger, store, NOW, workers=planned)
    assert (running.status.workers.desired, running.status.workers.ready) == (2, 2)
    orphaned = await lifecycle.refresh_status(job, running.status, ledger, store, NOW, workers=None)
    assert (orphaned.status.workers.desired, orphaned.status.workers.ready) == (0, 0)
    condition = find_condition(orphaned.status.conditions, "Running")
    assert condition is not None
    assert (condition.status, condition.reason) == ("False", "PoolNotFound")
