"""The work ledger against a real redis-server: state machine, indexing, leases, commits, usage."""

import asyncio
import json
import time
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from tests.ledgertools import (
    FakeClock,
    FakeWorker,
    create_job,
    drain,
    new_ledger,
    read_jsonl,
    request_line,
    tokens_for,
    write_input,
)
from troughfill.api import Phase
from troughfill.ledger import (
    TRANSITIONS,
    Claim,
    InvalidTransitionError,
    JobLedger,
    LedgerClosedError,
    Outcome,
    Partial,
    id_buckets,
)
from troughfill.ledger.ledger import DEFAULT_LEASE_SECONDS
from troughfill.results import finalize, index_input, load_requests
from troughfill.storage import ObjectStore


async def ready_job(
    aredis: Redis, tmp_path: Path, store: ObjectStore, clock: FakeClock, count: int = 20, **options: float
) -> tuple[JobLedger, str]:
    ledger = new_ledger(aredis, clock)
    input_url = write_input(tmp_path / "in.jsonl", [request_line(f"r{i}") for i in range(count)])
    output_url = (tmp_path / "out").as_uri()
    await create_job(ledger, input_url, output_url, **options)  # type: ignore[arg-type]
    await index_input(ledger, store)
    return ledger, output_url


@pytest.mark.parametrize("source", list(Phase))
@pytest.mark.parametrize("target", list(Phase))
async def test_only_whitelisted_transitions_happen(aredis: Redis, source: Phase, target: Phase) -> None:
    ledger = new_ledger(aredis)
    await aredis.hset(ledger.keys.key("meta"), "state", source.value)
    if target in TRANSITIONS[source]:
        assert await ledger.transition(target) is True
        assert await ledger.state() == target
        assert target.value in (await ledger.progress()).state_times
    elif target == source:
        assert await ledger.transition(target) is False  # idempotent, nothing written
    else:
        with pytest.raises(InvalidTransitionError):
            await ledger.transition(target)
        assert await ledger.state() == source


async def test_create_is_idempotent_and_rebuilds_from_redis(aredis: Redis, tmp_path: Path) -> None:
    ledger = new_ledger(aredis)
    config = await create_job(ledger, "file:///in.jsonl", "file:///out", max_attempts=4)
    assert not await ledger.create(config)
    fresh = JobLedger(aredis, ledger.keys)  # e.g. after an operator restart
    assert await fresh.config() == config
    assert await fresh.state() == Phase.VALIDATING


async def test_indexing_validates_lines_and_maps_each_request_to_its_bytes(
    aredis: Redis, tmp_path: Path, store: ObjectStore, clock: FakeClock
) -> None:
    lines = [
        request_line("a"),
        "",  # blank lines are not requests
        "{broken json",
        request_line("b", url="/v1/embeddings"),
        request_line("c", method="GET"),
        request_line("a"),  # duplicate
        request_line("d") + "\r",  # CRLF line ending
        request_line("é-ünïcode"),
    ]
    ledger = new_ledger(aredis, clock)
    input_url = write_input(tmp_path / "in.jsonl", lines)
    await create_job(ledger, input_url, (tmp_path / "out").as_uri())
    report = await index_input(ledger, store)
    assert (report.total, report.invalid) == (7, 4)
    assert await ledger.state() == Phase.IN_PROGRESS
    progress = await ledger.progress()
    assert (progress.total, progress.failed, progress.completed) == (7, 4, 0)
    valid = await load_requests(ledger, store, [0, 5, 6])
    assert [r.custom_id for r in valid] == ["a", "d", "é-ünïcode"]

    await drain(ledger, store, (tmp_path / "out").as_uri())
    final = await finalize(ledger, store)
    assert (final.outputs, final.errors) == (3, 4)
    errors = {
        (e["custom_id"], e["error"]["code"], e["error"]["line"])
        for e in read_jsonl(tmp_path / "out/errors.jsonl")
    }
    assert errors == {
        (None, "invalid_json_line", 3),
        ("b", "invalid_url", 4),
        (None, "invalid_request", 5),
        ("a", "duplicate_custom_id", 6),
    }


async def test_duplicate_ids_are_found_in_bounded_redis_memory_whatever_their_length(
    aredis: Redis, tmp_path: Path, store: ObjectStore, clock: FakeClock
) -> None:
    """20,000 ids of 500 bytes: the digests Redis holds while indexing cost about 20 bytes an id
    (a set of the ids themselves took over 550), and nothing of them is left once indexed."""
    count = 20_000
    ids = [f"{i:06d}-" + "x" * 493 for i in range(count)]
    ledger = new_ledger(aredis, clock)
    buckets = id_buckets(count)
    before = int((await aredis.info("memory"))["used_memory"])
    fresh = await ledger.add_custom_ids(ids, buckets)
    held = int((await aredis.info("memory"))["used_memory"]) - before
    assert all(fresh)
    assert held / count < 40, f"{held / count:.1f} bytes of Redis an id"
    again = await ledger.add_custom_ids([ids[7], "new", ids[-1], "new"], buckets)
    assert again == [False, True, False, False]
    await aredis.append(ledger.keys.key("offsets"), b"\0" * 12 * (count + 1))
    await ledger.finish_index(count + 1, buckets)
    assert [key async for key in aredis.scan_iter(match=ledger.keys.key("ids") + "*")] == []


def test_id_buckets_keep_each_hash_small_enough_for_a_listpack() -> None:
    assert id_buckets(0) == 1
    for ids in (100, 10_000, 10**6, 40_000_000):
        buckets = id_buckets(ids)
        assert buckets & (buckets - 1) == 0
        assert 32 < ids / buckets <= 64


async def test_reindexing_after_a_crash_starts_over(
    aredis: Redis, tmp_path: Path, store: ObjectStore, clock: FakeClock
) -> None:
    ledger = new_ledger(aredis, clock)
    input_url = write_input(tmp_path / "in.jsonl", [request_line("x"), "nope", request_line("y")])
    await create_job(ledger, input_url, (tmp_path / "out").as_uri())
    await index_input(ledger, store)
    await aredis.hset(ledger.keys.key("meta"), "state", "validating")  # as if it crashed before moving on
    report = await index_input(ledger, store)
    progress = await ledger.progress()
    assert (report.total, report.invalid, progress.total, progress.failed) == (3, 1, 3, 1)


async def test_claims_are_chunks_and_an_expired_lease_returns_its_requests_uncharged(
    aredis: Redis, tmp_path: Path, store: ObjectStore, clock: FakeClock
) -> None:
    ledger, _ = await ready_job(aredis, tmp_path, store, clock, count=10, lease_seconds=10)
    first = await ledger.claim("w1", 4)
    second = await ledger.claim("w2", 4)
    assert first is not None
    assert second is not None
    assert first.indices == [0, 1, 2, 3]
    assert second.indices == [4, 5, 6, 7]
    clock.advance(5)
    assert await ledger.renew("w1", first.lease_id)  # w1 is alive, w2 went silent
    clock.advance(6)
    third = await ledger.claim("w3", 10)
    assert third is not None
    assert sorted(third.indices) == [4, 5, 6, 7, 8, 9]  # w2's requests first, then the rest
    assert third.failed_attempts == [0] * 6  # a dead worker is no request's failed attempt
    assert not await ledger.renew("w2", second.lease_id)
    assert not await ledger.renew("w3", first.lease_id)  # not its lease


async def test_release_gives_work_back_without_counting_an_attempt(
    aredis: Redis, tmp_path: Path, store: ObjectStore, clock: FakeClock
) -> None:
    ledger, _ = await ready_job(aredis, tmp_path, store, clock, count=3)
    claim = await ledger.claim("w1", 3)
    assert claim is not None
    assert await ledger.release("w2", claim.lease_id) == -1  # not its lease
    assert await ledger.release("w1", claim.lease_id) == 3
    again = await ledger.claim("w2", 3)
    assert again is not None
    assert sorted(again.indices) == [0, 1, 2]
    assert again.failed_attempts == [0, 0, 0]


async def test_requests_that_keep_failing_become_dead_letters(
    aredis: Redis, tmp_path: Path, store: ObjectStore, clock: FakeClock
) -> None:
    ledger, _ = await ready_job(aredis, tmp_path, store, clock, count=2, max_attempts=2, lease_seconds=5)
    claim = await ledger.claim("w1", 2)
    assert claim is not None
    assert await ledger.nack("w1", claim.lease_id, [0]) == 1  # attempt 1 of request 0 failed
    assert await ledger.nack("w1", claim.lease_id, [1]) == 1  # and of request 1
    claim = await ledger.claim("w2", 2)
    assert claim is not None
    assert sorted(claim.indices) == [0, 1]
    assert claim.failed_attempts == [1, 1]
    assert await ledger.nack("w2", claim.lease_id, [0, 1]) == 0  # second failures: both give up
    progress = await ledger.progress()
    assert (progress.dead, progress.failed, progress.failed_attempts) == (2, 2, 4)
    assert progress.all_done
    final = await finalize(ledger, store)
    errors = read_jsonl(tmp_path / "out" / "errors.jsonl")
    assert (final.outputs, final.errors) == (0, 2)
    assert {(e["custom_id"], e["error"]["code"]) for e in errors} == {
        ("r0", "max_attempts_exceeded"),
        ("r1", "max_attempts_exceeded"),
    }


async def test_a_crash_makes_suspects_that_are_retried_alone_and_only_solo_crashes_count(
    aredis: Redis, tmp_path: Path, store: ObjectStore, clock: FakeClock
) -> None:
    ledger, _ = await ready_job(aredis, tmp_path, store, clock, count=4, max_attempts=1, lease_seconds=5)
    crowd = await ledger.claim("w1", 4)
    assert crowd is not None
    assert not crowd.solo
    assert await ledger.nack("w1", crowd.lease_id, [0, 1, 2, 3], crashed=True) == 4  # nothing charged
    assert await ledger.release("w1", crowd.lease_id) == 0
    assert await ledger.claim("w2", 4) is None  # a busy worker is given no suspect
    for _ in range(4):  # alone, each once; request 2 kills its engine every time
        alone = await ledger.claim("w3", 4, idle=True)
        assert alone is not None
        assert alone.solo
        if alone.indices == [2]:
            assert await ledger.nack("w3", alone.lease_id, [2], crashed=True) == 1  # its first crash
            assert await ledger.release("w3", alone.lease_id) == 0
        else:
            await drain_lease(ledger, store, "w3", alone)
    alone = await ledger.claim("w4", 4, idle=True)
    assert alone is not None
    assert alone.indices == [2]
    clock.advance(6)  # this time the worker died with it (its lease expired): the second crash
    assert await ledger.reap() == 1
    progress = await ledger.progress()
    assert (progress.completed, progress.dead, progress.failed_attempts) == (3, 1, 0)
    assert progress.all_done
    assert [(i, code) async for i, code in ledger.dead_letters(10)] == [(2, "request_crashed_engine")]


async def drain_lease(ledger: JobLedger, store: ObjectStore, owner: str, claim: Claim) -> None:
    """Commit fake results for a lease's requests, as its owner, and give the lease back."""
    worker = FakeWorker(ledger, store, (await ledger.config()).output_url, owner)
    worker.claim = claim
    await worker.finish()


async def test_a_request_done_twice_counts_once(
    aredis: Redis, tmp_path: Path, store: ObjectStore, clock: FakeClock
) -> None:
    ledger, output_url = await ready_job(aredis, tmp_path, store, clock, count=2, lease_seconds=5)
    slow = FakeWorker(ledger, store, output_url, "slow")
    assert await slow.take(2)
    await slow.work(2)
    clock.advance(6)  # slow misses its lease; another worker redoes the requests
    await drain(ledger, store, output_url)
    assert await slow.flush() == 0  # the late commit wins nothing
    progress = await ledger.progress()
    assert progress.completed == 2
    assert progress.completion_tokens == tokens_for(0) + tokens_for(1)
    assert progress.prompt_tokens == 4
    final = await finalize(ledger, store)
    assert final.outputs == 2
    assert [line["custom_id"] for line in read_jsonl(tmp_path / "out/output.jsonl")].count("r0") == 1


async def test_resumed_requests_are_counted_once_by_the_commit_that_wins(
    aredis: Redis, tmp_path: Path, store: ObjectStore, clock: FakeClock
) -> None:
    ledger, _ = await ready_job(aredis, tmp_path, store, clock, count=4)
    claim = await ledger.claim("w", 4)
    assert claim is not None
    outcomes = [
        Outcome(0, resumed=True, completion_tokens=5),
        Outcome(1, failed=True, resumed=True),
        Outcome(2, completion_tokens=5),
    ]
    assert await ledger.commit("seg-a", outcomes, claim.lease_id) == 3
    assert await ledger.commit("seg-b", [Outcome(0, resumed=True), Outcome(3, resumed=True)]) == 1
    progress = await ledger.progress()
    assert (progress.completed, progress.failed, progress.resumed) == (3, 1, 3)
    assert progress.completion_tokens == 10  # the losing duplicate of 0 added nothing


async def test_no_result_is_accepted_once_the_job_is_finalizing(
    aredis: Redis, tmp_path: Path, store: ObjectStore, clock: FakeClock
) -> None:
    ledger, _ = await ready_job(aredis, tmp_path, store, clock, count=1)
    await ledger.transition(Phase.FINALIZING)
    with pytest.raises(LedgerClosedError, match="finalizing"):
        await ledger.commit("late", [Outcome(0)])
    assert await ledger.claim("w", 1) is None


async def test_partial_generations_are_saved_and_dropped_once_the_request_is_done(
    aredis: Redis, tmp_path: Path, store: ObjectStore, clock: FakeClock
) -> None:
    ledger, _ = await ready_job(aredis, tmp_path, store, clock, count=3)
    await ledger.save_partial(1, "Once upon a", 3)
    await ledger.save_partial(2, "Über", 1)
    partials = await ledger.load_partials([0, 1, 2])
    assert {i: (p.text, p.tokens) for i, p in partials.items()} == {1: ("Once upon a", 3), 2: ("Über", 1)}
    await ledger.commit("seg", [Outcome(1)])
    assert set(await ledger.load_partials([0, 1, 2])) == {2}
    # A checkpoint that reaches Redis after its request's commit is dropped, not resurrected.
    assert await ledger.save_partials({1: Partial("Once upon a time", 4), 0: Partial("A", 1)}) == 1
    assert set(await ledger.load_partials([0, 1, 2])) == {0, 2}


async def test_keys_of_a_job_share_one_cluster_slot_and_jobs_never_collide(
    aredis: Redis, tmp_path: Path, store: ObjectStore, clock: FakeClock
) -> None:
    a, output_url = await ready_job(aredis, tmp_path / "a", store, clock, count=5)
    b = JobLedger(aredis, type(a.keys)("team-b", a.keys.name, a.keys.uid), clock=clock)  # same name and uid
    assert await b.state() is None
    await a.save_partial(0, "x", 1)
    await drain(a, store, output_url)
    keys = [k.decode() async for k in aredis.scan_iter(match=a.keys.prefix.replace("{", "\\{") + "*")]
    assert {k.removeprefix(a.keys.prefix) for k in keys} >= {
        "meta",
        "offsets",
        "done",
        "counters",
        "segments",
    }
    assert len({key_slot(k.encode()) for k in keys}) == 1
    assert all(k.startswith(a.keys.prefix) for k in keys)
    assert await a.delete() == len(keys)
    assert [k async for k in aredis.scan_iter(match=a.keys.prefix.replace("{", "\\{") + "*")] == []


async def test_expiry_and_cancellation_report_every_unfinished_request_once(
    aredis: Redis, tmp_path: Path, store: ObjectStore, clock: FakeClock
) -> None:
    for outcome, code in [(Phase.EXPIRED, "batch_expired"), (Phase.CANCELLED, "batch_cancelled")]:
        ledger, output_url = await ready_job(aredis, tmp_path / code, store, clock, count=30)
        worker = FakeWorker(ledger, store, output_url, "w")
        assert await worker.take(12)
        await worker.finish()
        assert await worker.take(5)
        await worker.work(5)  # in flight, not committed
        if outcome == Phase.CANCELLED:
            await ledger.transition(Phase.CANCELLING)
        final = await finalize(ledger, store, outcome)
        assert await ledger.state() == outcome
        assert (final.outputs, final.errors) == (12, 18)
        with pytest.raises(LedgerClosedError):
            await worker.flush()
        outputs = read_jsonl(tmp_path / code / "out/output.jsonl")
        errors = read_jsonl(tmp_path / code / "out/errors.jsonl")
        ids = [line["custom_id"] for line in outputs + errors]
        assert sorted(ids) == sorted(f"r{i}" for i in range(30))
        assert {e["error"]["code"] for e in errors} == {code}


async def test_finalize_writes_openai_batch_lines_and_survives_a_crash_before_the_last_step(
    aredis: Redis, tmp_path: Path, store: ObjectStore, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger, output_url = await ready_job(aredis, tmp_path, store, clock, count=4)
    await drain(ledger, store, output_url, chunk=3)
    real_transition = ledger.transition

    async def crash_before_completing(target: Phase) -> bool:
        if target == Phase.COMPLETED:
            raise ConnectionError("operator killed")
        return await real_transition(target)

    monkeypatch.setattr(ledger, "transition", crash_before_completing)
    with pytest.raises(ConnectionError):
        await finalize(ledger, store)
    first = (tmp_path / "out/output.jsonl").read_bytes()
    monkeypatch.setattr(ledger, "transition", real_transition)
    final = await finalize(JobLedger(aredis, ledger.keys, clock=clock), store)  # the restarted operator
    assert final.state == Phase.COMPLETED
    assert (tmp_path / "out/output.jsonl").read_bytes() == first
    line = read_jsonl(tmp_path / "out/output.jsonl")[0]
    assert set(line) == {"id", "custom_id", "response", "error"}
    assert line["id"].startswith("batch_req_")
    assert line["error"] is None
    assert line["response"]["status_code"] == 200
    assert len(read_jsonl(tmp_path / "out/output.jsonl")) == 4
    assert not (tmp_path / "out" / "_segments" / ledger.keys.uid).exists()
    assert (tmp_path / "out" / "errors.jsonl").read_text() == ""


async def test_expired_leases_return_within_seconds_of_real_time(
    aredis: Redis, tmp_path: Path, store: ObjectStore
) -> None:
    assert DEFAULT_LEASE_SECONDS <= 30
    ledger = new_ledger(aredis)
    input_url = write_input(tmp_path / "in.jsonl", [request_line(f"r{i}") for i in range(3)])
    await create_job(ledger, input_url, (tmp_path / "out").as_uri(), lease_seconds=1.0)
    await index_input(ledger, store)
    assert await ledger.claim("doomed", 3)
    started = asyncio.get_running_loop().time()
    claim = None
    for _ in range(100):  # a rescuer polling every 50 ms, for at most 5 s
        claim = await ledger.claim("rescuer", 3)
        if claim:
            break
        await asyncio.sleep(0.05)
    waited = asyncio.get_running_loop().time() - started
    assert claim is not None
    assert sorted(claim.indices) == [0, 1, 2]
    assert 0.9 <= waited <= 2.0
    assert json.dumps(claim.failed_attempts) == "[0, 0, 0]"  # a dead worker is no request's failed attempt


async def test_a_request_lost_with_three_leases_is_retried_alone(
    aredis: Redis, tmp_path: Path, store: ObjectStore, clock: FakeClock
) -> None:
    """Workers keep dying while they hold request 0 (it may be what kills them): after its third
    lost lease it is a suspect, claimed only alone; the others were never held back."""
    ledger, _ = await ready_job(aredis, tmp_path, store, clock, count=3, lease_seconds=5)
    for n in range(3):
        claim = await ledger.claim(f"doomed{n}", 1)
        assert claim is not None
        assert claim.indices == [0]
        clock.advance(6)
        assert await ledger.reap() == 1
    busy = await ledger.claim("busy", 3)
    assert busy is not None
    assert sorted(busy.indices) == [1, 2]  # 0 waits for a worker with nothing else to do
    alone = await ledger.claim("idle", 3, idle=True)
    assert alone is not None
    assert (alone.indices, alone.solo, alone.failed_attempts) == ([0], True, [0])


async def test_leases_run_on_the_servers_clock_not_the_clients(
    aredis: Redis, tmp_path: Path, store: ObjectStore
) -> None:
    """Without a clock of its own the ledger times leases by Redis's TIME: a host whose clock
    is 15 s ahead reaps nothing that is alive, and a lease's expiry is Redis's now + the lease."""
    ledger = JobLedger(aredis, new_ledger(aredis).keys)  # production: no clock given
    input_url = write_input(tmp_path / "in.jsonl", [request_line(f"r{i}") for i in range(3)])
    await create_job(ledger, input_url, (tmp_path / "out").as_uri(), lease_seconds=10.0)
    await index_input(ledger, store)
    claim = await ledger.claim("alive", 3)
    assert claim is not None
    seconds, micros = await aredis.time()
    score = await aredis.zscore(ledger.keys.key("leases"), str(claim.lease_id))
    assert score is not None
    assert abs(score - (seconds + micros / 1e6 + 10.0)) < 1.0
    ahead = FakeClock(time.time() + 15)
    skewed = JobLedger(aredis, ledger.keys)  # the same job seen from another host, without a clock
    assert await skewed.reap() == 0
    assert await ledger.renew("alive", claim.lease_id)
    # A clock 15 s ahead, used as "now", would have reaped the live lease: what Redis's TIME prevents.
    assert await JobLedger(aredis, ledger.keys, clock=ahead).reap() == 1
