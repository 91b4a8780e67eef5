"""One job's ledger holding whatever a tenant wrote (its pods hold the job's Redis credentials)
never stops its pool: the pool's cycle still yields every other job's workers when online rises,
and the job with the bad ledger fails alone with LedgerCorrupt, naming what it found.

Real redis-server; the cluster is the pool-cycle tests' in-memory one (tests/integration/
test_pool_cycle.py): what is under test is what the operator reads back from Redis."""

import asyncio
import struct
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings
from redis.asyncio import Redis

from tests.builders import STORAGE, batch_inference, pool, template
from tests.integration.test_pool_cycle import START, FakeCluster, FakeSignals
from tests.ledgertools import FakeClock, request_line, write_input
from troughfill.api import BatchInference, BatchPool, ModelTemplate, admit
from troughfill.api.conditions import JobConditionType, Reason, find_condition
from troughfill.config import Settings
from troughfill.controller import jobs
from troughfill.controller.pools import PoolController
from troughfill.controller.ports import Cluster
from troughfill.controller.stores import JobStores
from troughfill.kube.workerpod import WorkerEnvironment
from troughfill.ledger import Heartbeat, JobLedger, LedgerCorruptError, StopMode
from troughfill.ledger.keys import OFFSETS
from troughfill.results import finalize, load_requests
from troughfill.storage import ObjectStore, segments_prefix
from troughfill_dev.localcluster import RedisServer

REQUESTS = 6


@dataclass
class TwoJobs:
    cluster: FakeCluster
    signals: FakeSignals
    controller: PoolController
    pool: BatchPool
    bad: BatchInference
    good: BatchInference
    bad_ledger: JobLedger
    good_ledger: JobLedger
    clock: FakeClock


async def two_jobs(client: Redis, workdir: Path) -> TwoJobs:
    """Team A's and team B's jobs in one 9-GPU pool (one GPU of headroom), two 2-GPU workers
    each, Ready, beating."""
    clock = FakeClock(START)
    quotas = [{"namespace": ns, "maxGPUs": 4, "storage": STORAGE} for ns in ("team-a", "team-b")]
    pool_object = BatchPool.model_validate(
        pool(scaleUpDelay="0s", minUsefulTime="0s", gpus={"count": 9}, quotas=quotas)
    )
    template_object = ModelTemplate.model_validate(template(gpusPerWorker=2))
    wires, parsed, ledgers = [], [], []
    created = datetime.fromtimestamp(START, UTC)
    for namespace in ("team-a", "team-b"):
        folder = workdir / namespace / uuid.uuid4().hex
        input_url = write_input(folder / "in.jsonl", [request_line(f"r{i}") for i in range(REQUESTS)])
        wire = batch_inference(
            namespace=namespace, inputURL=input_url, outputURL=(folder / "out").as_uri() + "/", maxWorkers=2
        )
        wire["metadata"].update(uid=uuid.uuid4().hex, generation=1, creationTimestamp=created.isoformat())
        job = BatchInference.model_validate(wire)
        ledger = jobs.ledger_for(job, client)
        started = await jobs.start(
            job, admit(job, template_object, pool_object), ledger, ObjectStore(), created
        )
        assert started.status.phase == "in_progress"
        wire["status"] = started.status.model_dump(mode="json", by_alias=True, exclude_none=True)
        wires.append(wire)
        parsed.append(BatchInference.model_validate(wire))
        ledgers.append(ledger)
    cluster = FakeCluster(
        templates={"tiny": template_object}, pools={"gpus": pool_object}, raw_jobs=wires, clock=clock
    )
    signals = FakeSignals(clock)
    checked: Cluster = cluster
    controller = PoolController(
        checked, signals, client, WorkerEnvironment(ledger_url="http://ledger:8090"),
        JobStores(checked, Settings()), clock=clock,
    )  # fmt: skip
    world = TwoJobs(cluster, signals, controller, pool_object, parsed[0], parsed[1], *ledgers, clock)
    cycle = await controller.cycle(pool_object)
    assert len(cycle.created) == 4
    for name, pod in list(cluster.pods.items()):
        cluster.ready(name)
        ledger = ledgers[0] if pod.namespace == "team-a" else ledgers[1]
        await ledger.heartbeat(name, Heartbeat(pid=1, at=clock()), ttl=600)
    clock.advance(1)
    return world


async def rise_and_check(world: TwoJobs) -> None:
    """Online takes the whole pool: every worker of team B's job is told to yield, and team A's
    workers stop too (yielded, or stopped because its job is failing)."""
    world.signals.gpus = 9
    cycle = await world.controller.cycle(world.pool)
    stopped = dict(cycle.stopped)
    good = {name for name, pod in world.cluster.pods.items() if pod.namespace == "team-b"}
    bad = {name for name, pod in world.cluster.pods.items() if pod.namespace == "team-a"}
    assert good <= set(stopped), "team B's workers kept online waiting"
    assert {stopped[name] for name in good} == {StopMode.YIELD}
    for name in good:
        assert await world.good_ledger.stop_mode(name) is StopMode.YIELD
    assert bad <= set(stopped)


async def team_a_status(world: TwoJobs) -> tuple[str | None, str | None, str]:
    """(phase, Failed's reason, its message) after one status refresh of team A's job."""
    assert world.bad.status is not None
    now = datetime.fromtimestamp(world.clock(), UTC)
    update = await jobs.refresh_status(
        world.bad, world.bad.status.model_copy(deep=True), world.bad_ledger, ObjectStore(), now
    )
    failed = find_condition(update.status.conditions, JobConditionType.FAILED)
    phase = update.status.phase
    return (
        phase.value if phase else None,
        failed.reason if failed else None,
        failed.message if failed else "",
    )


KEYS = ("meta", "counters", "leases", "worker", "segments", "partial", "offsets", "done", "retry", "owners")
FIELDS = (
    "state",
    "total",
    "indexed",
    "completed",
    "failed",
    "prompt_tokens",
    "at:in_progress",
    "cursor",
    "x",
)
KINDS = ("string", "hash", "list", "set", "zset")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    key=st.sampled_from(KEYS),
    kind=st.sampled_from(KINDS),
    field=st.one_of(st.sampled_from(FIELDS), st.binary(min_size=1, max_size=12)),
    value=st.one_of(
        st.binary(max_size=40),
        st.sampled_from([b"-1", b"nan", b"inf", b"1e400", b"99999999999999999999999", b"in_progress\n"]),
    ),
)
def test_whatever_one_job_writes_to_its_ledger_the_pool_still_yields_the_others(
    redis_server: RedisServer, tmp_path: Path, key: str, kind: str, field: bytes | str, value: bytes
) -> None:
    async def scenario() -> None:
        client = Redis.from_url(redis_server.url)
        try:
            world = await two_jobs(client, tmp_path)
            name = next(n for n, p in world.cluster.pods.items() if p.namespace == "team-a")
            target = world.bad_ledger.keys.key(f"worker:{name}" if key == "worker" else key)
            if kind == "hash" and await client.type(target) in (b"hash", b"none"):
                await client.hset(target, field, value)  # one field of the right type, or a new hash
            else:
                await client.delete(target)
                writes = {
                    "string": client.set(target, value),
                    "hash": client.hset(target, field, value),
                    "list": client.rpush(target, value),
                    "set": client.sadd(target, value),
                    "zset": client.zadd(target, {value: 1}),
                }
                for kind_, write in writes.items():
                    if kind_ == kind:
                        await write
                    else:
                        write.close()
            await rise_and_check(world)
            phase, reason, message = await team_a_status(world)
            if reason == Reason.LEDGER_CORRUPT:
                assert phase == "failed"
                assert "the job's ledger holds what troughfill does not write" in message
            # the other job reads as before
            assert not (await world.good_ledger.progress()).corrupt
        finally:
            await client.flushall()
            await client.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("key", "field", "value", "named"),
    [
        ("counters", "completed", b"not-a-number", "counters.completed"),
        ("meta", "state", b"sleeping", "meta.state"),
        ("meta", "total", b"99999999999", "meta.total"),
        ("meta", "at:in_progress", b"nan", "meta.at:in_progress"),
        ("counters", "failed", b"-3", "counters.failed"),
    ],
)
async def test_a_bad_field_fails_its_job_naming_the_field_and_stops_its_workers(
    aredis: Redis, tmp_path: Path, key: str, field: str, value: bytes, named: str
) -> None:
    world = await two_jobs(aredis, tmp_path)
    await aredis.hset(world.bad_ledger.keys.key(key), field, value)
    await rise_and_check(world)
    phase, reason, message = await team_a_status(world)
    assert (phase, reason) == ("failed", Reason.LEDGER_CORRUPT)
    assert named in message
    assert await world.bad_ledger.state() == "failed"  # its workers' commits are refused now
    assert not (await world.good_ledger.progress()).corrupt


async def test_a_meta_key_of_another_type_or_size_is_corrupt_not_an_error(
    aredis: Redis, tmp_path: Path
) -> None:
    world = await two_jobs(aredis, tmp_path)
    meta = world.bad_ledger.keys.key("meta")
    await aredis.hset(meta, mapping={f"pad:{i}": "x" for i in range(300)})  # past the bound on fields
    progress = await world.bad_ledger.progress()
    assert progress.corrupt is not None
    assert "fields, over" in progress.corrupt
    await aredis.delete(meta)
    await aredis.rpush(meta, "x")
    assert "not a hash" in str((await world.bad_ledger.progress()).corrupt)
    with pytest.raises(LedgerCorruptError, match="meta"):
        await world.bad_ledger.state()
    await rise_and_check(world)
    phase, reason, _ = await team_a_status(world)
    assert (phase, reason) == ("failed", Reason.LEDGER_CORRUPT)


async def test_a_span_longer_than_any_line_is_never_read(aredis: Redis, tmp_path: Path) -> None:
    """A 96 MiB span written over request 0's: reading it would hold 96 MiB in the operator."""
    world = await two_jobs(aredis, tmp_path)
    await aredis.setrange(world.bad_ledger.keys.key(OFFSETS), 0, struct.pack(">QI", 0, 96 << 20))
    with pytest.raises(LedgerCorruptError, match="spans 100663296 bytes"):
        await load_requests(world.bad_ledger, ObjectStore(), [0, 1])


async def test_a_segment_id_that_is_a_path_is_never_merged(aredis: Redis, tmp_path: Path) -> None:
    """Team A lists a path into team B's segment directory among its committed segments: the merge
    refuses it (team B's results never reach team A's output) and team A's job fails alone."""
    world = await two_jobs(aredis, tmp_path)
    good_config = jobs.job_config(world.good)
    good_segments = segments_prefix(good_config.output_url, world.good_ledger.keys.uid)
    bad_config = jobs.job_config(world.bad)
    relative = f"../../../../{Path(good_segments[len('file://') :]).relative_to('/')}/w-0123456789abcdef"
    await aredis.rpush(world.bad_ledger.keys.key("segments"), relative)
    with pytest.raises(LedgerCorruptError, match="is not a segment id"):
        await finalize(world.bad_ledger, ObjectStore(), jobs.Phase.CANCELLED, bad_config)
    assert world.bad.status is not None
    now = datetime.fromtimestamp(world.clock(), UTC)
    cancelled = world.bad.model_copy(update={"spec": world.bad.spec.model_copy(update={"cancel": True})})
    update = await jobs.refresh_status(
        cancelled, world.bad.status.model_copy(deep=True), world.bad_ledger, ObjectStore(), now
    )
    failed = find_condition(update.status.conditions, JobConditionType.FAILED)
    assert failed is not None
    assert failed.reason == Reason.LEDGER_CORRUPT
    assert not ObjectStore().exists(bad_config.output_url + "output.jsonl")  # nothing published


async def test_a_heartbeat_that_cannot_be_read_is_no_heartbeat(aredis: Redis, tmp_path: Path) -> None:
    world = await two_jobs(aredis, tmp_path)
    name = next(n for n, p in world.cluster.pods.items() if p.namespace == "team-a")
    key = world.bad_ledger.keys.key(f"worker:{name}")
    for value in (b"{not json", b'{"pid": "x", "at": 1}', b"x" * 100_000):
        await aredis.set(key, value)
        assert await world.bad_ledger.last_heartbeat(name) is None
    await aredis.delete(key)
    await aredis.hset(key, "a", "b")
    assert await world.bad_ledger.last_heartbeat(name) is None
    await rise_and_check(world)
